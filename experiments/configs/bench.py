"""Benchmark models between tiny and the paper's: `bench.py:100m` (CPU) and `bench.py:1b` (GPU).

Same architecture and streams as the paper, smaller widths; random init, synthetic batches.
"""

from flamingo_jax import config_base

SIZES = {
    # ~95M parameters: a 70M-parameter LM (32k vocab), tiny NFNet, 64 px images.
    "100m": dict(image_size=64, vision="tiny", lm=(12, 512, 8, 2048), key_size=64,
                 xattn_every=2, resampler=dict(num_layers=2, dim=256, num_heads=4, key_size=64),
                 batch=8, m3w_tokens=128, pair_tokens=32, frames=4),
    # ~1.1B parameters: NFNet-F0 at 224 px, a 0.8B LM, xattn every 4th block.
    "1b": dict(image_size=224, vision="F0", lm=(24, 1536, 12, 6144), key_size=128,
               xattn_every=4, resampler=dict(num_layers=4, dim=1024, num_heads=8, key_size=128),
               batch=32, m3w_tokens=256, pair_tokens=64, frames=8),
}


def get_config(arg=None):
  args = config_base.parse_arg(arg, "bench.py", keys=("size",), positional="size")
  name = args.get("size", "100m")
  if name not in SIZES:
    raise ValueError(f"bench.py:{arg}: size {name!r} unknown; known: {', '.join(SIZES)}")
  size = SIZES[name]
  layers, dim, heads, ffw = size["lm"]
  model = config_base.model_config(
      vocab_size=32_000, image_size=size["image_size"], vision_variant=size["vision"],
      lm=config_base.paper_lm(layers, dim, heads, ffw) | dict(key_size=size["key_size"]),
      xattn_every=size["xattn_every"], xattn_num_heads=heads, xattn_key_size=size["key_size"],
      resampler=dict(ffw_mult=4, num_latents=64, num_time_embeddings=8, max_frames=32,
                     **size["resampler"]))
  b = size["batch"]
  streams = {
      "m3w": dict(source="interleaved", batch_size=b, weight=1.0, max_tokens=size["m3w_tokens"], max_media=5, frames=1),
      "align": dict(source="image_text", batch_size=2 * b, weight=0.2, max_tokens=size["pair_tokens"], max_media=1, frames=1),
      "ltip": dict(source="image_text", batch_size=2 * b, weight=0.2, max_tokens=size["pair_tokens"], max_media=1, frames=1),
      "vtp": dict(source="video_text", batch_size=b // 4 if b >= 32 else b, weight=0.03, max_tokens=size["pair_tokens"], max_media=1, frames=size["frames"]),
  }
  config = config_base.base_config(model, streams=streams, image_size=size["image_size"])
  if name == "100m":
    config.precision.compute = "float32"  # CPU: bf16 matmuls are emulated and slow
    config.precision.frozen_params = "float32"
  config.model.attention_impl = "auto"      # cuDNN flash on a GPU, else our einsums
  return config_base.apply_variant(config, args)
