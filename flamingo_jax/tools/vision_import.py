"""`import_weights --kind=nfnet | clip_vit`: a vision tower -> an import folder:
OUTPUT/params (its parameters under flamingo/vision_encoder, orbax) and OUTPUT/model.json
(the config.model fields it implies). Train on it with `config.model.vision.init_checkpoint=
OUTPUT/params` and the model.json fields (`experiments/configs/pretrained.py:...,vision=OUTPUT`
sets both).

  nfnet     timm's dm_nfnet_f0 ... f6 safetensors -> {"vision": {"variant", "numerics": "timm"}}
  clip_vit  an OpenCLIP / OpenAI CLIP state dict (safetensors; a whole CLIP model or its
            visual tower) or a Hugging Face CLIPVisionModel / CLIPModel folder -> {"image_size",
            "vision": {"kind": "vit", "vit": {...}, "pixel_stats": "clip"}}; --vit_heads and
            --vit_activation (from config.json for Hugging Face folders; else width / 64 and
            quick_gelu: OpenAI's weights; gelu: LAION's), --image_size (positions resized;
            default the checkpoint's)
  contrastive  a contrastive pretraining run's workdir (training/contrastive.py; its newest
            checkpoint) -> its NFNet, {"vision": {"variant", "activation", "numerics"}}: the
            hand-off of PAPER.md §5 to a Flamingo run
"""

import time

import jax.numpy as jnp

from flamingo_jax.tools import lm_import


KINDS = ("nfnet", "clip_vit", "contrastive")


def load_contrastive_run(workdir: str):
  """(params under flamingo/vision_encoder, model.json fields) of a contrastive run's newest
  checkpoint. Raises weights.CheckpointError."""
  import jax  # pylint: disable=g-import-not-at-top
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import contrastive  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import trainer  # pylint: disable=g-import-not-at-top
  try:
    config = trainer.run_config(workdir)
  except ValueError as e:
    raise weights.CheckpointError(str(e)) from e
  if config.get("task", "flamingo") != "contrastive":
    raise weights.CheckpointError(f"{workdir} is not a contrastive run (its config.json has "
                                  f"task={config.get('task', 'flamingo')!r})")
  try:
    params = trainer.restore_workdir_params(config, workdir)
  except (ValueError, checkpointing.NoLoadableCheckpointError) as e:
    raise weights.CheckpointError(str(e)) from e
  vision = config.model.vision
  fields = {"vision": {"kind": "nfnet", "variant": vision.variant,
                       "activation": vision.activation, "numerics": vision.numerics}}
  return jax.device_get(contrastive.export_vision(params)), fields


def run(kind: str, source: str, output: str, *, dtype: str = "keep", vit_heads: int = 0,
        vit_activation: str = "", image_size: int = 0) -> dict:
  """The import; returns the report. Raises weights.CheckpointError (nothing written)."""
  from flamingo_jax.weights import vision  # pylint: disable=g-import-not-at-top
  if kind not in KINDS:
    raise ValueError(f"vision import kind {kind!r}; expected one of {KINDS}")
  lm_import.check_output_is_new(output)
  start = time.time()
  if kind == "nfnet":
    params, fields = vision.load_timm_nfnet(source)
  elif kind == "contrastive":
    params, fields = load_contrastive_run(source)
  else:
    params, fields = vision.load_clip_vit(source, heads=vit_heads, activation=vit_activation,
                                              image_size=image_size)
  if dtype != "keep":
    params = {m: {n: v.astype(jnp.dtype(dtype)) for n, v in leaves.items()}
              for m, leaves in params.items()}
  lm_import.write_import_folder(output, params, fields)
  leaves = [v for leaves in params.values() for v in leaves.values()]
  return {"kind": kind, "output": output, "fields": fields, "tensors": len(leaves),
          "parameters": int(sum(v.size for v in leaves)),
          "bytes": int(sum(v.nbytes for v in leaves)), "seconds": time.time() - start}
