"""An IDEFICS model imported whole (`import_weights --kind=idefics --source=HF_DIR`).

  python -m flamingo_jax.generate --config=experiments/configs/idefics.py:IMPORT_DIR \
      --params=IMPORT_DIR --prompt='<image>In this picture' --image=a.jpg
  python -m flamingo_jax.train --config=experiments/configs/idefics.py:IMPORT_DIR \
      --workdir=runs/idefics [--config.train.steps=200 ...]     # fine-tunes what IDEFICS trains

IMPORT_DIR/model.json fixes the model: LLaMA's options with IDEFICS' additional token rows,
its CLIP ViT (every token, before post_layernorm), its perceiver resampler or none, and its
gated cross-attention options (weights/idefics.py); `<image>` is its tokenizer's own, written
between `<fake_token_around_image>` tokens as its processor does. The recipe around it:
config_base.imported_flamingo_config.
"""

from flamingo_jax import config_base


def get_config(arg=None):
  return config_base.imported_flamingo_config(arg, "idefics")
