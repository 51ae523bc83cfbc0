"""An OpenFlamingo 2.0.1 model imported whole (`import_weights --kind=openflamingo`).

  python -m flamingo_jax.generate --config=experiments/configs/openflamingo.py:IMPORT_DIR \
      --params=IMPORT_DIR --prompt='<image>Output:' --image=a.jpg
  python -m flamingo_jax.train --config=experiments/configs/openflamingo.py:IMPORT_DIR \
      --workdir=runs/of [--config.train.steps=200 ...]

IMPORT_DIR/model.json fixes the model: the base LM's options and OpenFlamingo's token table
(`<|endofchunk|>` and `<image>` at its ids), the CLIP ViT, and the resampler and gated-block
options that reproduce its modules (weights/openflamingo.py). The recipe around it:
config_base.imported_flamingo_config.
"""

from flamingo_jax import config_base


def get_config(arg=None):
  return config_base.imported_flamingo_config(arg, "openflamingo")
