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
  chinchilla our own layout (export_lm), round trip nothing
"""

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Optional

from flamingo_jax.weights import mapping
from flamingo_jax.weights.safetensors_io import CheckpointError

# (tensor, xp, Context, groups of the name's regex match) -> {logical name: array}.
Transform = mapping.Transform


@dataclasses.dataclass(frozen=True)
class Context:
  """What transforms need to know of the target model."""
  vocab_size: int          # rows of our (padded) token table
  num_heads: int
  num_kv_heads: int
  key_size: int


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  config_fn: Callable[[dict], dict]       # HF config.json -> config.model.lm fields (+ vocab)
  rules: tuple[tuple[str, Transform], ...]
  ignored: tuple[str, ...] = ()           # buffers some checkpoints carry (rotary tables)
  # Source names of the token table and (untied) output table: OpenFlamingo resizes and
  # trains the first, and keeps the second beside it (weights/openflamingo.py).
  input_embedding: str = ""
  output_embedding: str = ""


# --- transforms -------------------------------------------------------------------------

def _pad_rows(x, xp, rows):
  return xp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _new_token_rows(embeddings, xp):
  """<image>/<EOC> rows start at the mean of the pretrained rows (trainable, float32)."""
  mean = xp.mean(embeddings, axis=0, dtype=xp.float32)    # accumulates without a float32 copy
  return xp.stack([mean, mean])                                        # [2, D]


def _embed(x, xp, ctx, groups, *, tied=False):
  del groups
  out = {"token_embed/embeddings": _pad_rows(x, xp, ctx.vocab_size),
         "new_token_embed/embeddings": _new_token_rows(x, xp)}
  if tied:                          # new logit columns: the mean of the tied rows, as above
    out["new_token_unembed/w"] = _new_token_rows(x, xp).T             # [D, 2]
  return out


def _unembed(x, xp, ctx, groups):
  """torch lm_head [V, D] -> our unembed w [D, V_padded]."""
  del groups
  return {"unembed/w": _pad_rows(x, xp, ctx.vocab_size).T,
          "new_token_unembed/w": _new_token_rows(x, xp).T}


def _to(name: str, *, transpose: bool = False, add: float = 0.0) -> Transform:
  """One tensor -> one parameter; torch Linear weights [out, in] transpose to our [in, out]."""
  def transform(x, xp, ctx, groups):
    del xp, ctx, groups
    if transpose:
      x = x.T
    if add:
      x = (x.astype("float32") + add).astype(x.dtype)
    return {name: x}
  return transform


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


_L = r"(?P<layer>\d+)"


def _llama_rules(prefix: str, *, norm_add: float = 0.0, tied: bool = False):
  block = f"{prefix}layers\\.{_L}\\."
  rules = [
      (rf"{prefix}embed_tokens\.weight",
       lambda x, xp, ctx, groups: _embed(x, xp, ctx, groups, tied=tied)),
      (rf"{prefix}norm\.weight", _to("final_norm/scale", add=norm_add)),
      (rf"{block}input_layernorm\.weight", _to("attention_norm/scale", add=norm_add)),
      (rf"{block}post_attention_layernorm\.weight", _to("ffw_norm/scale", add=norm_add)),
      (rf"{block}mlp\.gate_proj\.weight", _to("ffw/ffw_gate/w", transpose=True)),
      (rf"{block}mlp\.up_proj\.weight", _to("ffw/ffw_in/w", transpose=True)),
      (rf"{block}mlp\.down_proj\.weight", _to("ffw/ffw_out/w", transpose=True)),
      (rf"{block}mlp\.gate_proj\.bias", _to("ffw/ffw_gate/b")),
      (rf"{block}mlp\.up_proj\.bias", _to("ffw/ffw_in/b")),
      (rf"{block}mlp\.down_proj\.bias", _to("ffw/ffw_out/b")),
      (rf"{block}self_attn\.o_proj\.weight", _to("self_attention/output/w", transpose=True)),
      (rf"{block}self_attn\.o_proj\.bias", _to("self_attention/output/b")),
  ]
  for src, ours in (("q", "query"), ("k", "key"), ("v", "value")):
    rules.append((rf"{block}self_attn\.{src}_proj\.weight",
                  _to(f"self_attention/{ours}/w", transpose=True)))
    rules.append((rf"{block}self_attn\.{src}_proj\.bias", _to(f"self_attention/{ours}/b")))
  if not tied:
    rules.append((r"lm_head\.weight", _unembed))
  return tuple(rules)


def _neox_rules():
  block = rf"gpt_neox\.layers\.{_L}\."
  rules = [
      (r"gpt_neox\.embed_in\.weight", _embed),
      (r"embed_out\.weight", _unembed),
      (r"gpt_neox\.final_layer_norm\.weight", _to("final_norm/scale")),
      (r"gpt_neox\.final_layer_norm\.bias", _to("final_norm/offset")),
      (rf"{block}attention\.query_key_value\.weight", _neox_qkv("w")),
      (rf"{block}attention\.query_key_value\.bias", _neox_qkv("b")),
      (rf"{block}attention\.dense\.weight", _to("self_attention/output/w", transpose=True)),
      (rf"{block}attention\.dense\.bias", _to("self_attention/output/b")),
      (rf"{block}mlp\.dense_h_to_4h\.weight", _to("ffw/ffw_in/w", transpose=True)),
      (rf"{block}mlp\.dense_h_to_4h\.bias", _to("ffw/ffw_in/b")),
      (rf"{block}mlp\.dense_4h_to_h\.weight", _to("ffw/ffw_out/w", transpose=True)),
      (rf"{block}mlp\.dense_4h_to_h\.bias", _to("ffw/ffw_out/b")),
  ]
  for src, ours in (("input_layernorm", "attention_norm"),
                    ("post_attention_layernorm", "ffw_norm")):
    rules.append((rf"{block}{src}\.weight", _to(f"{ours}/scale")))
    rules.append((rf"{block}{src}\.bias", _to(f"{ours}/offset")))
  return tuple(rules)


def _native_rules():
  """Our own names, one tensor per layer: `layers.3.self_attention.query.w` (export_lm)."""
  def same(x, xp, ctx, groups):
    del xp, ctx
    return {groups["logical"].replace(".", "/"): x}
  return ((rf"layers\.{_L}\.(?P<logical>.+)", same),
          (r"(?P<logical>(token_embed|new_token_embed|new_token_unembed|final_norm|unembed)"
           r"\..+)", same))


# --- config.json -> config.model.lm ------------------------------------------------------

# Hugging Face activation names -> ours (attention.ACTIVATIONS).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu_exact",
                "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu_fast": "gelu",
                "relu": "relu"}


def unsupported(option: str, value: Any, family: str) -> CheckpointError:
  return CheckpointError(f"{family} checkpoint option {option}={value!r} is not supported "
                         "(it would be a silent approximation); no import was written")


def _activation(hf: dict, key: str, family: str) -> str:
  name = hf.get(key)
  if name not in _ACTIVATIONS:
    raise unsupported(key, name, family)
  return _ACTIVATIONS[name]


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
      ffw="gated", activation=_activation(hf, "hidden_act", "llama"),
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
      ffw="mlp", activation=_activation(hf, "hidden_act", "gpt_neox"), num_kv_heads=0,
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
  if act not in _ACTIVATIONS:
    raise unsupported("hidden_activation", act, "gemma")
  kv = hf.get("num_key_value_heads") or lm["num_heads"]
  if not hf.get("tie_word_embeddings", True):
    raise unsupported("tie_word_embeddings", False, "gemma")
  return lm | dict(
      norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_bias=False,
      ffw="gated", activation=_ACTIVATIONS[act],
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
