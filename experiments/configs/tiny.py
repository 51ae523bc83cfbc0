"""Tiny Flamingo for CPU: every part of the real model, a few hundred thousand parameters.
launch/local.sh trains it for its 600 steps on a contrastively pretrained NFNet
(contrastive_tiny.py): then 99% of held-out images are captioned exactly right.

Every stream's global batch is a multiple of 8, so any mesh of up to 8 devices runs it.
Layers 5 with xattn every 2: two scanned groups plus a tail, like the 80B layout.
"""

from flamingo_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, "tiny.py")
  model = config_base.model_config(
      vocab_size=512, image_size=64, vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=5, dim=64, num_heads=4, ffw_size=256) | dict(key_size=16),
      xattn_every=2, xattn_num_heads=4, xattn_key_size=16,
      resampler=dict(num_layers=2, dim=32, num_heads=4, key_size=8, ffw_mult=4,
                     num_latents=8, num_time_embeddings=4, max_frames=12))
  streams = {
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=8, weight=1.0, max_tokens=32, max_media=3, frames=1),
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=8, weight=0.2, max_tokens=16, max_media=1, frames=1),
      "ltip": dict(source="image_text", manual_dir="synthetic", batch_size=8, weight=0.2, max_tokens=16, max_media=1, frames=1),
      "vtp": dict(source="video_text", manual_dir="synthetic", batch_size=8, weight=0.03, max_tokens=16, max_media=1, frames=4),
  }
  config = config_base.base_config(model, streams=streams, image_size=64, steps=600)
  config.data.tokenizer_path = config_base.SYNTHETIC_TOKENIZER
  config_base.cpu_run(config)
  return config_base.apply_variant(config, args)


def get_sweep():
  """A 2 x 2 example sweep: learning rate x seed (launch/sweep.py)."""
  return [{"optim.learning_rate": lr, "seed": seed} for lr in (1e-3, 3e-4) for seed in (0, 1)]
