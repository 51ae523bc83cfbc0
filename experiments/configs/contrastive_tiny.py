"""Contrastive vision pretraining on CPU (docs/paper.md §5 in miniature): NFNet "tiny" and a
2-layer text encoder on synthetic image-caption pairs, a few minutes on 2 cores.

  python -m flamingo_jax.train --config=experiments/configs/contrastive_tiny.py --workdir=runs/clip
  python -m flamingo_jax.tools.retrieval --config=experiments/configs/contrastive_tiny.py \
      --workdir=runs/clip                      # zero-shot R@1/R@5 on held-out synthetic pairs
  python -m flamingo_jax.tools.import_weights --kind=contrastive --source=runs/clip \
      --output=runs/clip_nfnet                 # the trained NFNet, for a Flamingo run

Every stream's batch is a multiple of 8, so any mesh of up to 8 devices runs it.
"""

from flamingo_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, "contrastive_tiny.py")
  streams = {
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=32, weight=1.0,
                    max_tokens=16, max_media=1, frames=1),
      "ltip": dict(source="image_text", manual_dir="synthetic", batch_size=32, weight=1.0,
                   max_tokens=16, max_media=1, frames=1),
  }
  config = config_base.contrastive_config(
      vocab_size=512, image_size=64, vision_variant="tiny",
      text=dict(num_layers=2, dim=64, num_heads=4, ffw_size=256), streams=streams,
      steps=300, embed_dim=64)
  config.data.tokenizer_path = config_base.SYNTHETIC_TOKENIZER
  config_base.cpu_run(config)
  config.optim.warmup_steps = 0             # the paper's schedule: 1e-3 linearly to 0
  config.model.vision.stochdepth_rate = 0.0
  return config_base.apply_variant(config, args)
