r"""Imports a pretrained LM checkpoint (safetensors) into our parameter layout.

  python -m flamingo_jax.tools.import_weights --kind=llama --source=HF_DIR --output=DIR \
      [--dtype=bfloat16] [--xattn_every=4] [--json]

Writes DIR/params (orbax: the LM's frozen parameters at our paths, plus the <image>/<EOC>
rows started at the mean pretrained row), DIR/model.json (the `config.model` fields the
checkpoint implies: vocab size with <image>/<EOC> appended and the table padded for the mesh,
special ids, `lm` options, `xattn.every`), and, when the source has one, DIR/tokenizer.json
with DIR/special_tokens.json. Train on it with `config.model.lm.init_checkpoint=DIR/params`
or `experiments/configs/pretrained.py:lm=DIR`. Everything is written to a temporary folder
and renamed at the end: a failed import leaves no DIR.

Kinds: llama (Llama 2/3, Mistral, TinyLlama), gpt_neox (Pythia, RedPajama-INCITE), gemma
(Gemma 1), chinchilla (our own layout, from weights.export_lm).
"""

import json
import os
import resource
import shutil
import sys

from absl import app
from absl import flags
from absl import logging

_KIND = flags.DEFINE_enum("kind", None, ["llama", "gpt_neox", "gemma", "chinchilla"],
                          "Checkpoint family.")
_SOURCE = flags.DEFINE_string("source", None, "Hugging Face model folder (config.json + "
                              "*.safetensors) or our exported folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (must not exist yet).")
_DTYPE = flags.DEFINE_enum("dtype", "keep", ["keep", "bfloat16", "float32"],
                           "Stored dtype of the frozen LM (keep: the source's).")
_XATTN_EVERY = flags.DEFINE_integer("xattn_every", 1, "A gated xattn block before every k-th "
                                    "LM block (config.model.xattn.every; it fixes how layers "
                                    "are grouped in our layout).")
_PAD_VOCAB = flags.DEFINE_integer("pad_vocab_multiple", 128, "Pad the token table to a "
                                  "multiple of this (so the 'model' mesh axis divides it).")
_MODEL_AXIS = flags.DEFINE_integer("model_axis", 1, "Load sharded over a 'model' axis of "
                                   "this size (Megatron rules); 1: one device.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


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


def run(kind: str, source: str, output: str, *, dtype: str = "keep", xattn_every: int = 1,
        pad_vocab_multiple: int = 128, model_axis: int = 1, progress: bool = True) -> dict:
  """The import; returns the report. Raises weights.CheckpointError (nothing written)."""
  from flamingo_jax import config_base, weights  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import sharding  # pylint: disable=g-import-not-at-top
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise weights.CheckpointError(f"--output {output} already exists; choose a new folder")
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
  tmp = output.rstrip("/") + f".tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    weights.save_params(os.path.join(os.path.abspath(tmp), "params"), params)
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump(fields, f, indent=1)
    tokenizer = write_tokenizer(source, tmp, fields)
    if os.path.isdir(output):
      os.rmdir(output)                       # empty (checked above)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
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


def main(argv):
  del argv
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # orbax logs every file at INFO
  try:
    report = run(_KIND.value, _SOURCE.value, _OUTPUT.value, dtype=_DTYPE.value,
                 xattn_every=_XATTN_EVERY.value, pad_vocab_multiple=_PAD_VOCAB.value,
                 model_axis=_MODEL_AXIS.value, progress=not _JSON.value)
  except (weights.CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if _JSON.value:
    print(json.dumps(report))
    return
  print(f"imported {report['kind']} from {_SOURCE.value}: {report['tensors']} tensors -> "
        f"{report['parameters']:,} parameters, {report['bytes'] / 2**20:.1f} MiB in "
        f"{report['seconds']:.1f}s (peak host memory {report['peak_rss_bytes'] / 2**20:.0f} "
        f"MiB)\nwrote {report['output']}/params, model.json"
        + (", tokenizer.json, special_tokens.json" if report["tokenizer"] else "")
        + f"\ntrain on it: --config=experiments/configs/pretrained.py:lm={report['output']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["kind", "source", "output"])
  app.run(main)
