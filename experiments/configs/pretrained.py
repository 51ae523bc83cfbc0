"""A Flamingo around an imported pretrained LM (tools/import_weights), sized for a CPU run.

  python -m flamingo_jax.train --config=experiments/configs/pretrained.py:lm=IMPORT_DIR \
      --workdir=runs/pretrained [--config.train.steps=200 ...]
  ... --config=experiments/configs/pretrained.py:lm=IMPORT_DIR,vision=NFNET_IMPORT_DIR
  ... --config=experiments/configs/pretrained.py:vision=VISION_IMPORT_DIR   # tiny random LM

IMPORT_DIR is what `import_weights` wrote: `model.json` fixes the LM (options, vocabulary,
special ids, xattn.every), `params/` is loaded as `config.model.lm.init_checkpoint`,
`tokenizer.json` tokenises the data. With `vision=DIR` (an `import_weights --kind=nfnet`
folder) the vision tower is that NFNet (variant, numerics and `vision.init_checkpoint` from
it); else NFNet "tiny" at random. The rest is the tiny config's: a small resampler and xattn,
synthetic streams at 64 px, float32. Override any of it on the command line.
"""

import json
import os

from flamingo_jax import config_base


def _parse(arg):
  fields = config_base.parse_arg(arg, "pretrained.py", keys=("lm", "vision"))
  if "lm" not in fields and "vision" not in fields:
    raise ValueError("pretrained.py needs import folders: --config=experiments/configs/"
                     f"pretrained.py:lm=IMPORT_DIR[,vision=DIR][,runlocal] (got {arg!r})")
  return fields


def _import_fields(directory: str) -> dict:
  model_json = os.path.join(directory, "model.json")
  if not os.path.exists(model_json):
    raise ValueError(f"{model_json} not found: is {directory} an import_weights output folder?")
  with open(model_json) as f:
    return json.load(f)


def get_config(arg=None):
  parsed = _parse(arg)
  model = config_base.model_config(
      vocab_size=512, image_size=64, vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=2, dim=64, num_heads=4, ffw_size=256),
      xattn_every=1, xattn_num_heads=4, xattn_key_size=16,
      resampler=dict(num_layers=2, dim=32, num_heads=4, key_size=8, ffw_mult=4,
                     num_latents=8, num_time_embeddings=4, max_frames=12))
  tokenizer = config_base.SYNTHETIC_TOKENIZER
  if "lm" in parsed:
    lm_dir = os.path.abspath(parsed["lm"])
    model = config_base.with_imported_lm(model, _import_fields(lm_dir),
                                         init_checkpoint=os.path.join(lm_dir, "params"))
    tokenizer = os.path.join(lm_dir, "tokenizer.json")
  if "vision" in parsed:
    vision_dir = os.path.abspath(parsed["vision"])
    model = config_base.with_imported_vision(model, _import_fields(vision_dir),
                                             init_checkpoint=os.path.join(vision_dir, "params"))
  streams = {
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=8, weight=1.0,
                  max_tokens=48, max_media=3, frames=1),
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=8, weight=0.2,
                    max_tokens=24, max_media=1, frames=1),
      "vtp": dict(source="video_text", manual_dir="synthetic", batch_size=8, weight=0.03,
                  max_tokens=24, max_media=1, frames=4),
  }
  config = config_base.base_config(model, streams=streams, image_size=model.image_size,
                                   steps=300)
  config.data.tokenizer_path = tokenizer
  config_base.cpu_run(config)
  return config_base.apply_variant(config, parsed)
