"""Decoder-LM families: a Hugging Face `config.json` -> `config.model.lm`, and a name map.

Every family is data: `Family(model_types, config_fn, rules, ignored)`. Its rules are the
importers' one mechanism (mapping.py): a source tensor name (a regex; `(?P<layer>\\d+)` for
per-layer tensors) -> a transform that returns {our logical name: array}; logical names are
a block's module path relative to a decoder block (`self_attention/query/w`) or to the LM
(`token_embed/embeddings`), and loading.py puts them at our layer-stacked paths. Transforms are written against the array API (`xp` is numpy
when loading, jax.numpy under `jax.eval_shape` when checking shapes before any read).

  family     source layouts                         what differs from Chinchilla
  llama      Llama 2/3, Mistral, TinyLlama          SwiGLU, GQA, rms eps, sliding window
  gpt_neox   Pythia, RedPajama-INCITE               layer norm + bias, exact GELU, biases,
                                                    fused per-head qkv, partial rotary,
                                                    parallel residual
  gemma      Gemma 1                                GeGLU (tanh), RMSNorm scale 1 + w, tied
                                                    embeddings, embeddings x sqrt(D)
  mpt        MPT-7B, -30B (transformers' names)     ALiBi, no rotary, fused Wqkv, no biases
                                                    (no_bias), clip_qkv, qk_ln, exact GELU,
                                                    expansion_ratio, tied embeddings
  mosaic_gpt MPT-1B-RedPajama-200b (MosaicGPT)      as mpt, with biases and qk_ln
  chinchilla our own layout (export_lm), round trip nothing
"""

import json
import math
import os
import re
from typing import Optional

from flamingo_jax.weights import mapping
from flamingo_jax.weights import mpt
from flamingo_jax.weights.lm_rules import (ACTIVATIONS, LAYER, Family, Transform,
                                           activation, embed, to, unembed, unsupported)
from flamingo_jax.weights.safetensors_io import CheckpointError


def _neox_qkv(param: str) -> Transform:
  """GPT-NeoX's fused query_key_value, laid out per head as [H, (q, k, v), K] rows."""
  def transform(x, xp, ctx, groups):
    del xp, groups
    h, k = ctx.num_heads, ctx.key_size
    if param == "w":
      x = x.reshape(h, 3, k, x.shape[-1])                              # [H, 3, K, D]
      split = lambda i: x[:, i].reshape(h * k, -1).T                   # [D, H*K]
    else:
      x = x.reshape(h, 3, k)                                           # [H, 3, K]
      split = lambda i: x[:, i].reshape(h * k)
    return {f"self_attention/{n}/{param}": split(i)
            for i, n in enumerate(("query", "key", "value"))}
  return transform




def _llama_rules(prefix: str, *, norm_add: float = 0.0, tied: bool = False):
  block = f"{prefix}layers\\.{LAYER}\\."
  rules = [
      (rf"{prefix}embed_tokens\.weight",
       lambda x, xp, ctx, groups: embed(x, xp, ctx, groups, tied=tied)),
      (rf"{prefix}norm\.weight", to("final_norm/scale", add=norm_add)),
      (rf"{block}input_layernorm\.weight", to("attention_norm/scale", add=norm_add)),
      (rf"{block}post_attention_layernorm\.weight", to("ffw_norm/scale", add=norm_add)),
      (rf"{block}mlp\.gate_proj\.weight", to("ffw/ffw_gate/w", transpose=True)),
      (rf"{block}mlp\.up_proj\.weight", to("ffw/ffw_in/w", transpose=True)),
      (rf"{block}mlp\.down_proj\.weight", to("ffw/ffw_out/w", transpose=True)),
      (rf"{block}mlp\.gate_proj\.bias", to("ffw/ffw_gate/b")),
      (rf"{block}mlp\.up_proj\.bias", to("ffw/ffw_in/b")),
      (rf"{block}mlp\.down_proj\.bias", to("ffw/ffw_out/b")),
      (rf"{block}self_attn\.o_proj\.weight", to("self_attention/output/w", transpose=True)),
      (rf"{block}self_attn\.o_proj\.bias", to("self_attention/output/b")),
  ]
  for src, ours in (("q", "query"), ("k", "key"), ("v", "value")):
    rules.append((rf"{block}self_attn\.{src}_proj\.weight",
                  to(f"self_attention/{ours}/w", transpose=True)))
    rules.append((rf"{block}self_attn\.{src}_proj\.bias", to(f"self_attention/{ours}/b")))
  if not tied:
    rules.append((r"lm_head\.weight", unembed))
  return tuple(rules)


def _neox_rules():
  block = rf"gpt_neox\.layers\.{LAYER}\."
  rules = [
      (r"gpt_neox\.embed_in\.weight", embed),
      (r"embed_out\.weight", unembed),
      (r"gpt_neox\.final_layer_norm\.weight", to("final_norm/scale")),
      (r"gpt_neox\.final_layer_norm\.bias", to("final_norm/offset")),
      (rf"{block}attention\.query_key_value\.weight", _neox_qkv("w")),
      (rf"{block}attention\.query_key_value\.bias", _neox_qkv("b")),
      (rf"{block}attention\.dense\.weight", to("self_attention/output/w", transpose=True)),
      (rf"{block}attention\.dense\.bias", to("self_attention/output/b")),
      (rf"{block}mlp\.dense_h_to_4h\.weight", to("ffw/ffw_in/w", transpose=True)),
      (rf"{block}mlp\.dense_h_to_4h\.bias", to("ffw/ffw_in/b")),
      (rf"{block}mlp\.dense_4h_to_h\.weight", to("ffw/ffw_out/w", transpose=True)),
      (rf"{block}mlp\.dense_4h_to_h\.bias", to("ffw/ffw_out/b")),
  ]
  for src, ours in (("input_layernorm", "attention_norm"),
                    ("post_attention_layernorm", "ffw_norm")):
    rules.append((rf"{block}{src}\.weight", to(f"{ours}/scale")))
    rules.append((rf"{block}{src}\.bias", to(f"{ours}/offset")))
  return tuple(rules)


def _native_rules():
  """Our own names, one tensor per layer: `layers.3.self_attention.query.w` (export_lm)."""
  def same(x, xp, ctx, groups):
    del xp, ctx
    return {groups["logical"].replace(".", "/"): x}
  return ((rf"layers\.{LAYER}\.(?P<logical>.+)", same),
          (r"(?P<logical>(token_embed|new_token_embed|new_token_unembed|final_norm|unembed)"
           r"\..+)", same))


# --- config.json -> config.model.lm ------------------------------------------------------

def _common(hf: dict, family: str) -> dict:
  for key in ("rope_scaling", "alibi", "attn_logit_softcapping", "final_logit_softcapping",
              "qk_layernorm", "use_qk_norm"):
    if hf.get(key) not in (None, False, {}):
      if key == "rope_scaling" and hf[key].get("rope_type", hf[key].get("type")) == "default":
        continue
      raise unsupported(key, hf[key], family)
  heads = hf["num_attention_heads"]
  return dict(num_layers=hf["num_hidden_layers"], dim=hf["hidden_size"], num_heads=heads,
              key_size=hf.get("head_dim") or hf["hidden_size"] // heads,
              ffw_size=hf["intermediate_size"], vocab_size=hf["vocab_size"])


def _llama_config(hf: dict) -> dict:
  lm = _common(hf, "llama")
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  kv = hf.get("num_key_value_heads") or lm["num_heads"]
  return lm | dict(
      norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_bias=False,
      ffw="gated", activation=activation(hf, "hidden_act", "llama"),
      num_kv_heads=0 if kv == lm["num_heads"] else kv,
      rotary_max_wavelength=float(hf.get("rope_theta", 10_000.0)), rotary_fraction=1.0,
      rotary_layout="half",
      qkv_bias=bool(hf.get("attention_bias", False)),
      output_bias=bool(hf.get("attention_bias", False)),
      ffw_bias=bool(hf.get("mlp_bias", False)), parallel_residual=False,
      sliding_window=int(window or 0),
      tied_embeddings=bool(hf.get("tie_word_embeddings", False)), embed_multiplier=1.0)


def _neox_config(hf: dict) -> dict:
  lm = _common(hf, "gpt_neox")
  bias = bool(hf.get("attention_bias", True))
  return lm | dict(
      norm="layer", norm_eps=float(hf.get("layer_norm_eps", 1e-5)), norm_bias=True,
      ffw="mlp", activation=activation(hf, "hidden_act", "gpt_neox"), num_kv_heads=0,
      rotary_max_wavelength=float(hf.get("rotary_emb_base", hf.get("rope_theta", 10_000.0))),
      rotary_fraction=float(hf.get("rotary_pct", 1.0)), rotary_layout="half",
      qkv_bias=bias, output_bias=bias, ffw_bias=True,
      parallel_residual=bool(hf.get("use_parallel_residual", True)), sliding_window=0,
      tied_embeddings=bool(hf.get("tie_word_embeddings", False)), embed_multiplier=1.0)


def _gemma_config(hf: dict) -> dict:
  lm = _common(hf, "gemma")
  # Transformers runs Gemma with the tanh GELU whatever `hidden_act` says, unless
  # `hidden_activation` is given.
  act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
  if act not in ACTIVATIONS:
    raise unsupported("hidden_activation", act, "gemma")
  kv = hf.get("num_key_value_heads") or lm["num_heads"]
  if not hf.get("tie_word_embeddings", True):
    raise unsupported("tie_word_embeddings", False, "gemma")
  return lm | dict(
      norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_bias=False,
      ffw="gated", activation=ACTIVATIONS[act],
      num_kv_heads=0 if kv == lm["num_heads"] else kv,
      rotary_max_wavelength=float(hf.get("rope_theta", 10_000.0)), rotary_fraction=1.0,
      rotary_layout="half",
      qkv_bias=bool(hf.get("attention_bias", False)),
      output_bias=bool(hf.get("attention_bias", False)), ffw_bias=False,
      parallel_residual=False, sliding_window=0, tied_embeddings=True,
      embed_multiplier=math.sqrt(hf["hidden_size"]))


def _native_config(hf: dict) -> dict:
  """export_lm's config.json holds the LM part of `config.model` (ids, padding too)."""
  return dict(hf["model"]["lm"], vocab_size=hf["model"]["vocab_size"])


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama", "mistral"), _llama_config, _llama_rules("model\\."),
                    ignored=(r".*\.rotary_emb\.inv_freq",),
                    input_embedding="model.embed_tokens.weight",
                    output_embedding="lm_head.weight"),
    "gpt_neox": Family("gpt_neox", ("gpt_neox",), _neox_config, _neox_rules(),
                       ignored=(r".*\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",),
                       input_embedding="gpt_neox.embed_in.weight",
                       output_embedding="embed_out.weight"),
    "gemma": Family("gemma", ("gemma",), _gemma_config,
                    _llama_rules("model\\.", norm_add=1.0, tied=True),
                    input_embedding="model.embed_tokens.weight"),
    "mpt": mpt.MPT,
    "mosaic_gpt": mpt.MOSAIC_GPT,
    "chinchilla": Family("chinchilla", ("chinchilla",), _native_config, _native_rules()),
}


def family_for(kind: str) -> Family:
  if kind not in FAMILIES:
    raise CheckpointError(f"unknown LM kind {kind!r}; supported: {sorted(FAMILIES)}")
  return FAMILIES[kind]


def read_hf_config(hf_dir: str) -> dict:
  if not os.path.exists(hf_dir):
    raise CheckpointError(f"checkpoint {hf_dir!r} does not exist")
  path = os.path.join(hf_dir, "config.json") if os.path.isdir(hf_dir) else hf_dir
  if not os.path.exists(path):
    raise CheckpointError(f"no config.json in {hf_dir!r} (expected a Hugging Face model folder)")
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def lm_config_from_hf(hf_dir: str, kind: Optional[str] = None) -> tuple[str, dict]:
  """(kind, fields) from `hf_dir/config.json`: the `config.model.lm` fields it implies plus
  `vocab_size` (the checkpoint's own rows, before new tokens and padding).

  `kind` given: the checkpoint's `model_type` must belong to it. Unsupported model types
  and options are errors that name them.
  """
  hf = read_hf_config(hf_dir)
  model_type = hf.get("model_type")
  matching = [f for f in FAMILIES.values() if model_type in f.model_types]
  if not matching:
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise CheckpointError(f"model_type {model_type!r} in {hf_dir} is not supported "
                          f"(supported: {supported})")
  family = matching[0]
  if kind is not None and kind != family.name:
    raise CheckpointError(f"--kind={kind} but {hf_dir} holds a {model_type!r} model "
                          f"(family {family.name!r})")
  try:
    return family.name, family.config_fn(hf)
  except KeyError as e:
    raise CheckpointError(f"{hf_dir}/config.json has no {e.args[0]!r} "
                          f"(needed for a {family.name} model)") from None


def match(family: Family, name: str) -> Optional[tuple[Optional[int], Transform, dict]]:
  """(layer or None, transform, regex groups) for a source tensor; None if no rule names it."""
  found = mapping.match(family.rules, name)
  if found is None:
    return None
  transform, groups = found
  layer = groups.get("layer")
  return (int(layer) if layer is not None else None), transform, groups


def is_ignored(family: Family, name: str) -> bool:
  return any(re.fullmatch(p, name) for p in family.ignored)
