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
(Gemma 1), mpt (MPT-7B, -30B), mosaic_gpt (MPT-1B-RedPajama-200b), chinchilla (our own layout,
from weights.export_lm); vision towers
(--source is the .safetensors file or its folder): nfnet (timm's
`dm_nfnet_f0` ... `f6`), clip_vit (OpenCLIP / OpenAI CLIP state dicts, or a Hugging Face
CLIPVisionModel / CLIPModel folder; --vit_heads, --vit_activation, --image_size); a whole
OpenFlamingo 2.0.1: openflamingo, with --source=its
checkpoint.pt or a safetensors export, --lm=its base LM's folder, --vision=its OpenCLIP ViT
(an open_clip folder, or its safetensors with --vit_activation); a whole IDEFICS
idefics, with --source=its Hugging Face folder; our own
contrastive pretraining: contrastive, with --source=the run's workdir (its NFNet).
"""

import json
import sys

from absl import flags
from absl import logging

from flamingo_jax import cli
from flamingo_jax.training import param_sources
from flamingo_jax.training import sharding
from flamingo_jax import weights
from flamingo_jax.weights import imports

_KIND = flags.DEFINE_enum("kind", None, ["llama", "gpt_neox", "gemma", "mpt", "mosaic_gpt",
                                          "chinchilla", "nfnet", "clip_vit", "openflamingo",
                                          "idefics", "contrastive"],
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
_JSON = cli.define_json()
_VIT_HEADS = flags.DEFINE_integer("vit_heads", 0, "clip_vit: attention heads (0: a Hugging "
                                  "Face folder's config.json, else width / 64, every CLIP "
                                  "ViT's head size).")
_VIT_ACTIVATION = flags.DEFINE_enum("vit_activation", "auto", ["auto", "quick_gelu", "gelu"],
                                    "clip_vit, openflamingo, idefics: auto (a Hugging Face "
                                    "config.json's, or open_clip_config.json's quick_gelu: "
                                    "QuickGELU when true, GELU when absent), quick_gelu (OpenAI "
                                    "weights, OpenFlamingo's ViT-L/14) or gelu (LAION-trained "
                                    "OpenCLIP models, IDEFICS').")
_LM = flags.DEFINE_string("lm", "", "openflamingo: its base LM's Hugging Face folder.")
_VISION = flags.DEFINE_string("vision", "", "openflamingo: its CLIP ViT (OpenCLIP safetensors; "
                              "not needed when the checkpoint holds vision_encoder.*).")
_DIM_HEAD = flags.DEFINE_integer("dim_head", 64, "openflamingo: head width of its resampler "
                                 "and gated blocks (not in the tensors; its default is 64).")
_BASE_VOCAB = flags.DEFINE_integer("base_vocab", 0, "openflamingo: len(tokenizer) before its "
                                   "added tokens (0: count --lm's tokenizer.json).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "clip_vit: resize the positions for this "
                                   "resolution (0: the checkpoint's).")


def _lm_shardings(model_config):
  """The LM's shardings over a 'model' axis of --model_axis (Megatron rules)."""
  mesh = sharding.make_mesh(-1, _MODEL_AXIS.value)
  specs = sharding.param_specs(weights.lm_param_shapes_tree(model_config),
                               sharding.rules_for(model_config, _MODEL_AXIS.value))
  return sharding.named(mesh, specs)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # orbax logs every file at INFO
  activation = "" if _VIT_ACTIVATION.value == "auto" else _VIT_ACTIVATION.value
  kind, source, output = _KIND.value, _SOURCE.value, _OUTPUT.value
  try:
    if kind in imports.VISION_KINDS:
      report = imports.run_vision(kind, source, output, dtype=_DTYPE.value,
                                  vit_heads=_VIT_HEADS.value, vit_activation=activation,
                                  image_size=_IMAGE_SIZE.value)
    elif kind == "contrastive":
      imports.check_output_is_new(output)
      params, fields = param_sources.contrastive_vision(source)
      report = imports.write_tower(kind, params, fields, output, dtype=_DTYPE.value)
    elif kind == "idefics":
      report = imports.run_idefics(source, output, dtype=_DTYPE.value,
                                   vit_activation=activation,
                                   pad_vocab_multiple=_PAD_VOCAB.value, progress=not _JSON.value)
    elif kind == "openflamingo":
      report = imports.run_openflamingo(
          source, output, lm=_LM.value, vision=_VISION.value, dtype=_DTYPE.value,
          dim_head=_DIM_HEAD.value, vit_heads=_VIT_HEADS.value, vit_activation=activation,
          base_vocab=_BASE_VOCAB.value, pad_vocab_multiple=_PAD_VOCAB.value,
          progress=not _JSON.value)
    else:
      report = imports.run_lm(kind, source, output, dtype=_DTYPE.value,
                              xattn_every=_XATTN_EVERY.value,
                              pad_vocab_multiple=_PAD_VOCAB.value,
                              shardings_for=_lm_shardings if _MODEL_AXIS.value > 1 else None,
                              progress=not _JSON.value)
  except (weights.CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if _JSON.value:
    print(json.dumps(report))
    return
  if _KIND.value == "openflamingo":
    for warning in report["warnings"]:
      print(f"warning: {warning}", file=sys.stderr)
    print(f"imported openflamingo from {_SOURCE.value} (LM {report['lm_kind']} from "
          f"{_LM.value}): {report['parameters']:,} parameters in {report['seconds']:.1f}s; "
          f"<image> {report['image_token_id']}, <|endofchunk|> {report['eoc_token_id']}, a "
          f"gated block every {report['xattn_every']} layers\nwrote {report['output']}/params,"
          f" model.json" + (", tokenizer.json, special_tokens.json" if report["tokenizer"]
                            else "") + f"\nrun it: --config=experiments/configs/"
          f"openflamingo.py:{report['output']}")
    return
  if _KIND.value == "idefics":
    print(f"imported idefics from {_SOURCE.value}: {report['parameters']:,} parameters in "
          f"{report['seconds']:.1f}s; <image> {report['image_token_id']}, <EOC> "
          f"{report['eoc_token_id']}, a gated block every {report['xattn_every']} layers, "
          f"resampler: {report['resampler']}\nwrote {report['output']}/params, model.json, "
          f"tokenizer.json, special_tokens.json\nrun it: --config=experiments/configs/"
          f"idefics.py:{report['output']}")
    return
  if _KIND.value in (*imports.VISION_KINDS, "contrastive"):
    print(f"imported {_KIND.value} from {_SOURCE.value}: {report['tensors']} tensors, "
          f"{report['parameters']:,} parameters in {report['seconds']:.1f}s\n"
          f"config.model fields: {json.dumps(report['fields'])}\nwrote {report['output']}/"
          f"params, model.json\ntrain on it: --config=experiments/configs/pretrained.py:"
          f"lm=LM_IMPORT,vision={report['output']}")
    return
  print(f"imported {report['kind']} from {_SOURCE.value}: {report['tensors']} tensors -> "
        f"{report['parameters']:,} parameters, {report['bytes'] / 2**20:.1f} MiB in "
        f"{report['seconds']:.1f}s (peak host memory {report['peak_rss_bytes'] / 2**20:.0f} "
        f"MiB)\nwrote {report['output']}/params, model.json"
        + (", tokenizer.json, special_tokens.json" if report["tokenizer"] else "")
        + f"\ntrain on it: --config=experiments/configs/pretrained.py:lm={report['output']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["kind", "source", "output"])
  cli.run(main)
