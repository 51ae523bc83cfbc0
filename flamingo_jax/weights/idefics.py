"""IDEFICS (Hugging Face `IdeficsForVisionText2Text`: idefics-9b, -80b and -instruct) -> ours.

IDEFICS is a Flamingo around LLaMA and an OpenCLIP ViT-H/14; what differs from the paper's
modules is config options here (config_base: XATTN_OPTIONS, RESAMPLER_OPTIONS, VIT_OPTIONS),
each set from its config.json:

  IDEFICS config                          ours (config.model...)
  vision_config (CLIP, hidden_act)        vision.kind="vit", vit.* (activation as named),
                                          vit.output="tokens": every token, class first,
                                          before post_layernorm (last_hidden_state)
  use_resampler, perceiver_config         resampler.kind "perceiver" | "none"; its shape; no
                                          input projection, ReLU feed-forward, no time
                                          embeddings; qk_layer_norms_perceiver: qk_norm="layer"
  cross_layer_interval                    xattn.every (before LM layers 0, k, 2k, ...: ours)
  gated cross-attention layers            xattn: RMSNorms (norm="rms", rms_norm_eps), LLaMA's
                                          SwiGLU of intermediate_size, the LM's heads, no
                                          media norm; qk_layer_norms: qk_norm="rms" (per head);
                                          alpha_type "float" | "vector": gate="scalar" | "vector"
  additional_vocab_size (decoupled        new_token_ids = V .. V + A - 1: the trainable rows and
  embedding / lm_head rows)               logit columns (`additional_embedding`, `additional_fc`)
  image_attention_mask (its processor)    φ, and no image after EOS until the next <image>
                                          (xattn.no_media_after_id = eos_token_id)
  the LM (LLaMA)                          the llama family's options (families.py)

Token ids are the checkpoint tokenizer's own: `<image>` is the model's image token; <EOC> is
`<end_of_utterance>` when the tokenizer has it within the model's rows (the -instruct
models), else EOS. What IDEFICS trains (the resampler, the gated blocks, the additional rows)
is what our split_trainable calls trainable.
"""

import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np

from flamingo_jax import config_base
from flamingo_jax import models
from flamingo_jax.weights import families
from flamingo_jax.weights import lm_rules
from flamingo_jax.weights import loading
from flamingo_jax.weights import mapping
from flamingo_jax.weights import vision
from flamingo_jax.weights.safetensors_io import (CheckpointError, OverlaidCheckpoint,
                                                 SafetensorsCheckpoint)

LM = loading.LM_PREFIX
RESAMPLER = "flamingo/perceiver_resampler"
_NORM = {"weight": "scale", "bias": "offset"}
_LM_NAMES = re.compile(r"(model\.embed_tokens\.weight|model\.layers\..+|model\.norm\.weight|"
                       r"lm_head\.weight)$")


def _norm(module: str, stacked: bool = False) -> mapping.Transform:
  return lambda x, xp, ctx, g: {
      f"{module}/{_NORM[g['leaf']]}" + (f"@{g['layer']}" if stacked else ""): x}


def _gate(name: str) -> mapping.Transform:
  """alpha [1] ("float") -> [] ; [1, 1, D] ("vector") -> [D]."""
  return lambda x, xp, ctx, g: {name: x.reshape(()) if x.size == 1 else x.reshape(-1)}


_T = mapping.transposed

# A gated cross-attention layer's tensors (relative to the layer) -> our block-relative paths.
XATTN_RULES: tuple[mapping.Rule, ...] = (
    (r"alpha_cross_attn", _gate("alpha_xattn")),
    (r"alpha_dense", _gate("alpha_dense")),
    (r"input_layernorm\.weight", mapping.to("query_norm/scale")),
    (r"post_attention_layernorm\.weight", mapping.to("ffw_norm/scale")),
    (r"cross_attn\.q_proj\.weight", mapping.to("cross_attention/query/w", _T)),
    (r"cross_attn\.k_proj\.weight", mapping.to("cross_attention/key/w", _T)),
    (r"cross_attn\.v_proj\.weight", mapping.to("cross_attention/value/w", _T)),
    (r"cross_attn\.o_proj\.weight", mapping.to("cross_attention/output/w", _T)),
    (r"cross_attn\.q_layer_norm\.weight", mapping.to("cross_attention/query_norm/scale")),
    (r"cross_attn\.k_layer_norm\.weight", mapping.to("cross_attention/key_norm/scale")),
    (r"mlp\.gate_proj\.weight", mapping.to("ffw/ffw_gate/w", _T)),
    (r"mlp\.up_proj\.weight", mapping.to("ffw/ffw_in/w", _T)),
    (r"mlp\.down_proj\.weight", mapping.to("ffw/ffw_out/w", _T)),
)

_B = r"blocks\.(?P<layer>\d+)"
RESAMPLER_RULES: tuple[mapping.Rule, ...] = (
    (r"latents", mapping.to(f"{RESAMPLER}/latents")),
    (r"layer_norm\.(?P<leaf>weight|bias)", _norm(f"{RESAMPLER}/final_norm")),
    (rf"{_B}\.0\.context_layer_norm\.(?P<leaf>weight|bias)",
     _norm(f"{RESAMPLER}/layers/media_norm", stacked=True)),
    (rf"{_B}\.0\.latents_layer_norm\.(?P<leaf>weight|bias)",
     _norm(f"{RESAMPLER}/layers/latents_norm", stacked=True)),
    (rf"{_B}\.0\.q_layer_norm\.(?P<leaf>weight|bias)",
     _norm(f"{RESAMPLER}/layers/attention/query_norm", stacked=True)),
    (rf"{_B}\.0\.k_layer_norm\.(?P<leaf>weight|bias)",
     _norm(f"{RESAMPLER}/layers/attention/key_norm", stacked=True)),
    *((rf"{_B}\.0\.{src}_proj\.weight",
       mapping.to(f"{RESAMPLER}/layers/attention/{ours}/w@{{layer}}", _T))
      for src, ours in (("q", "query"), ("k", "key"), ("v", "value"), ("output", "output"))),
    (rf"{_B}\.1\.ln\.(?P<leaf>weight|bias)", _norm(f"{RESAMPLER}/layers/ffw_norm", stacked=True)),
    (rf"{_B}\.1\.fc\.weight", mapping.to(f"{RESAMPLER}/layers/ffw/ffw_in/w@{{layer}}", _T)),
    (rf"{_B}\.1\.c_proj\.weight", mapping.to(f"{RESAMPLER}/layers/ffw/ffw_out/w@{{layer}}", _T)),
)


# transformers' IdeficsConfig / IdeficsVisionConfig / IdeficsPerceiverConfig defaults: what
# a config.json it wrote leaves out.
_DEFAULTS = dict(vocab_size=32000, additional_vocab_size=0, hidden_size=4096,
                 intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 hidden_act="silu", alpha_type="float", rms_norm_eps=1e-6, eos_token_id=2,
                 tie_word_embeddings=False, cross_layer_interval=1, qk_layer_norms=False,
                 use_resampler=False)
_VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14,
                        num_hidden_layers=32, num_attention_heads=16, hidden_act="gelu",
                        layer_norm_eps=1e-5)
_PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                           resampler_head_dim=96, qk_layer_norms_perceiver=False)


def read_config(source: str) -> dict:
  """IDEFICS' config.json with transformers' defaults for what it leaves out."""
  hf = families.read_hf_config(source)
  if hf.get("model_type") != "idefics":
    raise CheckpointError(f"{source} holds a {hf.get('model_type')!r} model, not IDEFICS "
                          f"(model_type 'idefics': IdeficsForVisionText2Text)")
  hf = _DEFAULTS | hf
  hf["vision_config"] = _VISION_DEFAULTS | dict(hf.get("vision_config") or {})
  hf["perceiver_config"] = _PERCEIVER_DEFAULTS | dict(hf.get("perceiver_config") or {})
  if hf["tie_word_embeddings"]:
    raise lm_rules.unsupported("tie_word_embeddings", True, "idefics")
  return hf


def _tokenizer_ids(source: str, base_vocab: int, rows: int, eos: int) -> tuple[int, int]:
  """(<image> id, <EOC> id) from the checkpoint's tokenizer.json."""
  path = os.path.join(source, "tokenizer.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{source} has no tokenizer.json (IDEFICS' tokenizer names its "
                          f"<image> token)")
  with open(path) as f:
    added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
  image = added.get("<image>")
  if image is None or not base_vocab <= image < rows:
    raise CheckpointError(f"{path}: <image> is {image}, expected one of the model's additional "
                          f"ids {base_vocab}..{rows - 1}")
  eoc = added.get("<end_of_utterance>")
  return image, eoc if eoc is not None and eoc < rows else eos


def _lm_config(hf: dict, source: str) -> dict:
  """LLaMA's fields (families.py's llama reader on IDEFICS' text config)."""
  text = {k: hf[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                             "intermediate_size", "vocab_size", "hidden_act") if k in hf}
  text |= dict(rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=False,
               rope_theta=10_000.0, model_type="llama")
  try:
    fields = families.FAMILIES["llama"].config_fn(text)
  except KeyError as e:
    raise CheckpointError(f"{source}/config.json has no {e.args[0]!r}") from None
  fields.pop("vocab_size")
  return fields


def load_idefics(source: str, *, pad_vocab_multiple: int = 128, vit_activation: str = "",
                 dtype: Optional[Any] = None, progress: bool = False
                 ) -> tuple[dict, dict, dict]:
  """(params {module: {name: array}}, model.json fields, report) of an IDEFICS folder
  (config.json, *.safetensors, tokenizer.json). `dtype`: the frozen towers' (None: as stored)."""
  hf = read_config(source)
  ckpt = SafetensorsCheckpoint(source)
  base, extra = int(hf["vocab_size"]), int(hf.get("additional_vocab_size", 0))
  if extra < 1:
    raise CheckpointError(f"{source}: additional_vocab_size={extra}; IDEFICS keeps <image> in "
                          "its additional rows")
  rows = base + extra
  eos = hf.get("eos_token_id", 2)
  image_id, eoc_id = _tokenizer_ids(source, base, rows, eos)
  num_layers, every = int(hf["num_hidden_layers"]), int(hf.get("cross_layer_interval", 1))
  if num_layers % every:
    raise CheckpointError(f"cross_layer_interval={every} does not divide num_hidden_layers="
                          f"{num_layers} (IDEFICS has num_hidden_layers // interval gated layers)")
  lm_fields = _lm_config(hf, source)
  padded = -(-rows // pad_vocab_multiple) * pad_vocab_multiple
  lm_fields["valid_vocab_size"] = rows if padded != rows else 0
  dim, heads = lm_fields["dim"], lm_fields["num_heads"]
  alpha = hf.get("alpha_type", "float")
  if alpha not in ("float", "vector"):
    raise lm_rules.unsupported("alpha_type", alpha, "idefics")
  xattn = dict(every=every, offset=0, num_heads=heads, key_size=dim // heads, ffw_mult=4,
               only_attend_immediate_media=True, media_norm=False,
               ffw_activation=lm_fields["activation"], norm="rms",
               norm_eps=float(hf.get("rms_norm_eps", 1e-6)), ffw="gated",
               ffw_size=int(hf["intermediate_size"]),
               gate="vector" if alpha == "vector" else "scalar",
               qk_norm="rms" if hf.get("qk_layer_norms", False) else "",
               no_media_after_id=int(eos))

  # The vision tower: CLIP names under model.vision_model (its config: vision_config).
  vision_tensors = {name[len("model."):]: np.asarray(value) for name, value in
                    ckpt.items([n for n in ckpt.tensors if n.startswith("model.vision_model.")])}
  if not vision_tensors:
    raise CheckpointError(f"{source} has no model.vision_model.* tensors")
  vit_params, vit_fields = vision.clip_vit_params(
      vision_tensors, source, activation=vit_activation, output="tokens",
      image_size=int(hf["vision_config"]["image_size"]), hf_config=hf["vision_config"])
  width = vit_fields["vision"]["vit"]["width"]

  # The resampler (or none): IDEFICS' perceiver_config.
  perceiver = hf["perceiver_config"]
  resampler_tensors = {name[len("model.perceiver_resampler."):]: value for name, value in
                       ckpt.items([n for n in ckpt.tensors
                                   if n.startswith("model.perceiver_resampler.")])}
  if hf["use_resampler"]:
    resampler = mapping.convert(resampler_tensors.items(), RESAMPLER_RULES, what="resampler",
                                prefix="model.perceiver_resampler.")
    latents = resampler[RESAMPLER]["latents"]
    hidden = resampler[f"{RESAMPLER}/layers/ffw/ffw_in"]["w"].shape[-1]
    resampler_fields = dict(
        kind="perceiver", num_layers=int(perceiver["resampler_depth"]), dim=width,
        num_heads=int(perceiver["resampler_n_heads"]),
        key_size=int(perceiver["resampler_head_dim"]), ffw_mult=hidden // width,
        num_latents=int(latents.shape[0]), num_time_embeddings=0, input_projection=False,
        ffw_activation="relu",
        qk_norm="layer" if perceiver["qk_layer_norms_perceiver"] else "")
  else:
    if resampler_tensors:
      raise CheckpointError(f"{source}: use_resampler is false but it holds "
                            f"model.perceiver_resampler.* tensors")
    resampler, resampler_fields = {}, dict(kind="none", dim=width, num_time_embeddings=0,
                                           input_projection=False)

  blocks = []
  for j in range(num_layers // every):
    head = f"model.gated_cross_attn_layers.{j}."
    names = [n for n in ckpt.tensors if n.startswith(head)]
    if not names:
      raise CheckpointError(f"{source} has no {head}* (gated layer {j} of "
                            f"{num_layers // every})")
    blocks.append(mapping.convert(((n[len(head):], v) for n, v in ckpt.items(names)),
                                  XATTN_RULES, what=f"gated layer {j}", prefix=head))
  strays = sorted(n for n in ckpt.tensors if n.startswith("model.gated_cross_attn_layers.")
                  and int(n.split(".")[2]) >= num_layers // every)
  if strays:
    raise CheckpointError(f"{source}: {strays[0]} is past the {num_layers // every} gated layers")
  xattn_params = loading.stack_xattn_blocks(blocks, num_layers, every, 0)

  new_ids = list(range(base, rows))
  fields = {"vocab_size": padded, "image_token_id": image_id, "eoc_token_id": int(eoc_id),
            "new_token_ids": new_ids, "image_size": vit_fields["image_size"], "lm": lm_fields,
            "xattn": xattn, "resampler": resampler_fields, "vision": vit_fields["vision"],
            "idefics": {"vocab_size": base, "additional_vocab_size": extra,
                        "eos_token_id": int(eos), "image_token_id": image_id,
                        "cross_layer_interval": every,
                        "use_resampler": bool(hf.get("use_resampler", False))}}
  model = config_base.with_imported_flamingo(config_base.model_config(
      vocab_size=padded, image_size=fields["image_size"], vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=1, dim=1, num_heads=1, ffw_size=1),
      xattn_every=1, xattn_num_heads=1), fields)

  # The LM: LLaMA's loader on its own tensors; the additional rows are the new-token ones.
  additional = {k: np.asarray(ckpt.read(k)) for k in
                ("model.embed_tokens.additional_embedding.weight",
                 "lm_head.additional_fc.weight") if k in ckpt.tensors}
  if len(additional) != 2:
    raise CheckpointError(f"{source} lacks model.embed_tokens.additional_embedding.weight or "
                          f"lm_head.additional_fc.weight (the decoupled rows)")
  lm_only = OverlaidCheckpoint(ckpt, {}, dropped=tuple(n for n in ckpt.tensors
                                                     if not _LM_NAMES.match(n)))
  lm_params, stats = loading.load_lm(lm_only, model, "llama", dtype=dtype, progress=progress)
  lm_params = jax.device_get(lm_params)
  lm_params[f"{LM}/new_token_embed"]["embeddings"] = additional[
      "model.embed_tokens.additional_embedding.weight"].astype(np.float32)
  lm_params[f"{LM}/new_token_unembed"]["w"] = additional[
      "lm_head.additional_fc.weight"].astype(np.float32).T
  params = {**lm_params, **resampler, **vit_params, **xattn_params}
  loading.check_complete(params, models.param_shapes(model))
  count = sum(int(np.prod(v.shape)) for leaves in params.values() for v in leaves.values())
  report = {"parameters": count, "tensors": len(ckpt.tensors), "lm_seconds": stats["seconds"],
            "warnings": []}
  return params, fields, report
