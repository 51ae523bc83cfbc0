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
  tied: bool = False       # the token table is also the output table
  new_tokens: int = 2      # trainable rows after the table (<image>, <EOC>; IDEFICS' extras)


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


def _new_token_rows(embeddings, xp, count: int):
  """New tokens' rows (<image>/<EOC>) start at the mean of the pretrained rows (trainable,
  float32)."""
  mean = xp.mean(embeddings, axis=0, dtype=xp.float32)    # accumulates without a float32 copy
  return xp.stack([mean] * count)                                      # [count, D]


def _embed(x, xp, ctx, groups, *, tied=False):
  del groups
  out = {"token_embed/embeddings": _pad_rows(x, xp, ctx.vocab_size),
         "new_token_embed/embeddings": _new_token_rows(x, xp, ctx.new_tokens)}
  if tied:                          # new logit columns: the mean of the tied rows, as above
    out["new_token_unembed/w"] = _new_token_rows(x, xp, ctx.new_tokens).T   # [D, count]
  return out


def _unembed(x, xp, ctx, groups):
  """torch lm_head [V, D] -> our unembed w [D, V_padded]."""
  del groups
  return {"unembed/w": _pad_rows(x, xp, ctx.vocab_size).T,
          "new_token_unembed/w": _new_token_rows(x, xp, ctx.new_tokens).T}


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


def _mpt_qkv(param: str) -> Transform:
  """MPT's fused Wqkv [3·D, D] (rows: all query heads, then keys, then values)."""
  def transform(x, xp, ctx, groups):
    del xp, ctx, groups
    q, k, v = (x[i * x.shape[0] // 3:(i + 1) * x.shape[0] // 3] for i in range(3))
    fix = (lambda a: a.T) if param == "w" else (lambda a: a)
    return {f"self_attention/{n}/{param}": fix(a) for n, a in
            (("query", q), ("key", k), ("value", v))}
  return transform


def _embed_tied_by_config(x, xp, ctx, groups):
  return _embed(x, xp, ctx, groups, tied=ctx.tied)


def _mpt_rules(*, norm_1: str, norm_2: str, up: str, down: str, final: str):
  """MPT (transformers / llm-foundry) and MosaicGPT (MPT-1B) names; the block's pieces differ."""
  block = rf"transformer\.blocks\.{_L}\."
  rules = [
      (r"transformer\.wte\.weight", _embed_tied_by_config),
      (r"lm_head\.weight", _unembed),
      (r"transformer\.wpe\.weight", _unsupported_tensor(
          "learned absolute positions (transformer.wpe)")),
      (rf"{block}attn\.Wqkv\.weight", _mpt_qkv("w")),
      (rf"{block}attn\.Wqkv\.bias", _mpt_qkv("b")),
      (rf"{block}attn\.out_proj\.weight", _to("self_attention/output/w", transpose=True)),
      (rf"{block}attn\.out_proj\.bias", _to("self_attention/output/b")),
      (rf"{block}{up}\.weight", _to("ffw/ffw_in/w", transpose=True)),
      (rf"{block}{up}\.bias", _to("ffw/ffw_in/b")),
      (rf"{block}{down}\.weight", _to("ffw/ffw_out/w", transpose=True)),
      (rf"{block}{down}\.bias", _to("ffw/ffw_out/b")),
  ]
  for src, ours in ((norm_1, "attention_norm"), (norm_2, "ffw_norm"),
                    ("attn.q_ln", "self_attention/query_norm"),
                    ("attn.k_ln", "self_attention/key_norm")):
    src = src.replace(".", "\\.")
    rules.append((rf"{block}{src}\.weight", _to(f"{ours}/scale")))
    rules.append((rf"{block}{src}\.bias", _to(f"{ours}/offset")))
  final = final.replace(".", "\\.")
  rules += [(rf"{final}\.weight", _to("final_norm/scale")),
            (rf"{final}\.bias", _to("final_norm/offset"))]
  return tuple(rules)


def _unsupported_tensor(what: str) -> Transform:
  def transform(x, xp, ctx, groups):
    raise CheckpointError(f"{what} is not supported (it would be a silent approximation); no "
                          f"import was written")
  return transform


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


# transformers' MptAttentionConfig defaults: what a config.json it wrote leaves out.
_MPT_ATTENTION_DEFAULTS = dict(attn_type="multihead_attention", clip_qkv=None, softmax_scale=None,
                               prefix_lm=False, qk_ln=False, attn_uses_sequence_id=False,
                               alibi=True, alibi_bias_max=8)
_MPT_NORMS = {"layernorm": "layer", "low_precision_layernorm": "layer", "rmsnorm": "rms",
              "low_precision_rmsnorm": "rms"}


def _mpt_logit_scale(value: Any, dim: int, family: str) -> float:
  if value is None:
    return 1.0
  if value == "inv_sqrt_d_model":
    return 1.0 / math.sqrt(dim)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  raise unsupported("logit_scale", value, family)


def _mpt_activation(ffn: dict) -> str:
  act = ffn.get("ffn_act_fn") or {"name": "gelu", "approximate": "none"}
  name, approximate = act.get("name"), act.get("approximate", "none")
  if name == "gelu" and approximate in ("none", "tanh"):
    return "gelu_exact" if approximate == "none" else "gelu"     # ours: "gelu" is tanh
  if name in ("silu", "relu"):
    return name
  raise unsupported("ffn_config.ffn_act_fn", act, "mpt")


def _mpt_lm(hf: dict, *, family: str, alibi: bool, alibi_bias_max: float, clip_qkv: Any,
            qk_ln: bool, softmax_scale: Any, bias: bool, norm: str, ffw_size: int,
            activation: str, tied: bool) -> dict:
  d, heads = hf["d_model"], hf["n_heads"]
  if d % heads:
    raise CheckpointError(f"{family} config: d_model={d} is not divisible by n_heads={heads}")
  return dict(
      num_layers=hf["n_layers"], dim=d, num_heads=heads, key_size=d // heads,
      ffw_size=ffw_size, vocab_size=hf["vocab_size"],
      norm=norm, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), norm_bias=bias,
      ffw="mlp", activation=activation, num_kv_heads=0,
      rotary_max_wavelength=10_000.0, rotary_fraction=0.0, rotary_layout="half",
      qkv_bias=bias, output_bias=bias, ffw_bias=bias, parallel_residual=False,
      sliding_window=0, tied_embeddings=tied, embed_multiplier=1.0,
      alibi_bias_max=float(alibi_bias_max) if alibi else 0.0,
      clip_qkv=float(clip_qkv or 0.0), qk_norm=bool(qk_ln),
      attention_scale=float(softmax_scale or 0.0),
      logit_scale=_mpt_logit_scale(hf.get("logit_scale"), d, family))


def _mpt_config(hf: dict) -> dict:
  """MosaicML's MPT as transformers / llm-foundry write its config.json (MPT-7B, -30B)."""
  attn = dict(_MPT_ATTENTION_DEFAULTS) | dict(hf.get("attn_config") or {})
  for key in ("prefix_lm", "attn_uses_sequence_id", "qk_gn", "rope"):
    if attn.get(key):
      raise unsupported(f"attn_config.{key}", attn[key], "mpt")
  if attn["attn_type"] != "multihead_attention":
    raise unsupported("attn_config.attn_type", attn["attn_type"], "mpt")
  ffn = dict(hf.get("ffn_config") or {})
  if ffn.get("ffn_type", "mptmlp") != "mptmlp":
    raise unsupported("ffn_config.ffn_type", ffn["ffn_type"], "mpt")
  norm_type = hf.get("norm_type", "low_precision_layernorm")
  if norm_type not in _MPT_NORMS:
    raise unsupported("norm_type", norm_type, "mpt")
  d = hf["d_model"]
  ffw_size = ffn.get("ffn_hidden_size") or hf.get("expansion_ratio", 4) * d
  if ffw_size != int(ffw_size):
    raise CheckpointError(f"mpt config: d_model * expansion_ratio = {ffw_size} is not an integer")
  return _mpt_lm(hf, family="mpt", alibi=bool(attn["alibi"]),
                 alibi_bias_max=attn["alibi_bias_max"], clip_qkv=attn["clip_qkv"],
                 qk_ln=attn["qk_ln"], softmax_scale=attn["softmax_scale"],
                 bias=not hf.get("no_bias", True), norm=_MPT_NORMS[norm_type],
                 ffw_size=int(ffw_size), activation=_mpt_activation(ffn),
                 tied=bool(hf.get("tie_word_embeddings", True)))


def _mosaic_gpt_config(hf: dict) -> dict:
  """MosaicGPT (model_type mosaic_gpt): MPT-1B-RedPajama-200b, OpenFlamingo-3B's LM. Biases
  everywhere, LayerNorms, an exact-GELU MLP of mlp_ratio, tied embeddings; its ALiBi slopes
  are MPT's for a power-of-two head count (and differ otherwise)."""
  heads = hf["n_heads"]
  if not hf.get("alibi", False):
    raise unsupported("alibi", False, "mosaic_gpt (learned absolute positions)")
  if heads & (heads - 1):
    raise unsupported("n_heads", heads, "mosaic_gpt with ALiBi (slopes for a head count that "
                      "is not a power of two)")
  return _mpt_lm(hf, family="mosaic_gpt", alibi=True,
                 alibi_bias_max=hf.get("alibi_bias_max", 8), clip_qkv=hf.get("attn_clip_qkv"),
                 qk_ln=hf.get("attn_qk_ln", False), softmax_scale=hf.get("softmax_scale"),
                 bias=True, norm="layer", ffw_size=hf.get("mlp_ratio", 4) * hf["d_model"],
                 activation="gelu_exact", tied=True)


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
    "mpt": Family("mpt", ("mpt",), _mpt_config,
                  _mpt_rules(norm_1="norm_1", norm_2="norm_2", up="ffn.up_proj",
                             down="ffn.down_proj", final="transformer.norm_f"),
                  input_embedding="transformer.wte.weight", output_embedding="lm_head.weight"),
    "mosaic_gpt": Family("mosaic_gpt", ("mosaic_gpt",), _mosaic_gpt_config,
                         _mpt_rules(norm_1="ln_1", norm_2="ln_2", up="mlp.mlp_up",
                                    down="mlp.mlp_down", final="transformer.ln_f"),
                         input_embedding="transformer.wte.weight"),
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
