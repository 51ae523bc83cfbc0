"""Writes the OpenFlamingo module fixtures of tests/test_openflamingo.py (run with
open_flamingo 2.0.1 installed, and einops-exts: the reference venv of
../shared/bench/README.md).

  ~/.cache/flamingo-refvenv/bin/python tests/data/openflamingo/make_fixture.py [OUT_DIR]

OpenFlamingo's own modules at a small size, every parameter randomised:
- its PerceiverResampler as its factory builds it (no frame or media-time embeddings): dim
  32, 2 layers, 4 heads of 8, 6 latents. resampler.safetensors (state dict under
  `perceiver.`, as in an OpenFlamingo checkpoint), resampler_in.npy (vision_x [b=2, T=3
  media, F=2 frames, v=5, 32]), resampler_out.npy ([2, 3, 6, 32]).
- a GatedCrossAttentionBlock: text width 32, visual width 24, 4 heads of 8, non-zero gates.
  xattn.safetensors (under `lang_encoder.gated_cross_attn_layers.0.`), xattn_text.npy
  [2, 7, 32], xattn_media.npy [2, 2 media, 3 latents, 24], xattn_locations.npy (bool [2, 7]:
  row 0 has text before its first image and two images, row 1 one image at position 0),
  xattn_out.npy [2, 7, 32].
"""

import os
import sys

import numpy as np
from safetensors.torch import save_file
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference_env  # pylint: disable=g-import-not-at-top,wrong-import-position

reference_env.allow_missing_torchvision()

from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler  # pylint: disable=g-import-not-at-top,wrong-import-position,line-too-long

SEED = 0
DIM, DEPTH, HEADS, DIM_HEAD, LATENTS = 32, 2, 4, 8, 6


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      is_norm_scale = p.ndim == 1 and name.endswith("weight")     # LayerNorm scales
      p.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.3 * noise)
  return module.eval()


def main(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  resampler = randomise(PerceiverResampler(dim=DIM, depth=DEPTH, dim_head=DIM_HEAD, heads=HEADS,
                                           num_latents=LATENTS), SEED)
  x = torch.randn(2, 3, 2, 5, DIM, generator=torch.Generator().manual_seed(SEED + 1))
  with torch.no_grad():
    out = resampler(x)
  save_file({f"perceiver.{k}": v.contiguous() for k, v in resampler.state_dict().items()},
            os.path.join(out_dir, "resampler.safetensors"))
  np.save(os.path.join(out_dir, "resampler_in.npy"), x.numpy())
  np.save(os.path.join(out_dir, "resampler_out.npy"), out.numpy())

  block = randomise(GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4,
                                             ff_mult=4), SEED + 2)
  generator = torch.Generator().manual_seed(SEED + 3)
  text = torch.randn(2, 7, 32, generator=generator)
  media = torch.randn(2, 2, 3, 24, generator=generator)
  locations = torch.tensor([[0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
  with torch.no_grad():
    xattn_out = block(text, media, media_locations=locations)
  save_file({f"lang_encoder.gated_cross_attn_layers.0.{k}": v.contiguous()
             for k, v in block.state_dict().items()}, os.path.join(out_dir, "xattn.safetensors"))
  for name, value in (("xattn_text", text), ("xattn_media", media),
                      ("xattn_locations", locations), ("xattn_out", xattn_out)):
    np.save(os.path.join(out_dir, f"{name}.npy"), value.numpy())
  print(f"wrote {out_dir}: resampler out {tuple(out.shape)}, xattn out {tuple(xattn_out.shape)}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
