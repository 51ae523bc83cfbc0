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

  tokens      <|endofchunk|> N, <image> N + 1, <PAD> N + 2 when      image_token_id, eoc_token_id;
              its tokenizer had no pad (N: the base tokenizer's     their rows of its trained
              size); the LM's tables resized to them               table become our trainable
                                                                   new-token rows

`load_openflamingo` builds the whole model's parameters and `config.model` fields from its
checkpoint (`checkpoint.pt` through torch.load(weights_only=True), or a safetensors export),
the base LM's Hugging Face folder and the CLIP ViT (an OpenCLIP state dict, or the
checkpoint's own `vision_encoder.*`). Its checkpoint, as its training saves it
(`filter_state_dict_to_trainable`), holds the resampler, the gated blocks and the LM's token
tables (input and, when untied, output): the tables override the base LM's, the frozen layers
come from the base. A full state dict (its decoder layers too) works the same way.

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

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
import tokenizers

from flamingo_jax import config_base
from flamingo_jax import models
from flamingo_jax.weights import families
from flamingo_jax.weights import loading
from flamingo_jax.weights import mapping
from flamingo_jax.weights import vision
from flamingo_jax.weights.safetensors_io import (CheckpointError, OverlaidCheckpoint,
                                                 SafetensorsCheckpoint)

RESAMPLER = "flamingo/perceiver_resampler"
_NORM_LEAVES = {"weight": "scale", "bias": "offset"}


def _norm(module: str, stacked: bool = False) -> mapping.Transform:
  """A LayerNorm's weight / bias -> scale / offset (row `layer` of a stacked one)."""
  return lambda x, xp, ctx, g: {
      f"{module}/{_NORM_LEAVES[g['leaf']]}" + (f"@{g['layer']}" if stacked else ""): x}


def _kv(key: str, value: str) -> mapping.Transform:
  """A fused to_kv [2 * inner, D] -> key and value [D, inner] (torch's .chunk(2, dim=-1))."""
  def transform(x, xp, ctx, groups):
    k, v = np.split(x, 2, axis=0)
    return {key.format(**groups): np.ascontiguousarray(k.T),
            value.format(**groups): np.ascontiguousarray(v.T)}
  return transform


def _unsupported(x, xp, ctx, groups):
  raise CheckpointError(f"perceiver.{groups['name']}: frame / media-time embeddings are not "
                        "supported (OpenFlamingo's factory builds its resampler without them)")


RESAMPLER_RULES: tuple[mapping.Rule, ...] = (
    (r"latents", mapping.to(f"{RESAMPLER}/latents")),
    (r"norm\.(?P<leaf>weight|bias)", _norm(f"{RESAMPLER}/final_norm")),
    (r"(?P<name>frame_embs|media_time_embs)", _unsupported),
    (r"layers\.(?P<layer>\d+)\.0\.norm_media\.(?P<leaf>weight|bias)",
     _norm(f"{RESAMPLER}/layers/media_norm", stacked=True)),
    (r"layers\.(?P<layer>\d+)\.0\.norm_latents\.(?P<leaf>weight|bias)",
     _norm(f"{RESAMPLER}/layers/latents_norm", stacked=True)),
    (r"layers\.(?P<layer>\d+)\.1\.0\.(?P<leaf>weight|bias)",
     _norm(f"{RESAMPLER}/layers/ffw_norm", stacked=True)),
    (r"layers\.(?P<layer>\d+)\.0\.to_q\.weight",
     mapping.to(f"{RESAMPLER}/layers/attention/query/w@{{layer}}", mapping.transposed)),
    (r"layers\.(?P<layer>\d+)\.0\.to_out\.weight",
     mapping.to(f"{RESAMPLER}/layers/attention/output/w@{{layer}}", mapping.transposed)),
    (r"layers\.(?P<layer>\d+)\.0\.to_kv\.weight",
     _kv(f"{RESAMPLER}/layers/attention/key/w@{{layer}}",
         f"{RESAMPLER}/layers/attention/value/w@{{layer}}")),
    (r"layers\.(?P<layer>\d+)\.1\.1\.weight",
     mapping.to(f"{RESAMPLER}/layers/ffw/ffw_in/w@{{layer}}", mapping.transposed)),
    (r"layers\.(?P<layer>\d+)\.1\.3\.weight",
     mapping.to(f"{RESAMPLER}/layers/ffw/ffw_out/w@{{layer}}", mapping.transposed)),
)

# A gated block's tensors (names relative to the block) -> our block-relative paths.
XATTN_RULES: tuple[mapping.Rule, ...] = (
    (r"attn_gate", lambda x, xp, ctx, g: {"alpha_xattn": x.reshape(())}),
    (r"ff_gate", lambda x, xp, ctx, g: {"alpha_dense": x.reshape(())}),
    (r"attn\.norm\.(?P<leaf>weight|bias)", _norm("query_norm")),
    (r"ff\.0\.(?P<leaf>weight|bias)", _norm("ffw_norm")),
    (r"attn\.to_q\.weight", mapping.to("cross_attention/query/w", mapping.transposed)),
    (r"attn\.to_out\.weight", mapping.to("cross_attention/output/w", mapping.transposed)),
    (r"attn\.to_kv\.weight", _kv("cross_attention/key/w", "cross_attention/value/w")),
    (r"ff\.1\.weight", mapping.to("ffw/ffw_in/w", mapping.transposed)),
    (r"ff\.3\.weight", mapping.to("ffw/ffw_out/w", mapping.transposed)),
)


def resampler_params(tensors: Mapping[str, np.ndarray], *, prefix: str = "perceiver.",
                     dim_head: int = 64) -> tuple[dict, dict]:
  """(params under RESAMPLER, config.model.resampler fields) of OpenFlamingo's resampler.

  `tensors`: name -> array (e.g. a SafetensorsCheckpoint's). `dim_head`: its head width,
  not in the tensors (OpenFlamingo's default, 64)."""
  mine = {name[len(prefix):]: np.asarray(value) for name, value in tensors.items()
          if name.startswith(prefix)}
  if "latents" not in mine:
    raise CheckpointError(f"no {prefix}latents: not an OpenFlamingo resampler")
  params = mapping.convert(mine.items(), RESAMPLER_RULES, what="resampler",
                           prefix=prefix)
  depth = params[f"{RESAMPLER}/layers/attention/query"]["w"].shape[0]
  num_latents, dim = params[RESAMPLER]["latents"].shape
  inner = params[f"{RESAMPLER}/layers/attention/query"]["w"].shape[-1]
  if inner % dim_head:
    raise CheckpointError(f"attention width {inner} is not a multiple of dim_head {dim_head}")
  hidden = params[f"{RESAMPLER}/layers/ffw/ffw_in"]["w"].shape[-1]
  fields = dict(num_layers=depth, dim=dim, num_heads=inner // dim_head, key_size=dim_head,
                ffw_mult=hidden // dim, num_latents=num_latents, num_time_embeddings=0,
                input_projection=False, ffw_activation="gelu_exact")
  return dict(params), fields


XATTN_PREFIX = "lang_encoder.gated_cross_attn_layers."


def xattn_block_params(tensors: Mapping[str, np.ndarray], index: int, *,
                       prefix: str = XATTN_PREFIX) -> dict:
  """{block-relative module: {leaf: array}} of OpenFlamingo's gated block `index`."""
  head = f"{prefix}{index}."
  mine = {name[len(head):]: np.asarray(value) for name, value in tensors.items()
          if name.startswith(head)}
  if not mine:
    raise CheckpointError(f"no {head}* tensors: not an OpenFlamingo gated block {index}")
  return mapping.convert(mine.items(), XATTN_RULES, what="gated block", prefix=head)


# --- the whole model ----------------------------------------------------------------------

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
LM = loading.LM_PREFIX
_LANG = "lang_encoder."
_FLAMINGO_LAYER = re.compile(r"lang_encoder\.(?P<path>.+?)\.(?P<layer>\d+)\."
                             r"(?P<part>gated_cross_attn_layer|decoder_layer)\.(?P<rest>.+)$")
_XATTN_LIST = re.compile(r"lang_encoder\.gated_cross_attn_layers\.(?P<layer>\d+)\.(?P<rest>.+)$")


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """torch.load without running pickled code (weights_only=True); torch is an optional extra
  of the converter, never imported by the rest of the package."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f"reading {path} needs torch (pip install 'flamingo_jax[torch]'), or "
                          "export the state dict to .safetensors first") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds)
    raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): "
                          f"{str(e).splitlines()[0]}") from None
  if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
    state = state["model_state_dict"]                # a training checkpoint_<epoch>.pt
  if not isinstance(state, dict):
    raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
  out = {}
  for name, value in state.items():
    if not torch.is_tensor(value):
      raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().contiguous()
    if value.dtype == torch.bfloat16:                # numpy has no bfloat16: via ml_dtypes
      out[name] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = value.numpy()
  return out


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """An OpenFlamingo state dict: `checkpoint.pt` (torch) or .safetensors, as name -> array,
  with DDP / FSDP / activation-checkpointing wrapper names removed."""
  if not os.path.exists(path):
    raise CheckpointError(f"OpenFlamingo checkpoint {path!r} does not exist")
  if os.path.isfile(path) and path.endswith(TORCH_SUFFIXES):
    raw = _torch_state_dict(path)
  else:
    raw = {name: np.asarray(value) for name, value in SafetensorsCheckpoint(path)}
  out = {}
  for name, value in raw.items():
    for wrapper in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod."):
      name = name.replace(wrapper, "")
    out[name.removeprefix("module.")] = value
  return out


@dataclasses.dataclass
class CheckpointParts:
  resampler: dict          # perceiver.*
  xattn: dict              # lang_encoder.gated_cross_attn_layers.I.* (canonical names)
  lm: dict                 # the LM's own tensors, in Hugging Face names
  vision: dict             # visual.* (OpenCLIP names), when the checkpoint has its ViT


def split_checkpoint(tensors: Mapping[str, np.ndarray]) -> CheckpointParts:
  """Sorts an OpenFlamingo state dict by module; unknown names are an error naming them."""
  parts = CheckpointParts({}, {}, {}, {})
  for name, value in tensors.items():
    layer = _FLAMINGO_LAYER.match(name) or _XATTN_LIST.match(name)
    if name.startswith("perceiver."):
      parts.resampler[name] = value
    elif name.startswith("vision_encoder."):
      parts.vision["visual." + name[len("vision_encoder."):]] = value
    elif name.startswith(_LANG + "old_decoder_blocks."):
      continue                             # the same tensors as the decoder layers' names
    elif layer and layer.groupdict().get("part", "gated_cross_attn_layer") == \
        "gated_cross_attn_layer":
      parts.xattn[f"{XATTN_PREFIX}{layer.group('layer')}.{layer.group('rest')}"] = value
    elif layer:
      parts.lm[f"{layer.group('path')}.{layer.group('layer')}.{layer.group('rest')}"] = value
    elif name.startswith(_LANG):
      parts.lm[name[len(_LANG):]] = value
    else:
      raise CheckpointError(f"tensor {name} is not part of an OpenFlamingo model (expected "
                            "perceiver.*, lang_encoder.*, vision_encoder.*)")
  if not parts.resampler or not parts.xattn:
    raise CheckpointError("not an OpenFlamingo checkpoint: no perceiver.* or gated "
                          "cross-attention tensors")
  return parts


def xattn_every(layers: list[int], num_layers: int) -> int:
  """OpenFlamingo's cross_attn_every_n_layers from the decoder layers that have a gated block
  (before layer i when (i + 1) % n == 0)."""
  n = layers[0] + 1
  expected = [i for i in range(num_layers) if (i + 1) % n == 0]
  if layers != expected:
    raise CheckpointError(f"gated blocks before LM layers {layers}, which is no "
                          f"cross_attn_every_n_layers of a {num_layers}-layer LM (is --lm its base LM?)")
  return n


def base_vocab(lm_dir: str) -> int:
  """Ids of the base tokenizer (`len(tokenizer)` before OpenFlamingo's additions)."""
  path = os.path.join(lm_dir, "tokenizer.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{lm_dir} has no tokenizer.json to count the base vocabulary "
                          "(pass --base_vocab=N: len(tokenizer) before OpenFlamingo added "
                          "its tokens)")
  return tokenizers.Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)


def _fit_rows(table: np.ndarray, rows: int) -> np.ndarray:
  """`table` cut or extended to `rows` (new rows: the mean row)."""
  if table.shape[0] >= rows:
    return table[:rows]
  mean = table.astype(np.float32).mean(0, keepdims=True).astype(table.dtype)
  return np.concatenate([table, np.repeat(mean, rows - table.shape[0], 0)])


def load_openflamingo(source: str, lm_dir: str, vision_source: str = "", *,
                      dim_head: int = 64, vit_heads: int = 0, vit_activation: str = "",
                      base_vocab_size: int = 0, pad_vocab_multiple: int = 128,
                      dtype: Optional[Any] = None, progress: bool = False
                      ) -> tuple[dict, dict, dict]:
  """(params {module: {name: array}}, model.json fields, report) of a whole OpenFlamingo.

  `source`: its checkpoint; `lm_dir`: the base LM (Hugging Face folder: config.json,
  safetensors, tokenizer.json); `vision_source`: its CLIP ViT (OpenCLIP state dict; "" when
  the checkpoint holds `vision_encoder.*`). `dim_head`: the resampler's and gated blocks'
  head width (not in the tensors; OpenFlamingo's is 64). `base_vocab_size`: 0 counts
  lm_dir/tokenizer.json. `dtype`: the frozen LM's (None: the source's)."""
  parts = split_checkpoint(read_checkpoint(source))
  kind, lm_fields = families.lm_config_from_hf(lm_dir)
  family = families.family_for(kind)
  if not family.input_embedding:
    raise CheckpointError(f"{kind} LMs cannot be OpenFlamingo's base here")
  lm_fields.pop("vocab_size")
  num_layers = lm_fields["num_layers"]
  layers = sorted({int(n[len(XATTN_PREFIX):].split(".", 1)[0]) for n in parts.xattn})
  every = xattn_every(layers, num_layers)
  warnings = []

  # Token tables: the checkpoint's trained input table; its ids from the base tokenizer.
  if family.input_embedding not in parts.lm:
    raise CheckpointError(f"{source} has no {_LANG}{family.input_embedding} (the trained "
                          "token table OpenFlamingo saves): is its LM a {kind} model?")
  rows = parts.lm[family.input_embedding].shape[0]
  n = base_vocab_size or base_vocab(lm_dir)
  if rows - n not in (2, 3):
    raise CheckpointError(f"the checkpoint's token table has {rows} rows but the base "
                          f"tokenizer {n} ids: OpenFlamingo adds <|endofchunk|>, <image> and "
                          f"(without a pad token) <PAD>, so {n + 2} or {n + 3} (another "
                          "--lm, or --base_vocab)")
  eoc_id, image_id = n, n + 1
  base = SafetensorsCheckpoint(lm_dir)
  tied = lm_fields.get("tied_embeddings", False)
  output = family.output_embedding
  if tied:
    parts.lm.pop(output, None)       # a tied LM's state dict repeats its table as lm_head
  elif output not in parts.lm:
    if output not in base.tensors:
      raise CheckpointError(f"neither {source} nor {lm_dir} holds {output}")
    parts.lm[output] = _fit_rows(base.read(output), rows)
    warnings.append(f"{source} holds no trained {output} (OpenFlamingo draws the output rows "
                    f"of its new tokens at random when it builds the model): the base LM's "
                    f"rows are used, and the mean row for <|endofchunk|> / <image>")
  padded = -(-rows // pad_vocab_multiple) * pad_vocab_multiple
  lm_fields["valid_vocab_size"] = rows if padded != rows else 0

  resampler, resampler_fields = resampler_params(parts.resampler, dim_head=dim_head)
  if vision_source:
    vit_tensors, vit_source = {k: np.asarray(v) for k, v in SafetensorsCheckpoint(
        vision.openclip_weights(vision_source))}, vision_source
  elif parts.vision:
    vit_tensors, vit_source = parts.vision, source
  else:
    raise CheckpointError(f"{source} holds no vision_encoder.* (OpenFlamingo's training "
                          "leaves the frozen CLIP out): pass --vision=OPENCLIP_SAFETENSORS")
  vit_params, vit_fields = vision.clip_vit_params(vit_tensors, vit_source, heads=vit_heads,
                                                  activation=vit_activation)
  width = vit_fields["vision"]["vit"]["width"]
  if width != resampler_fields["dim"]:
    raise CheckpointError(f"the ViT of {vit_source} is {width} wide but the checkpoint's "
                          f"resampler reads {resampler_fields['dim']}-wide tokens (another "
                          "--vision?)")
  blocks = [xattn_block_params(parts.xattn, layer) for layer in layers]
  xattn = loading.stack_xattn_blocks(blocks, num_layers, every, every - 1)
  first = blocks[0]
  inner = first["cross_attention/query"]["w"].shape[1]
  if inner % dim_head:
    raise CheckpointError(f"gated block width {inner} is not a multiple of dim_head {dim_head}")
  fields = {
      "vocab_size": padded, "image_token_id": image_id, "eoc_token_id": eoc_id,
      "image_size": vit_fields["image_size"], "lm": lm_fields,
      "xattn": dict(every=every, offset=every - 1, num_heads=inner // dim_head,
                    key_size=dim_head,
                    ffw_mult=first["ffw/ffw_in"]["w"].shape[1] // first["ffw/ffw_in"]["w"].shape[0],
                    only_attend_immediate_media=True, media_norm=False,
                    ffw_activation="gelu_exact"),
      "resampler": resampler_fields, "vision": vit_fields["vision"],
      "openflamingo": {"eoc_token_id": eoc_id, "image_token_id": image_id,
                       "pad_token_id": n + 2 if rows - n == 3 else None,
                       "cross_attn_every_n_layers": every},
  }
  model = config_base.with_imported_flamingo(config_base.model_config(
      vocab_size=padded, image_size=fields["image_size"], vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=1, dim=1, num_heads=1, ffw_size=1),
      xattn_every=1, xattn_num_heads=1), fields)

  lm_params, stats = loading.load_lm(OverlaidCheckpoint(base, parts.lm), model, kind,
                                     dtype=dtype, progress=progress)
  table = np.asarray(jax.device_get(lm_params[f"{LM}/token_embed"]["embeddings"]))
  ids = [image_id, eoc_id]                           # our new-token rows' order
  lm_params[f"{LM}/new_token_embed"]["embeddings"] = table[ids].astype(np.float32)
  if tied:
    lm_params[f"{LM}/new_token_unembed"]["w"] = table[ids].astype(np.float32).T
  else:
    unembed = np.asarray(jax.device_get(lm_params[f"{LM}/unembed"]["w"]))
    lm_params[f"{LM}/new_token_unembed"]["w"] = unembed[:, ids].astype(np.float32)
  params = {**jax.device_get(lm_params), **resampler, **vit_params, **xattn}
  try:
    shapes = models.param_shapes(model)
  except ValueError as e:
    raise CheckpointError(f"the imported modules do not fit together: {e}") from None
  loading.check_complete(params, shapes)
  count = sum(int(np.prod(v.shape)) for leaves in params.values() for v in leaves.values())
  report = {"lm_kind": kind, "checkpoint_tensors": len(parts.resampler) + len(parts.xattn) +
            len(parts.lm) + len(parts.vision), "parameters": count,
            "lm_seconds": stats["seconds"], "warnings": warnings}
  return params, fields, report
