"""Flamingo-9B: Chinchilla-7B-shaped LM, xattn every 4th block (docs/paper.md §1.5, Table 13).

LM FFW width 12672 (not in the paper): chosen so the LM count lands on Table 1 (docs/paper.md §10.6).
"""

from flamingo_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, "flamingo_9b.py")
  model = config_base.model_config(
      vocab_size=32_000, image_size=320, vision_variant="F6",
      lm=config_base.paper_lm(num_layers=40, dim=4096, num_heads=32, ffw_size=12672),
      xattn_every=4, xattn_num_heads=32)
  config = config_base.base_config(model, streams=config_base.PAPER_STREAMS, image_size=320)
  config_base.paper_input(config)
  config.model.remat = "dots"
  config.model.attention_impl = "auto"    # cuDNN flash on a GPU, else our einsums (docs/precision.md)
  return config_base.apply_variant(config, args)
