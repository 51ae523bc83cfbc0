"""Writes the CLIP ViT fixture of tests/test_vision_import.py (run with open_clip installed:
the reference venv of docs/benchmarks.md, "The reference environment").

  ~/.cache/flamingo-refvenv/bin/python tests/data/clip_vit/make_fixture.py [OUT_DIR]

A small ViT built by open_clip's own code, with its CLIP text tower (a whole CLIP model's
state dict, as OpenAI / OpenCLIP checkpoints are): image 32 px, patch 8, width 64, 3 layers,
2 heads of 32 (so "width / 64 heads" would be wrong: the test passes heads=2), QuickGELU,
every parameter randomised. Writes weights.safetensors, images.npy (NHWC float32, already
normalised) and tokens.npy: OpenFlamingo's vision_x features, `visual(x)[1]` with
output_tokens=True (patch tokens after ln_post, no class token), NHWC grid.

Also hf/ (transformers' CLIPVisionModel of the same shape, its own random weights, written
by save_pretrained: config.json + model.safetensors) and hf_tokens.npy: the same features in
its terms, post_layernorm(last_hidden_state)[:, 1:], for the same images.
"""

import json
import os
import sys

import numpy as np
from safetensors.torch import save_file
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference_env  # pylint: disable=g-import-not-at-top,wrong-import-position

reference_env.allow_missing_torchvision()

import open_clip  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED = 0
IMAGE, PATCH, WIDTH, LAYERS, HEAD_WIDTH = 32, 8, 64, 3, 32


def build() -> torch.nn.Module:
  vision = open_clip.CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=HEAD_WIDTH,
                                   patch_size=PATCH, image_size=IMAGE)
  text = open_clip.CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
  model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True)
  generator = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)
  model.visual.output_tokens = True
  return model.eval()


def main(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  torch.manual_seed(SEED)
  model = build()
  images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(SEED + 1))
  with torch.no_grad():
    tokens = model.visual(images)[1]                                   # [B, g*g, D]
  grid = IMAGE // PATCH
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out_dir, "weights.safetensors"))
  # As open_clip's own export keeps it beside the weights: the model config (its activation).
  with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": {"embed_dim": 16, "quick_gelu": True,
                             "vision_cfg": dict(layers=LAYERS, width=WIDTH, head_width=HEAD_WIDTH,
                                                patch_size=PATCH, image_size=IMAGE),
                             "text_cfg": dict(context_length=8, vocab_size=50, width=32,
                                              heads=2, layers=1)}}, f, indent=1)
  np.save(os.path.join(out_dir, "images.npy"), images.permute(0, 2, 3, 1).numpy())
  np.save(os.path.join(out_dir, "tokens.npy"), tokens.reshape(2, grid, grid, WIDTH).numpy())
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                                         num_hidden_layers=LAYERS, num_attention_heads=2,
                                         image_size=IMAGE, patch_size=PATCH,
                                         hidden_act="quick_gelu")
  torch.manual_seed(SEED + 2)
  hf = transformers.CLIPVisionModel(config).eval()
  generator = torch.Generator().manual_seed(SEED + 2)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
      p.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.2 * noise)
    hidden = hf(pixel_values=images).last_hidden_state
    hf_tokens = hf.vision_model.post_layernorm(hidden)[:, 1:]
  hf.save_pretrained(os.path.join(out_dir, "hf"), safe_serialization=True)
  np.save(os.path.join(out_dir, "hf_tokens.npy"), hf_tokens.reshape(2, grid, grid, WIDTH).numpy())
  print(f"wrote {out_dir}: open_clip {open_clip.__version__}, "
        f"{sum(p.numel() for p in model.visual.parameters())} vision parameters, "
        f"tokens {tuple(tokens.shape)}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
