"""Writes the timm NFNet fixture of tests/test_vision_import.py (run with timm installed:
the reference venv of docs/benchmarks.md, "The reference environment").

  ~/.cache/flamingo-refvenv/bin/python tests/data/nfnet_timm/make_fixture.py [OUT_DIR]
  ~/.cache/flamingo-refvenv/bin/python tests/data/nfnet_timm/make_fixture.py OUT_DIR dm_nfnet_f0

The second form writes a full timm model (timm.create_model, random init with randomised
gains, 2 images of its test resolution) for a one-off check of a real variant's layout; it is
not committed (hundreds of MB).

A small NFNet built by timm's own code (NormFreeNet, DeepMind's `dm_nfnet` recipe: deep-quad
stem, grouped 3x3 pairs, SE, skipinit, GELU, SAME padding), with stage depths (1, 2, 1, 2) so
that stacked blocks are covered, and the stem widths our NFNet uses (16, 32, 64, then half the
first stage). Every parameter is randomised (timm's init has unit gains and zero skip gains,
which would hide mistakes). Writes weights.safetensors, images.npy (NHWC float32, already
normalised) and features.npy (timm's forward_features, NHWC).
"""

import os
import sys

import numpy as np
from safetensors.torch import save_file
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference_env  # pylint: disable=g-import-not-at-top,wrong-import-position

reference_env.allow_missing_torchvision()
import timm.layers  # pylint: disable=g-import-not-at-top,wrong-import-position
import timm.models.nfnet as tn  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED = 0
DEPTHS, WIDTHS = (1, 2, 1, 2), (16, 32, 64, 64)


def build() -> torch.nn.Module:
  cfg = tn.NfCfg(depths=DEPTHS, channels=WIDTHS, stem_type="deep_quad", stem_chs=8,
                 group_size=8, bottle_ratio=0.5, extra_conv=True, gamma_in_act=True,
                 same_padding=True, skipinit=True, num_features=2 * WIDTHS[-1],
                 act_layer="gelu", attn_layer="se", attn_kwargs=dict(rd_ratio=0.5))
  model = tn.NormFreeNet(cfg, num_classes=10)
  # timm's deep-quad stem is (c/8, c/4, c/2, c); DeepMind's (and ours) is (16, 32, 64, c).
  conv = lambda i, o, s: timm.layers.ScaledStdConv2dSame(i, o, 3, stride=s, eps=cfg.std_conv_eps)
  model.stem.conv1, model.stem.conv2 = conv(3, 16, 2), conv(16, 32, 1)
  model.stem.conv3, model.stem.conv4 = conv(32, 64, 1), conv(64, WIDTHS[0] // 2, 2)
  return randomise(model)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
  generator = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name.endswith("gain") and "skipinit" not in name:
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("skipinit_gain"):
        p.copy_(0.5 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise * p.detach().std().clamp(min=0.05))
  return model.eval()


def main(out_dir: str, variant: str = "") -> None:
  os.makedirs(out_dir, exist_ok=True)
  torch.manual_seed(SEED)
  size = 64
  if variant:
    import timm  # pylint: disable=g-import-not-at-top
    model = randomise(timm.create_model(variant, pretrained=False))
    size = model.pretrained_cfg["test_input_size"][-1]
  else:
    model = build()
  images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED + 1))
  with torch.no_grad():
    features = model.forward_features(images)                           # [B, C, h, w]
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out_dir, "weights.safetensors"))
  np.save(os.path.join(out_dir, "images.npy"), images.permute(0, 2, 3, 1).numpy())
  np.save(os.path.join(out_dir, "features.npy"), features.permute(0, 2, 3, 1).numpy())
  print(f"wrote {out_dir}: {sum(p.numel() for p in model.parameters())} parameters, "
        f"features {tuple(features.shape)}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)),
       *sys.argv[2:3])
