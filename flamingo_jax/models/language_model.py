"""Frozen decoder-only LM (Chinchilla-style, docs/paper.md §10.6) with GATED XATTN-DENSE blocks.

Layer layout for `num_layers` L and `xattn_every` k (docs/paper.md §1.5): a gated xattn block
before LM block 0 and then before every k-th block. The LM blocks run as G = L // k groups
of [xattn, k blocks] under `hk.layer_stack` (one traced body, a scan), then, if k does not
divide L, a tail [xattn, L mod k blocks] (80B: 11 groups of 7, tail of 3, 12 xattn blocks).

Parameter paths (the sharding, freezing and weight-import contract):
  language_model/token_embed/embeddings               [V, D]        frozen
  language_model/new_token_embed/embeddings           [2, D]        trainable (<image>, <EOC>)
  language_model/groups/blocks/block/...              [G, k, ...]   frozen
  language_model/groups/xattn/...                     [G, ...]      trainable
  language_model/tail_blocks/block/..., tail_xattn/... [L mod k, ...]
  language_model/final_norm, unembed                                frozen
  language_model/new_token_unembed/w                  [D, 2]        trainable
"""

import dataclasses
from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import attention, splash
from flamingo_jax.models import gated_xattn


# Rematerialisation of each LM / xattn block in the backward pass:
#   none  keep every activation (fastest, most memory)
#   full  keep only block inputs, recompute the block (one extra forward: ~+33-50% FLOPs)
#   dots  keep matmul outputs, recompute only elementwise work and attention scores
#         (about the FLOPs of "none", activations ~ one [tokens, width] per matmul)
REMAT_POLICIES = {"none": None, "full": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class DecoderOptions:
  """What differs between public decoder-only LMs; every default is Chinchilla's (ours).

  Llama/Mistral: rms, gated silu, num_kv_heads; GPT-NeoX: layer norm with bias, exact GELU,
  biases, rotary_fraction 0.25, parallel_residual; Gemma: rms (scale stored as 1 + w),
  gated tanh-GELU, tied embeddings, embed_multiplier sqrt(D); MPT: layer norm (with or
  without bias), ALiBi and no rotary, clip_qkv, qk_norm, exact GELU, tied embeddings
  (flamingo_jax/weights/).
  """
  norm: str = "rms"                    # rms | layer
  norm_eps: float = 1e-6
  norm_bias: bool = False              # layer norm with an offset
  ffw: str = "mlp"                     # mlp | gated (SwiGLU / GeGLU with `activation`)
  activation: str = "gelu"             # attention.ACTIVATIONS
  num_kv_heads: int = 0                # 0: num_heads (multi-head); 1: multi-query
  rotary_max_wavelength: float = 10_000.0
  rotary_fraction: float = 1.0         # of each head's dims that rotate
  rotary_layout: str = "half"          # half | interleaved (attention.apply_rotary)
  qkv_bias: bool = False
  output_bias: bool = False
  ffw_bias: bool = False
  parallel_residual: bool = False      # x + attn(norm1(x)) + ffw(norm2(x))  (GPT-NeoX)
  sliding_window: int = 0              # 0: full causal; W: attend to the last W positions
  # MPT: ALiBi instead of rotary (rotary_fraction 0), the logits of q and k scaled by
  # attention_scale, clip_qkv, a norm (the LM's kind) over all heads' queries and keys.
  alibi_bias_max: float = 0.0          # 0: no ALiBi; else its slopes' maximum exponent
  clip_qkv: float = 0.0                # 0: none; else q, k, v clamped to [-c, c]
  qk_norm: bool = False                # MPT's qk_ln
  attention_scale: float = 0.0         # 0: 1/sqrt(key_size)
  logit_scale: float = 1.0             # the output logits times this (MPT)

  @classmethod
  def from_config(cls, lm: Any) -> "DecoderOptions":
    """The fields of `config.model.lm` that name options (missing keys: the default)."""
    return cls(**{f.name: lm[f.name] for f in dataclasses.fields(cls) if f.name in lm})


class DecoderBlock(hk.Module):
  """Pre-norm LM block: causal self-attention with rotary positions, then the FFW."""

  def __init__(self, *, num_heads: int, key_size: int, ffw_size: int,
               options: DecoderOptions, attention_impl: str = "einsum",
               name: Optional[str] = None):
    super().__init__(name=name)
    self.num_heads = num_heads
    self.key_size = key_size
    self.ffw_size = ffw_size
    self.options = options
    self.attention_impl = attention_impl

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: Optional[dict] = None):
    """x [B, T, D] at positions [B, T] -> [B, T, D]; with a self-attention cache
    (a layer stack's, {"k", "v": [B, N, Hkv, S, K], "layer"}: see MultiHeadAttention)
    -> (x, updated cache)."""
    o = self.options
    norm = lambda name: attention.make_norm(o.norm, eps=o.norm_eps, bias=o.norm_bias, name=name)
    h = norm("attention_norm")(x)
    rotary = (attention.Rotary(o.rotary_max_wavelength, o.rotary_fraction, o.rotary_layout)
              if o.rotary_fraction else None)
    attn = attention.MultiHeadAttention(
        num_heads=self.num_heads, key_size=self.key_size, model_size=x.shape[-1],
        num_kv_heads=o.num_kv_heads or None, qkv_bias=o.qkv_bias, output_bias=o.output_bias,
        impl=self.attention_impl, clip=o.clip_qkv, scale=o.attention_scale,
        qk_norm=(attention.QKNorm(o.norm, o.norm_eps, o.norm_bias, per_head=False)
                 if o.qk_norm else None),
        alibi=(attention.alibi_slopes(self.num_heads, o.alibi_bias_max)
               if o.alibi_bias_max else None),
        name="self_attention")(
            h, h, mask=mask, positions=positions, rotary=rotary, cache=cache,
            # Uncached, `mask` is causal_mask's (LanguageModel): splash's causal form.
            splash_mask=(splash.SplashMask(causal=True, sliding_window=o.sliding_window)
                         if cache is None else None))
    if cache is not None:
      attn, cache = attn
    ffw = attention.FeedForward(hidden_size=self.ffw_size, activation=o.activation,
                                kind=o.ffw, bias=o.ffw_bias, name="ffw")
    if o.parallel_residual:
      x = x + attn + ffw(norm("ffw_norm")(x))
    else:
      x = x + attn
      x = x + ffw(norm("ffw_norm")(x))
    return x if cache is None else (x, cache)


class EmbeddingTable(hk.Module):
  """The frozen [V, D] token table (hk.Embed's path and init), shared by the tied unembed."""

  def __init__(self, vocab_size: int, dim: int, name: Optional[str] = None):
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self.dim = dim

  def __call__(self) -> jax.Array:
    return hk.get_parameter("embeddings", [self.vocab_size, self.dim],
                            init=hk.initializers.TruncatedNormal())


class LanguageModel(hk.Module):
  """Token ids (+ optional visual tokens) -> float32 logits [B, L, V]."""

  def __init__(self, *, vocab_size: int, num_layers: int, dim: int, num_heads: int,
               key_size: int, ffw_size: int, xattn_every: int, xattn_num_heads: int,
               xattn_key_size: int, xattn_ffw_mult: int, only_attend_immediate_media: bool,
               new_token_ids: Sequence[int], options: DecoderOptions = DecoderOptions(),
               tied_embeddings: bool = False, embed_multiplier: float = 1.0,
               valid_vocab_size: int = 0, remat: str = "none", attention_impl: str = "einsum",
               xattn_options: Optional[dict] = None, xattn_offset: int = 0,
               name: Optional[str] = "language_model"):
    super().__init__(name=name)
    if not 1 <= xattn_every <= num_layers:
      raise ValueError(f"xattn_every={xattn_every} must be in [1, num_layers={num_layers}]")
    layer_layout(num_layers, xattn_every, xattn_offset)          # checks the offset
    bad = [i for i in new_token_ids if not 0 <= i < vocab_size]
    if bad or len(set(new_token_ids)) != len(new_token_ids):
      raise ValueError(f"new token ids {tuple(new_token_ids)} must be distinct and in [0, {vocab_size})")
    if not 0 <= valid_vocab_size <= vocab_size:
      raise ValueError(f"valid_vocab_size={valid_vocab_size} must be in [0, vocab_size={vocab_size}]")
    self.vocab_size = vocab_size
    self.num_layers = num_layers
    self.dim = dim
    self.xattn_every = xattn_every
    self.xattn_offset = xattn_offset
    self.new_token_ids = tuple(new_token_ids)
    self.tied_embeddings = tied_embeddings
    self.embed_multiplier = embed_multiplier
    self.valid_vocab_size = valid_vocab_size
    self.options = options
    self.remat = remat
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    self._block_kwargs = dict(num_heads=num_heads, key_size=key_size, ffw_size=ffw_size,
                              options=options, attention_impl=attention_impl)
    self._xattn_kwargs = dict(num_heads=xattn_num_heads, key_size=xattn_key_size,
                              ffw_mult=xattn_ffw_mult,
                              only_attend_immediate_media=only_attend_immediate_media,
                              attention_impl=attention_impl, **(xattn_options or {}))
    self._table = None

  @property
  def num_xattn_layers(self) -> int:
    return -(-(self.num_layers - self.xattn_offset) // self.xattn_every)

  @hk.name_like("__call__")
  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Frozen table lookup; the rows of the new tokens come from a trainable table."""
    if self._table is None:
      self._table = EmbeddingTable(self.vocab_size, self.dim, name="token_embed")
    x = jnp.take(self._table(), input_ids, axis=0)                               # [B, L, D]
    new_index = jnp.zeros_like(input_ids)
    for row, token_id in enumerate(self.new_token_ids):
      new_index = jnp.where(input_ids == token_id, row, new_index)
    # One-hot matmul, not a gather: the gather's backward is a scatter-add of every token
    # into 2 rows, which serialises on accelerators (measured 5 s/step for 1B in bf16 on GPU).
    # In the compute dtype: a one-hot row selects a row exactly (docs/precision.md).
    table = hk.Embed(len(self.new_token_ids), self.dim, name="new_token_embed").embeddings
    new_x = jnp.dot(jax.nn.one_hot(new_index, len(self.new_token_ids), dtype=table.dtype),
                    table)                                                      # [B, L, D]
    is_new = jnp.isin(input_ids, jnp.asarray(self.new_token_ids))[..., None]      # [B, L, 1]
    x = jnp.where(is_new, new_x.astype(x.dtype), x)
    if self.embed_multiplier != 1.0:      # Gemma: sqrt(D), in the activation dtype as HF does
      x = x * jnp.asarray(self.embed_multiplier, x.dtype)
    return x

  def __call__(self, input_ids: jax.Array, visual: Optional[jax.Array] = None,
               phi: Optional[jax.Array] = None, *, positions: Optional[jax.Array] = None,
               cache: Optional[dict] = None):
    """input_ids [B, L]; visual [B, N, R, Dv] or None (text only); phi [B, L].

    Returns float32 logits [B, L, V]. With `cache` (generation; `init_cache`), the L tokens
    sit at `positions` [B, L] (contiguous per row) after what the cache holds, and
    (logits, updated cache) is returned: each LM block's keys/values are written into the
    cache, and each xattn layer's visual keys/values are computed from `visual` once (the
    prefill) and read back from the cache afterwards (visual None).
    """
    b, length = input_ids.shape
    x = self.embed(input_ids)
    cached = cache is not None
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    if cached:
      slots = cache_length(cache)
      mask = cached_mask(positions, slots, self.options.sliding_window)          # [B, 1, L, S]
      with_media = visual is not None or "xattn" in cache["groups"]
    else:
      mask = causal_mask(length, self.options.sliding_window)                    # [1, 1, L, L]
      with_media = visual is not None

    def maybe_remat(f):
      if self.remat == "none" or cached:
        return f
      return hk.remat(f, policy=REMAT_POLICIES[self.remat])

    def xattn(x, name, media_kv=None):
      """-> (x, this layer's visual keys/values or None)."""
      if not with_media:
        return x, None
      block = gated_xattn.GatedCrossAttentionDense(name=name, **self._xattn_kwargs)
      if not cached:
        return maybe_remat(block)(x, visual, phi), None
      if media_kv is None:                                  # prefill: computed once, kept
        media_kv = block.media_kv(visual.astype(x.dtype), x.shape[-1])
      return block(x, None, phi, media_kv=media_kv), media_kv

    def lm_blocks(x, count, name, stack=None):
      """`count` scanned blocks; cached: `stack` ({"k", "v": [B, N, Hkv, S, K], "layer": the
      index of the first of these blocks in it}) is carried through the scan, each block
      writing its own layer, and returned with "layer" past the last."""
      def one(x):
        return maybe_remat(DecoderBlock(name="block", **self._block_kwargs))(x, positions, mask)
      if not cached:
        return hk.layer_stack(count, name=name)(one)(x), None

      def one_cached(carry):
        x, stack = carry
        x, stack = DecoderBlock(name="block", **self._block_kwargs)(x, positions, mask, stack)
        return x, dict(stack, layer=stack["layer"] + 1)
      return hk.layer_stack(count, name=name)(one_cached)((x, stack))

    def stage(x, stack, kept, xattn_name, blocks_name, count):
      """[xattn, `count` blocks]: (x, stack, this xattn layer's visual keys/values or None).
      kept: the cache's {"k", "v"} of this xattn layer (None: compute them, the prefill)."""
      x, media_kv = xattn(x, xattn_name, None if kept is None else (kept["k"], kept["v"]))
      x, stack = lm_blocks(x, count, blocks_name, stack)
      return x, stack, media_kv

    def stack_of(part, layer_dims=1):
      """The self-attention cache of `part` as one layer stack [B, N, Hkv, S, K], starting at
      layer 0 (groups: [B, G, every, ...] -> [B, G * every, ...], a free reshape)."""
      merge = lambda a: a.reshape(a.shape[0], -1, *a.shape[1 + layer_dims:])
      return {"k": merge(cache[part]["self"]["k"]), "v": merge(cache[part]["self"]["v"]),
              "layer": jnp.int32(0)}

    def part_cache(part, stack, kept=None, media_kv=None):
      """`part`'s new cache: its self stack back in the part's own shape, and its xattn
      keys/values: the kept ones untouched, or the prefill's new ones."""
      like = cache[part]["self"]
      out = {"self": {name: stack[name].reshape(like[name].shape) for name in ("k", "v")}}
      if kept is not None:
        out["xattn"] = kept
      elif media_kv is not None:
        out["xattn"] = {"k": media_kv[0], "v": media_kv[1]}
      return out

    head, num_groups, tail = layer_layout(self.num_layers, self.xattn_every, self.xattn_offset)
    new_cache = {}
    if head:                                    # LM blocks before the first xattn block
      if cached:
        x, stack = lm_blocks(x, head, "head_blocks", stack_of("head"))
        new_cache["head"] = part_cache("head", stack)
      else:
        x, _ = lm_blocks(x, head, "head_blocks")
    if not cached:
      x = hk.layer_stack(num_groups, name="groups")(
          lambda x: stage(x, None, None, "xattn", "blocks", self.xattn_every)[0])(x)
      if tail:
        x = stage(x, None, None, "tail_xattn", "tail_blocks", tail)[0]
    else:
      kept = cache["groups"].get("xattn")
      def group(carry, *kept_g):
        x, stack, media_kv = stage(*carry, kept_g[0] if kept_g else None, "xattn", "blocks",
                                   self.xattn_every)
        # Kept visual keys/values pass through untouched (no per-token copy of them).
        return (x, stack), (None if kept_g else media_kv)
      (x, stack), media_kv = hk.layer_stack(num_groups, with_per_layer_inputs=True,
                                            name="groups")(group)(
          (x, stack_of("groups", layer_dims=2)), *([kept] if kept is not None else []))
      new_cache["groups"] = part_cache("groups", stack, kept, media_kv)
      if tail:
        kept = cache["tail"].get("xattn")
        x, stack, media_kv = stage(x, stack_of("tail"), kept, "tail_xattn", "tail_blocks", tail)
        new_cache["tail"] = part_cache("tail", stack, kept, media_kv)

    o = self.options
    x = attention.make_norm(o.norm, eps=o.norm_eps, bias=o.norm_bias, name="final_norm")(x)
    if self.tied_embeddings:
      logits = jnp.einsum("bld,vd->blv", x, self._table().astype(x.dtype))      # [B, L, V]
    else:
      logits = attention.Linear(self.vocab_size, with_bias=False, name="unembed")(x)  # [B, L, V]
    new_logits = attention.Linear(len(self.new_token_ids), with_bias=False,
                                  name="new_token_unembed")(x)                   # [B, L, 2]
    logits, new_logits = logits.astype(jnp.float32), new_logits.astype(jnp.float32)
    if o.logit_scale != 1.0:
      logits, new_logits = logits * o.logit_scale, new_logits * o.logit_scale
    # Select over the vocabulary iota (not a scatter) to put the new tokens' columns in place.
    vocab = jnp.arange(self.vocab_size, dtype=jnp.int32)
    for row, token_id in enumerate(self.new_token_ids):
      logits = jnp.where(vocab == token_id, new_logits[..., row:row + 1], logits)
    if self.valid_vocab_size:             # rows padded for the mesh never get probability
      logits = jnp.where(vocab < self.valid_vocab_size, logits, attention.MASK_VALUE)
    return (logits, new_cache) if cached else logits

def layer_layout(num_layers: int, xattn_every: int, xattn_offset: int = 0
                 ) -> tuple[int, int, int]:
  """(head, groups, tail): `head` LM blocks with no xattn block before them, then `groups`
  x [xattn, `xattn_every` blocks], then [xattn, `tail` blocks] if tail > 0. The xattn
  blocks sit before LM blocks offset, offset + every, ... (the paper's: offset 0;
  OpenFlamingo's: every - 1, before block i when (i + 1) % every == 0)."""
  if not 0 <= xattn_offset < xattn_every or xattn_offset + xattn_every > num_layers:
    raise ValueError(f"xattn.offset={xattn_offset} must be in [0, xattn.every={xattn_every}) "
                     f"with offset + every <= num_layers={num_layers}")
  groups, tail = divmod(num_layers - xattn_offset, xattn_every)
  return xattn_offset, groups, tail


def init_cache(*, num_layers: int, xattn_every: int, num_kv_heads: int, key_size: int,
               batch: int, slots: int, dtype: Any, xattn_offset: int = 0) -> dict:
  """Empty self-attention cache for `batch` rows of `slots` positions, laid out for the
  scanned stacks (layer_layout): head {"self": {"k", "v": [B, offset, Hkv, S, K]}} when
  there is a head, groups {"self": [B, G, k, Hkv, S, K]}, tail {"self": [B, tail, Hkv, S,
  K]}. Rows first, so that the decode scans carry each stack whole and write it in place;
  slots after the heads, so that attention reads a layer's keys without transposing them.
  The prefill adds each xattn layer's visual keys/values ("xattn": {"k", "v": [G, B, N, R,
  H, K]} and [B, N, R, H, K] for the tail)."""
  head, num_groups, tail = layer_layout(num_layers, xattn_every, xattn_offset)
  zeros = lambda *lead: {"k": jnp.zeros((batch, *lead, num_kv_heads, slots, key_size), dtype),
                         "v": jnp.zeros((batch, *lead, num_kv_heads, slots, key_size), dtype)}
  cache = {"groups": {"self": zeros(num_groups, xattn_every)}}
  if head:
    cache["head"] = {"self": zeros(head)}
  if tail:
    cache["tail"] = {"self": zeros(tail)}
  return cache


# Which axis of each cache leaf is the batch (beam search reorders rows along it).
CACHE_BATCH_AXES = {"groups": {"self": 0, "xattn": 1}, "tail": {"self": 0, "xattn": 0},
                    "head": {"self": 0}}
# Which axis of a cache leaf is the key/value heads (sharded over 'model'), by kind.
CACHE_HEAD_AXES = {"self": -3, "xattn": -2}


def cache_length(cache: dict) -> int:
  """S, the positions a cache holds."""
  return cache["groups"]["self"]["k"].shape[4]           # [B, G, every, Hkv, S, K]


def cached_mask(positions: jax.Array, slots: int, sliding_window: int = 0) -> jax.Array:
  """bool [B, 1, L, S]: the token at position p sees cache slots s <= p (and p - s < window)."""
  s = jnp.arange(slots)[None, None, :]
  p = positions[:, :, None]
  mask = s <= p
  if sliding_window:
    mask &= p - s < sliding_window
  return mask[:, None]


def causal_mask(length: int, sliding_window: int = 0) -> jax.Array:
  """bool [1, 1, L, L]: query q sees keys k <= q (and q - k < sliding_window if set)."""
  q = jnp.arange(length)[:, None]
  k = jnp.arange(length)[None, :]
  mask = k <= q
  if sliding_window:
    mask &= q - k < sliding_window
  return mask[None, None]
