"""Flamingo-3B: Chinchilla-1.4B-shaped LM, xattn before every block (PAPER.md §1.5, Table 13).

LM FFW width 8832 (not in the paper): chosen so the LM count lands on Table 1 (PAPER.md §10.6).
"""

from flamingo_jax import config_base


def get_config(arg=None):
  model = config_base.model_config(
      vocab_size=32_000, image_size=320, vision_variant="F6",
      lm=config_base.paper_lm(num_layers=24, dim=2048, num_heads=16, ffw_size=8832),
      xattn_every=1, xattn_num_heads=16)
  config = config_base.base_config(model, streams=config_base.PAPER_STREAMS, image_size=320)
  config_base.paper_input(config)
  config.model.remat = "dots"
  return config_base.apply_variant(config, arg)
