"""The paper's contrastive vision pretraining (docs/paper.md §5): NFNet-F6 from scratch and a
BERT-Large text encoder, 1376-d embeddings, ALIGN + LTIP at 288 px with colour augmentation
and flips, batch 16,384 per stream (one gradient computation each), Adam 1e-3 decayed
linearly to 0 over 1.2M updates, AGC 1e-2 on the NFNet, global-norm clipping 10 on the text
tower, on 512 TPUv4 chips.

  python -m flamingo_jax.tools.aot_compile --config=experiments/configs/contrastive_f6.py \
      --topology=v4:8x8x8 --mesh=data=512,model=1
"""

from flamingo_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, "contrastive_f6.py")
  config = config_base.contrastive_config(
      vocab_size=32_000, image_size=288, vision_variant="F6", text=config_base.BERT_LARGE,
      streams=config_base.PAPER_CONTRASTIVE_STREAMS, steps=1_200_000)
  config_base.paper_input(config)
  # Each NFNet block recomputed in the backward pass: without it the step needs 96 GB of
  # temporaries per v4 chip (tools/aot_compile; WORKSPACE.md).
  config.model.vision.remat = True
  return config_base.apply_variant(config, args)
