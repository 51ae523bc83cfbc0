"""OpenFlamingo 2.0.1 checkpoints -> our Flamingo's parameters (issue 11, in progress).

OpenFlamingo's modules differ from the paper's in details that are config options here, so
that its weights run unchanged (each option defaults to the paper):

  part        OpenFlamingo 2.0.1                              ours (config.model...)
  resampler   no input projection (its ViT's width)            resampler.input_projection=False
              feed-forward LN, Linear, exact GELU, Linear       resampler.ffw_activation=
                                                                  "gelu_exact"
              no frame / media-time embeddings (its factory)    resampler.num_time_embeddings=0
              heads x 64 wide (dim_head; not in the tensors)     resampler.num_heads / key_size

  xattn       no LayerNorm on the visual tokens                  xattn.media_norm=False
              feed-forward as the resampler's                    xattn.ffw_activation="gelu_exact"
              mask: text_time = cumsum(media locations) ==       φ (gated_xattn.py), the same
              media time, text before any media zeroed

  placement   a block before LM layer i when (i + 1) % n == 0    xattn.every=n, xattn.offset=n-1

Done: the resampler (`resampler_params`) and one gated block (`xattn_block_params`), each
tested against OpenFlamingo's own module, and the placement option. Still to do: the trained
input embeddings, the `<image>` / `<|endofchunk|>` ids, and `import_weights
--kind=openflamingo`.

    perceiver.latents                        perceiver_resampler/latents
    perceiver.layers.I.0.norm_media          .../layers/media_norm          (stacked, row I)
    perceiver.layers.I.0.norm_latents        .../layers/latents_norm
    perceiver.layers.I.0.to_q / to_out       .../layers/attention/query / output   (transposed)
    perceiver.layers.I.0.to_kv               .../layers/attention/key, value (first / second
                                             half of the rows, transposed)
    perceiver.layers.I.1.0 / .1.1 / .1.3     .../layers/ffw_norm, ffw/ffw_in, ffw/ffw_out
    perceiver.norm                           .../final_norm

    gated_cross_attn_layers.I.attn.norm      query_norm            (block-relative names)
    ...attn.to_q / to_out                    cross_attention/query / output (transposed)
    ...attn.to_kv                            cross_attention/key, value (halves, transposed)
    ...attn_gate / ff_gate  [1]              alpha_xattn / alpha_dense  []
    ...ff.0 / ff.1 / ff.3                    ffw_norm, ffw/ffw_in, ffw/ffw_out
"""

import collections
import re
from typing import Mapping

import numpy as np

from flamingo_jax.weights import vision
from flamingo_jax.weights.safetensors_io import CheckpointError

RESAMPLER = "flamingo/perceiver_resampler"
_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")
_NORMS = {"0.norm_media": "media_norm", "0.norm_latents": "latents_norm", "1.0": "ffw_norm"}
_LINEARS = {"0.to_q": "attention/query", "0.to_out": "attention/output",
            "1.1": "ffw/ffw_in", "1.3": "ffw/ffw_out"}


def resampler_params(tensors: Mapping[str, np.ndarray], *, prefix: str = "perceiver.",
                     dim_head: int = 64) -> tuple[dict, dict]:
  """(params under RESAMPLER, config.model.resampler fields) of OpenFlamingo's resampler.

  `tensors`: name -> array (e.g. a SafetensorsCheckpoint's). `dim_head`: its head width,
  not in the tensors (OpenFlamingo's default, 64)."""
  mine = {name[len(prefix):]: np.asarray(value) for name, value in tensors.items()
          if name.startswith(prefix)}
  if "latents" not in mine:
    raise CheckpointError(f"no {prefix}latents: not an OpenFlamingo resampler")
  for name in ("frame_embs", "media_time_embs"):
    if name in mine:
      raise CheckpointError(f"{prefix}{name}: frame / media-time embeddings are not supported "
                            f"(OpenFlamingo's factory builds its resampler without them)")
  rows = collections.defaultdict(dict)                   # (module, leaf) -> {layer: array}
  params = collections.defaultdict(dict)
  params[RESAMPLER]["latents"] = mine.pop("latents")
  for leaf, ours in (("weight", "scale"), ("bias", "offset")):
    params[f"{RESAMPLER}/final_norm"][ours] = mine.pop(f"norm.{leaf}")
  for name, value in mine.items():
    match = _LAYER.match(name)
    if not match:
      raise CheckpointError(f"{prefix}{name} has no place in our resampler")
    layer, rest = int(match.group(1)), match.group(2)
    module, _, leaf = rest.rpartition(".")
    if module in _NORMS:
      rows[(_NORMS[module], {"weight": "scale", "bias": "offset"}[leaf])][layer] = value
    elif module in _LINEARS and leaf == "weight":
      rows[(_LINEARS[module], "w")][layer] = value.T                    # [out, in] -> [in, out]
    elif module == "0.to_kv" and leaf == "weight":
      key, val = np.split(value, 2, axis=0)                          # torch .chunk(2, dim=-1)
      rows[("attention/key", "w")][layer] = key.T
      rows[("attention/value", "w")][layer] = val.T
    else:
      raise CheckpointError(f"{prefix}{name} has no place in our resampler")
  depth = 1 + max(layer for per_layer in rows.values() for layer in per_layer)
  for (module, leaf), per_layer in rows.items():
    params[f"{RESAMPLER}/layers/{module}"][leaf] = vision.stack_rows(
        per_layer, depth, f"{prefix}layers: {module}/{leaf}")
  num_latents, dim = params[RESAMPLER]["latents"].shape
  inner = params[f"{RESAMPLER}/layers/attention/query"]["w"].shape[-1]
  if inner % dim_head:
    raise CheckpointError(f"attention width {inner} is not a multiple of dim_head {dim_head}")
  hidden = params[f"{RESAMPLER}/layers/ffw/ffw_in"]["w"].shape[-1]
  fields = dict(num_layers=depth, dim=dim, num_heads=inner // dim_head, key_size=dim_head,
                ffw_mult=hidden // dim, num_latents=num_latents, num_time_embeddings=0,
                input_projection=False, ffw_activation="gelu_exact")
  return dict(params), fields


_XATTN_LINEARS = {"attn.to_q": "cross_attention/query", "attn.to_out": "cross_attention/output",
                  "ff.1": "ffw/ffw_in", "ff.3": "ffw/ffw_out"}
_XATTN_NORMS = {"attn.norm": "query_norm", "ff.0": "ffw_norm"}
XATTN_PREFIX = "lang_encoder.gated_cross_attn_layers."


def xattn_block_params(tensors: Mapping[str, np.ndarray], index: int, *,
                       prefix: str = XATTN_PREFIX) -> dict:
  """{block-relative module: {leaf: array}} of OpenFlamingo's gated block `index`."""
  head = f"{prefix}{index}."
  mine = {name[len(head):]: np.asarray(value) for name, value in tensors.items()
          if name.startswith(head)}
  if not mine:
    raise CheckpointError(f"no {head}* tensors: not an OpenFlamingo gated block {index}")
  params = collections.defaultdict(dict)
  for name, value in mine.items():
    module, _, leaf = name.rpartition(".")
    if name in ("attn_gate", "ff_gate"):
      params[""]["alpha_xattn" if name == "attn_gate" else "alpha_dense"] = value.reshape(())
    elif module in _XATTN_NORMS:
      params[_XATTN_NORMS[module]][{"weight": "scale", "bias": "offset"}[leaf]] = value
    elif module in _XATTN_LINEARS and leaf == "weight":
      params[_XATTN_LINEARS[module]]["w"] = np.ascontiguousarray(value.T)
    elif module == "attn.to_kv" and leaf == "weight":
      key, val = np.split(value, 2, axis=0)
      params["cross_attention/key"]["w"] = np.ascontiguousarray(key.T)
      params["cross_attention/value"]["w"] = np.ascontiguousarray(val.T)
    else:
      raise CheckpointError(f"{head}{name} has no place in our gated block")
  return dict(params)
