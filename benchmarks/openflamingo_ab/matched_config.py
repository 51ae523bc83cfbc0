"""flamingo_jax config matched to openflamingo_step.py beside it (its defaults and a larger size).

Derived from experiments/configs/tiny.py / bench.py.
`--config=benchmarks/openflamingo_ab/matched_config.py[:SIZE[,bf16]]`, SIZE in {small (default),
large, gpu, gpusmoke}; `bf16`: bfloat16 compute and frozen towers (else float32).

small  <-> openflamingo_step.py defaults: gpt_neox 4 x 256 (4 heads x 64, ffw 4x = 1024), vocab 8000,
           xattn every layer (8 heads x 64, ffw x4), B=4, L=128, 3 images/row, T=1, 64 px,
           resampler 6 layers width 768, 8 heads x 64, 64 latents, ffw x4.
large  <-> --lm_layers 8 --lm_dim 512 --lm_heads 8 --xattn_every 2 --seq_len 256 (same vision/resampler).

Vision: NFNet-F0 (flamingo_jax has only NFNet) vs ViT-B/32 on the OpenFlamingo side; both give
a 2x2 grid (4 visual tokens) per 64 px image. Resampler input projection: 3072 -> 768
(OpenFlamingo has none: its resampler width *is* the ViT width).
OpenFlamingo has no media-time embeddings (max_num_frames=None); flamingo_jax always has a
table: 1 row here (T=1), 768 params.
"""

from flamingo_jax import config_base

SIZES = {
    "small": dict(lm=(4, 256, 4, 1024), key_size=64, xattn_every=1, seq_len=128),
    "large": dict(lm=(8, 512, 8, 2048), key_size=64, xattn_every=2, seq_len=256),
    # GPU size: a ~1.3B LM (24 x 2048, 16 heads x 128), xattn every 4th layer (16 x 128 heads),
    # CLIP ViT-L/14 at 224 px on both sides (ours: vision.kind="vit"), resampler 6 x 1024,
    # batch 32 x 256 tokens, 5 images per row, bfloat16 (OpenFlamingo: torch.autocast).
    "gpu": dict(lm=(24, 2048, 16, 8192), key_size=128, xattn_every=4, seq_len=256,
                vocab=32000, xattn_heads=16, xattn_key=128, image_size=224, batch=32, images=5,
                vit=dict(width=1024, layers=24, heads=16, patch_size=14), resampler_dim=1024),
    # The same code path at CPU size, to check the scripts before a GPU run.
    "gpusmoke": dict(lm=(2, 128, 2, 512), key_size=64, xattn_every=2, seq_len=64,
                     vocab=4000, xattn_heads=2, xattn_key=64, image_size=56, batch=2, images=2,
                     vit=dict(width=128, layers=2, heads=2, patch_size=14), resampler_dim=128),
}


def get_config(arg=None):
  args = config_base.parse_arg(arg, "matched_config.py", keys=("size",), switches=("bf16",),
                               positional="size")
  name = args.get("size", "small")
  if name not in SIZES:
    raise ValueError(f"matched_config.py:{arg}: size {name!r} unknown; known: {', '.join(SIZES)}")
  size = SIZES[name]
  layers, dim, heads, ffw = size["lm"]
  image_size = size.get("image_size", 64)
  model = config_base.model_config(
      vocab_size=size.get("vocab", 8000), image_size=image_size, vision_variant="F0",
      lm=config_base.paper_lm(layers, dim, heads, ffw) | dict(key_size=size["key_size"]),
      xattn_every=size["xattn_every"], xattn_num_heads=size.get("xattn_heads", 8),
      xattn_key_size=size.get("xattn_key", 64),
      resampler=dict(num_layers=6, dim=size.get("resampler_dim", 768), num_heads=8, key_size=64,
                     ffw_mult=4, num_latents=64, num_time_embeddings=1, max_frames=1))
  if "vit" in size:
    model.vision.kind = "vit"
    model.vision.vit.update(size["vit"])
    model.vision.pixel_stats = "clip"
  model.remat = "none"
  streams = {
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=size.get("batch", 4),
                  weight=1.0, max_tokens=size["seq_len"], max_media=size.get("images", 3),
                  frames=1),
  }
  config = config_base.base_config(model, streams=streams, image_size=image_size, steps=1000)
  config.mesh.data = 1
  config.mesh.model = 1
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 5000
  if args["bf16"]:
    config.precision.compute = "bfloat16"
    config.precision.frozen_params = "bfloat16"
  else:
    config.precision.compute = "float32"
    config.precision.frozen_params = "float32"
  return config
