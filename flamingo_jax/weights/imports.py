"""Imports as folders: a checkpoint read, checked and written as OUTPUT/params (orbax, our
parameter paths) and OUTPUT/model.json (the `config.model` fields it implies), with its
tokenizer when it has one, all in a temporary folder renamed at the end (a failed import
leaves no OUTPUT). tools/import_weights is the command line; these are its functions (tests
and other tools call them).

  run_lm(kind, HF_DIR, OUT)            an LM (families.py), its new-token rows at the mean row
  run_vision(kind, SOURCE, OUT)        a timm NFNet or a CLIP ViT (vision.py)
  run_openflamingo(CKPT, OUT, lm=...)  a whole OpenFlamingo 2.0.1 (openflamingo.py)
  run_idefics(HF_DIR, OUT)             a whole IDEFICS (idefics.py)
"""

import json
import os
import resource
import shutil
import time

import jax.numpy as jnp

from flamingo_jax import config_base
from flamingo_jax.weights import families
from flamingo_jax.weights import idefics
from flamingo_jax.weights import loading
from flamingo_jax.weights import openflamingo
from flamingo_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint
from flamingo_jax.weights import vision


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def write_tokenizer(source: str, tmp: str, fields: dict) -> bool:
  """Copies the source's tokenizer.json and writes special_tokens.json beside it."""
  path = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else ""
  if not path or not os.path.exists(path):
    return False
  hf = families.read_hf_config(source)
  eos = hf.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  bos = hf.get("bos_token_id", eos)
  if eos is None or bos is None:
    raise CheckpointError(f"{source}/config.json names no bos_token_id/eos_token_id")
  pad = hf.get("pad_token_id")
  shutil.copy(path, os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "special_tokens.json"), "w") as f:
    json.dump({"pad": eos if pad is None else pad, "bos": bos, "eos": eos,
               "image": fields["image_token_id"], "eoc": fields["eoc_token_id"]}, f, indent=1)
  return True


def check_output_is_new(output: str) -> None:
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise CheckpointError(f"--output {output} already exists; choose a new folder")


def write_import_folder(output: str, params, fields: dict, extra=None):
  """OUTPUT/params (orbax) and OUTPUT/model.json (`fields`), plus what `extra(tmp)` writes,
  all in a temporary folder renamed at the end: a failed import leaves no OUTPUT. Returns
  extra's result."""
  tmp = output.rstrip("/") + f".tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    loading.save_params(os.path.join(os.path.abspath(tmp), "params"), params)
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump(fields, f, indent=1)
    result = extra(tmp) if extra else None
    if os.path.isdir(output):
      os.rmdir(output)                       # empty (checked before)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return result


def run_lm(kind: str, source: str, output: str, *, dtype: str = "keep", xattn_every: int = 1,
           pad_vocab_multiple: int = 128, shardings_for=None, progress: bool = True) -> dict:
  """An LM import (--kind=llama, gpt_neox, gemma, mpt, mosaic_gpt, chinchilla); returns the
  report. `shardings_for(model_config)`: the shardings to load the LM into (default: one
  device). Raises CheckpointError (nothing written)."""
  check_output_is_new(output)
  baseline = _peak_rss_bytes()
  kind, fields = loading.import_plan(source, kind, pad_vocab_multiple=pad_vocab_multiple,
                                     xattn_every=xattn_every)
  model = config_base.with_imported_lm(_shape_model(), fields)
  shardings = None if shardings_for is None else shardings_for(model)
  params, stats = loading.load_lm(source, model, kind, shardings=shardings,
                                  dtype=None if dtype == "keep" else dtype, progress=progress)
  after_load = _peak_rss_bytes()
  tokenizer = write_import_folder(output, params, fields,
                                  lambda tmp: write_tokenizer(source, tmp, fields))
  largest = max(info.nbytes for info in SafetensorsCheckpoint(source).tensors.values())
  return stats | {"kind": kind, "output": output, "tokenizer": tokenizer,
                  "vocab_size": fields["vocab_size"], "image_token_id": fields["image_token_id"],
                  "eoc_token_id": fields["eoc_token_id"], "largest_tensor_bytes": largest,
                  "rss_before_bytes": baseline, "peak_rss_after_load_bytes": after_load,
                  "peak_rss_bytes": _peak_rss_bytes()}


def _shape_model():
  """Any Flamingo around the LM: only the LM's parameter shapes are used."""
  return config_base.model_config(
      vocab_size=8, image_size=32, vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=1, dim=8, num_heads=1, ffw_size=8),
      xattn_every=1, xattn_num_heads=1, xattn_key_size=8,
      resampler=dict(num_layers=1, dim=8, num_heads=1, key_size=8, ffw_mult=1, num_latents=1,
                     num_time_embeddings=1, max_frames=1))


VISION_KINDS = ("nfnet", "clip_vit")


def run_vision(kind: str, source: str, output: str, *, dtype: str = "keep", vit_heads: int = 0,
               vit_activation: str = "", image_size: int = 0) -> dict:
  """A vision tower import (--kind=nfnet | clip_vit); returns the report. Raises
  CheckpointError (nothing written)."""
  if kind not in VISION_KINDS:
    raise ValueError(f"vision import kind {kind!r}; expected one of {VISION_KINDS}")
  check_output_is_new(output)
  start = time.time()
  if kind == "nfnet":
    params, fields = vision.load_timm_nfnet(source)
  else:
    params, fields = vision.load_clip_vit(source, heads=vit_heads, activation=vit_activation,
                                          image_size=image_size)
  return write_tower(kind, params, fields, output, dtype=dtype, start=start)


def write_tower(kind: str, params: dict, fields: dict, output: str, *, dtype: str = "keep",
                start: float | None = None) -> dict:
  """A tower's parameters (under flamingo/vision_encoder) and model.json fields written as an
  import folder (a contrastive run's NFNet comes here too: param_sources)."""
  check_output_is_new(output)
  start = time.time() if start is None else start
  if dtype != "keep":
    params = {m: {n: v.astype(jnp.dtype(dtype)) for n, v in leaves.items()}
              for m, leaves in params.items()}
  write_import_folder(output, params, fields)
  leaves = [v for leaves in params.values() for v in leaves.values()]
  return {"kind": kind, "output": output, "fields": fields, "tensors": len(leaves),
          "parameters": int(sum(v.size for v in leaves)),
          "bytes": int(sum(v.nbytes for v in leaves)), "seconds": time.time() - start}


def run_openflamingo(source: str, output: str, *, lm: str, vision: str = "", dtype: str = "keep",
        dim_head: int = 64, vit_heads: int = 0, vit_activation: str = "",
        base_vocab: int = 0, pad_vocab_multiple: int = 128, progress: bool = True) -> dict:
  """A whole OpenFlamingo 2.0.1 (weights/openflamingo.py): OUTPUT/params, model.json and
  its base LM's tokenizer at OpenFlamingo's ids; returns the report. Raises CheckpointError
  (nothing written)."""
  if not lm:
    raise CheckpointError("--kind=openflamingo needs --lm=HF_DIR (its base LM's "
                                  "Hugging Face folder: the frozen layers and the tokenizer)")
  check_output_is_new(output)
  start = time.time()
  params, fields, report = openflamingo.load_openflamingo(
      source, lm, vision, dim_head=dim_head, vit_heads=vit_heads,
      vit_activation=vit_activation, base_vocab_size=base_vocab,
      pad_vocab_multiple=pad_vocab_multiple,
      dtype=None if dtype == "keep" else dtype, progress=progress)
  tokenizer = write_import_folder(output, params, fields,
                                  lambda tmp: write_tokenizer(lm, tmp, fields))
  return report | {"kind": "openflamingo", "output": output, "tokenizer": tokenizer,
                   "vocab_size": fields["vocab_size"],
                   "image_token_id": fields["image_token_id"],
                   "eoc_token_id": fields["eoc_token_id"],
                   "xattn_every": fields["xattn"]["every"],
                   "seconds": round(time.time() - start, 2)}


def write_idefics_tokenizer(source: str, tmp: str, fields: dict) -> bool:
  """tokenizer.json copied; special_tokens.json with IDEFICS' ids (all the tokenizer's own)."""
  path = os.path.join(source, "tokenizer.json")
  hf = families.read_hf_config(source)
  with open(path) as f:
    added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
  eos, bos = int(hf.get("eos_token_id", 2)), int(hf.get("bos_token_id", 1))
  pad = hf.get("pad_token_id")
  shutil.copy(path, os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "special_tokens.json"), "w") as f:
    json.dump({"pad": eos if pad is None else int(pad), "bos": bos, "eos": eos,
               "image": fields["image_token_id"], "eoc": fields["eoc_token_id"],
               "image_around": added.get("<fake_token_around_image>", -1),
               "tokenizer_ids": [fields["image_token_id"], fields["eoc_token_id"]]}, f, indent=1)
  return True


def run_idefics(source: str, output: str, *, dtype: str = "keep", vit_activation: str = "",
                pad_vocab_multiple: int = 128, progress: bool = True) -> dict:
  """A whole IDEFICS (weights/idefics.py): OUTPUT/params, model.json and its tokenizer with
  its own ids; returns the report. Raises CheckpointError (nothing written)."""
  check_output_is_new(output)
  start = time.time()
  params, fields, report = idefics.load_idefics(
      source, pad_vocab_multiple=pad_vocab_multiple, vit_activation=vit_activation,
      dtype=None if dtype == "keep" else dtype, progress=progress)
  write_import_folder(output, params, fields,
                      lambda tmp: write_idefics_tokenizer(source, tmp, fields))
  return report | {"kind": "idefics", "output": output, "vocab_size": fields["vocab_size"],
                   "image_token_id": fields["image_token_id"],
                   "eoc_token_id": fields["eoc_token_id"],
                   "xattn_every": fields["xattn"]["every"],
                   "resampler": fields["resampler"]["kind"],
                   "seconds": round(time.time() - start, 2)}
