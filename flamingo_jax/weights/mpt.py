"""MosaicML's MPT as an LM family: transformers' / llm-foundry's names (`mpt`: MPT-7B, -30B)
and MosaicGPT's (`mosaic_gpt`: MPT-1B-RedPajama-200b, OpenFlamingo-3B's LM).

ALiBi (alibi_bias_max), no rotary, a fused Wqkv, no biases (no_bias), clip_qkv, qk_ln over
all heads, softmax_scale, expansion_ratio, logit_scale, tied embeddings. prefix_lm,
attn_uses_sequence_id, other attention types and learned positions are one-line errors.
"""

import math
from typing import Any

from flamingo_jax.weights import lm_rules
from flamingo_jax.weights.lm_rules import Family, Transform, to, unembed, unsupported
from flamingo_jax.weights.safetensors_io import CheckpointError


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
  return lm_rules.embed(x, xp, ctx, groups, tied=ctx.tied)


def _mpt_rules(*, norm_1: str, norm_2: str, up: str, down: str, final: str):
  """MPT (transformers / llm-foundry) and MosaicGPT (MPT-1B) names; the block's pieces differ."""
  block = rf"transformer\.blocks\.{lm_rules.LAYER}\."
  rules = [
      (r"transformer\.wte\.weight", _embed_tied_by_config),
      (r"lm_head\.weight", unembed),
      (r"transformer\.wpe\.weight", lm_rules.unsupported_tensor(
          "learned absolute positions (transformer.wpe)")),
      (rf"{block}attn\.Wqkv\.weight", _mpt_qkv("w")),
      (rf"{block}attn\.Wqkv\.bias", _mpt_qkv("b")),
      (rf"{block}attn\.out_proj\.weight", to("self_attention/output/w", transpose=True)),
      (rf"{block}attn\.out_proj\.bias", to("self_attention/output/b")),
      (rf"{block}{up}\.weight", to("ffw/ffw_in/w", transpose=True)),
      (rf"{block}{up}\.bias", to("ffw/ffw_in/b")),
      (rf"{block}{down}\.weight", to("ffw/ffw_out/w", transpose=True)),
      (rf"{block}{down}\.bias", to("ffw/ffw_out/b")),
  ]
  for src, ours in ((norm_1, "attention_norm"), (norm_2, "ffw_norm"),
                    ("attn.q_ln", "self_attention/query_norm"),
                    ("attn.k_ln", "self_attention/key_norm")):
    src = src.replace(".", "\\.")
    rules.append((rf"{block}{src}\.weight", to(f"{ours}/scale")))
    rules.append((rf"{block}{src}\.bias", to(f"{ours}/offset")))
  final = final.replace(".", "\\.")
  rules += [(rf"{final}\.weight", to("final_norm/scale")),
            (rf"{final}\.bias", to("final_norm/offset"))]
  return tuple(rules)


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


MPT = Family("mpt", ("mpt",), _mpt_config,
              _mpt_rules(norm_1="norm_1", norm_2="norm_2", up="ffn.up_proj",
                         down="ffn.down_proj", final="transformer.norm_f"),
              input_embedding="transformer.wte.weight", output_embedding="lm_head.weight")
MOSAIC_GPT = Family("mosaic_gpt", ("mosaic_gpt",), _mosaic_gpt_config,
                    _mpt_rules(norm_1="ln_1", norm_2="ln_2", up="mlp.mlp_up",
                               down="mlp.mlp_down", final="transformer.ln_f"),
                    input_embedding="transformer.wte.weight")
