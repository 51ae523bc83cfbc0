"""The LM import behind tools/import_weights (no flags here, so tests and other tools can
call it): read, check and load a safetensors checkpoint, write OUTPUT atomically."""

import json
import os
import resource
import shutil


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def write_tokenizer(source: str, tmp: str, fields: dict) -> bool:
  """Copies the source's tokenizer.json and writes special_tokens.json beside it."""
  path = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else ""
  if not path or not os.path.exists(path):
    return False
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  hf = weights.families.read_hf_config(source)
  eos = hf.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  bos = hf.get("bos_token_id", eos)
  if eos is None or bos is None:
    raise weights.CheckpointError(f"{source}/config.json names no bos_token_id/eos_token_id")
  pad = hf.get("pad_token_id")
  shutil.copy(path, os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "special_tokens.json"), "w") as f:
    json.dump({"pad": eos if pad is None else pad, "bos": bos, "eos": eos,
               "image": fields["image_token_id"], "eoc": fields["eoc_token_id"]}, f, indent=1)
  return True


def check_output_is_new(output: str) -> None:
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise weights.CheckpointError(f"--output {output} already exists; choose a new folder")


def write_import_folder(output: str, params, fields: dict, extra=None):
  """OUTPUT/params (orbax) and OUTPUT/model.json (`fields`), plus what `extra(tmp)` writes,
  all in a temporary folder renamed at the end: a failed import leaves no OUTPUT. Returns
  extra's result."""
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  tmp = output.rstrip("/") + f".tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    weights.save_params(os.path.join(os.path.abspath(tmp), "params"), params)
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


def run(kind: str, source: str, output: str, *, dtype: str = "keep", xattn_every: int = 1,
        pad_vocab_multiple: int = 128, model_axis: int = 1, progress: bool = True) -> dict:
  """The import; returns the report. Raises weights.CheckpointError (nothing written)."""
  from flamingo_jax import config_base, weights  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import sharding  # pylint: disable=g-import-not-at-top
  check_output_is_new(output)
  baseline = _peak_rss_bytes()
  kind, fields = weights.import_plan(source, kind, pad_vocab_multiple=pad_vocab_multiple,
                                     xattn_every=xattn_every)
  model = config_base.with_imported_lm(_shape_model(), fields)
  shardings = None
  if model_axis > 1:
    mesh = sharding.make_mesh(-1, model_axis)
    specs = sharding.param_specs(weights.lm_param_shapes_tree(model),
                                 sharding.rules_for(model, model_axis))
    shardings = sharding.named(mesh, specs)
  params, stats = weights.load_lm(source, model, kind, shardings=shardings,
                                  dtype=None if dtype == "keep" else dtype, progress=progress)
  after_load = _peak_rss_bytes()
  tokenizer = write_import_folder(output, params, fields,
                                  lambda tmp: write_tokenizer(source, tmp, fields))
  largest = max(info.nbytes for info in weights.SafetensorsCheckpoint(source).tensors.values())
  return stats | {"kind": kind, "output": output, "tokenizer": tokenizer,
                  "vocab_size": fields["vocab_size"], "image_token_id": fields["image_token_id"],
                  "eoc_token_id": fields["eoc_token_id"], "largest_tensor_bytes": largest,
                  "rss_before_bytes": baseline, "peak_rss_after_load_bytes": after_load,
                  "peak_rss_bytes": _peak_rss_bytes()}


def _shape_model():
  """Any Flamingo around the LM: only the LM's parameter shapes are used."""
  from flamingo_jax import config_base  # pylint: disable=g-import-not-at-top
  return config_base.model_config(
      vocab_size=8, image_size=32, vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=1, dim=8, num_heads=1, ffw_size=8),
      xattn_every=1, xattn_num_heads=1, xattn_key_size=8,
      resampler=dict(num_layers=1, dim=8, num_heads=1, key_size=8, ffw_mult=1, num_latents=1,
                     num_time_embeddings=1, max_frames=1))
