"""An OpenFlamingo 2.0.1 model imported whole (`import_weights --kind=openflamingo`).

  python -m flamingo_jax.generate --config=experiments/configs/openflamingo.py:IMPORT_DIR \
      --params=IMPORT_DIR --prompt='<image>Output:' --image=a.jpg
  python -m flamingo_jax.train --config=experiments/configs/openflamingo.py:IMPORT_DIR \
      --workdir=runs/of [--config.train.steps=200 ...]

IMPORT_DIR/model.json fixes the model: the base LM's options and OpenFlamingo's token table
(`<|endofchunk|>` and `<image>` at its ids), the CLIP ViT, and the resampler and gated-block
options that reproduce its modules (weights/openflamingo.py; WORKSPACE.md lists them).
IMPORT_DIR/params holds every parameter: the frozen LM and ViT are read from it, and a fresh
run starts its trainable ones (resampler, gated blocks, the new-token rows) from it.
IMPORT_DIR/tokenizer.json tokenises the data. The rest is sized for a CPU run: synthetic
streams at the ViT's resolution, float32; override any of it on the command line.
"""

import json
import os

from flamingo_jax import config_base


def get_config(arg=None):
  if not arg:
    raise ValueError("openflamingo.py needs the import folder: "
                     "--config=experiments/configs/openflamingo.py:IMPORT_DIR")
  directory = os.path.abspath(arg)
  model_json = os.path.join(directory, "model.json")
  if not os.path.exists(model_json):
    raise ValueError(f"{model_json} not found: is {directory} an import_weights "
                     "--kind=openflamingo output folder?")
  with open(model_json) as f:
    fields = json.load(f)
  if "openflamingo" not in fields:
    raise ValueError(f"{directory} is not an OpenFlamingo import (its model.json has no "
                     "'openflamingo' entry); LM imports use experiments/configs/pretrained.py")
  size = fields["image_size"]
  model = config_base.model_config(
      vocab_size=fields["vocab_size"], image_size=size, vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=1, dim=1, num_heads=1, ffw_size=1),  # from the import
      xattn_every=1, xattn_num_heads=1)
  model = config_base.with_imported_flamingo(model, fields, os.path.join(directory, "params"))
  streams = {
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=8, weight=1.0,
                  max_tokens=48, max_media=3, frames=1),
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=8, weight=0.2,
                    max_tokens=24, max_media=1, frames=1),
  }
  config = config_base.base_config(model, streams=streams, image_size=size, steps=300)
  config.data.tokenizer_path = os.path.join(directory, "tokenizer.json")
  config_base.cpu_run(config)
  return config
