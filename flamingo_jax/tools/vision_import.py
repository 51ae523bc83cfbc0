"""`import_weights --kind=nfnet`: a timm NFNet (`dm_nfnet_f0` ... `f6`, safetensors) -> an
import folder: OUTPUT/params (our NFNet's parameters under flamingo/vision_encoder, orbax) and
OUTPUT/model.json ({"vision": {"variant", "numerics": "timm"}}). Train on it with
`config.model.vision.init_checkpoint=OUTPUT/params` and the model.json fields
(`experiments/configs/pretrained.py:...,vision=OUTPUT` sets both)."""

import time

import jax.numpy as jnp

from flamingo_jax.tools import lm_import


def run(kind: str, source: str, output: str, *, dtype: str = "keep") -> dict:
  """The import; returns the report. Raises weights.CheckpointError (nothing written)."""
  from flamingo_jax.weights import vision  # pylint: disable=g-import-not-at-top
  if kind != "nfnet":
    raise ValueError(f"vision import kind {kind!r}; expected 'nfnet'")
  lm_import.check_output_is_new(output)
  start = time.time()
  params, fields = vision.load_timm_nfnet(source)
  if dtype != "keep":
    params = {m: {n: v.astype(jnp.dtype(dtype)) for n, v in leaves.items()} for m, leaves in params.items()}
  lm_import.write_import_folder(output, params, fields)
  leaves = [v for leaves in params.values() for v in leaves.values()]
  return {"kind": kind, "output": output, "variant": fields["vision"]["variant"],
          "numerics": fields["vision"]["numerics"], "tensors": len(leaves),
          "parameters": int(sum(v.size for v in leaves)),
          "bytes": int(sum(v.nbytes for v in leaves)), "seconds": time.time() - start}
