"""GATED XATTN-DENSE (docs/paper.md §1.4, Fig. 5) and the media mask φ (docs/paper.md §2, §10.2).

    y = y + tanh(alpha_xattn) * cross_attn(q=LN(y), kv=LN(visual), mask=φ)
    y = y + tanh(alpha_dense) * ffw(LN(y))            # squared ReLU, hidden 4·D

φ(t) is the 1-based index of the last `<image>` token at a position <= t (0: none), so an
`<image>` token already belongs to its own image. By default a token attends only to the
R visual tokens of media φ(t); `only_attend_immediate_media=False` lets it attend to all
media 1..φ(t) (the paper's ablation, Table 7 row viii). Rows with no media to attend to
get an exact zero cross-attention output (no softmax over an empty set, no NaN).

Options for other checkpoints (config.model.xattn; the paper's by default): `media_norm=False`
(no LayerNorm on the visual tokens: OpenFlamingo), `ffw_activation` ("gelu_exact":
OpenFlamingo); IDEFICS: RMSNorms, a SwiGLU feed-forward, per-channel gates, a norm per head on
queries and keys (see __init__). OpenFlamingo's mask (text_time = cumsum of media locations,
equal to media time; tokens before any media zeroed) is φ exactly, and so is the IDEFICS
processor's (the index of the last image at or before the token, none before the first),
with its one addition: after an end-of-document token, none until the next image
(`media_positions(no_media_after_id=...)`).
"""

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import attention, splash


def media_positions(input_ids: jax.Array, image_token_id: int, no_media_after_id: int = -1,
                    *, start: Optional[jax.Array] = None,
                    previous: Optional[jax.Array] = None) -> jax.Array:
  """φ [B, L] int32: the count of `<image>` tokens at positions <= t.

  With `no_media_after_id` (IDEFICS: EOS), a token after that token, with no `<image>` since,
  sees no image: its φ is minus the count (the count goes on at the next `<image>`; media
  masks treat φ <= 0 as none). `start` [B] (φ before these tokens, by that rule) and
  `previous` [B] (the token before them) continue a sequence (generation's later chunks)."""
  b, length = input_ids.shape
  before = jnp.zeros((b,), jnp.int32) if start is None else start
  is_image = input_ids == image_token_id
  count = jnp.abs(before)[:, None] + jnp.cumsum(is_image, axis=-1, dtype=jnp.int32)
  if no_media_after_id < 0:
    return count
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  # Where the carried state puts the last image and the last stop before position 0: a
  # silenced start (φ < 0) as a stop after the last image.
  silenced = (before < 0)[:, None]
  last_image = jax.lax.cummax(jnp.where(is_image, pos, jnp.where(silenced, -3, -2)), axis=1)
  stops = input_ids == no_media_after_id
  stop_before = jnp.concatenate([jnp.where(silenced, -2, -3),
                                 jnp.where(stops[:, :-1], pos[:, :-1], -3)], axis=1)
  if previous is not None:          # the token before these ended a document
    stop_before = stop_before.at[:, 0].max(jnp.where(previous == no_media_after_id, -1, -3))
  stop_before = jax.lax.cummax(stop_before, axis=1)
  return jnp.where(stop_before > last_image, -count, count)


def media_index(num_media: int, num_visual_tokens: int) -> jax.Array:
  """int32 [N*R]: the media (1-based) each visual key belongs to."""
  return jnp.repeat(jnp.arange(1, num_media + 1, dtype=jnp.int32), num_visual_tokens)


def media_attention_mask(phi: jax.Array, num_media: int, num_visual_tokens: int, *,
                         only_attend_immediate_media: bool) -> tuple[jax.Array, jax.Array]:
  """Returns (mask bool [B, 1, L, N*R], row_has_media bool [B, L]).

  Key j belongs to media j // R + 1 (1-based). Tokens whose φ is 0, or beyond the N media
  slots, attend to nothing and are zeroed by the caller.
  """
  key_media = media_index(num_media, num_visual_tokens)                                      # [N*R]
  row_has_media = (phi >= 1) & (phi <= num_media)                                           # [B, L]
  if only_attend_immediate_media:
    mask = phi[:, :, None] == key_media                                                     # [B, L, N*R]
  else:
    mask = key_media <= phi[:, :, None]
  mask = mask & row_has_media[:, :, None]
  return mask[:, None], row_has_media


class GatedCrossAttentionDense(hk.Module):
  """One GATED XATTN-DENSE block; both tanh gates start at 0 (output = input)."""

  def __init__(self, *, num_heads: int, key_size: int, ffw_mult: int,
               only_attend_immediate_media: bool = True, attention_impl: str = "einsum",
               media_norm: bool = True, ffw_activation: str = "squared_relu",
               norm: str = "layer", norm_eps: float = 1e-5, ffw: str = "mlp",
               ffw_size: int = 0, gate: str = "scalar", qk_norm: str = "",
               name: Optional[str] = None):
    """norm: the block's own norms (query_norm, ffw_norm): "layer" | "rms" (IDEFICS), eps
    norm_eps. ffw: "mlp" | "gated" (IDEFICS' SwiGLU), hidden ffw_size (0: ffw_mult x width).
    gate: "scalar" | "vector" (one tanh gate per channel). qk_norm: "" | "rms" | "layer", a
    norm over each head's queries and keys (IDEFICS' qk_layer_norms)."""
    super().__init__(name=name)
    if gate not in ("scalar", "vector"):
      raise ValueError(f"xattn gate {gate!r}; expected 'scalar' or 'vector'")
    if qk_norm not in ("", "rms", "layer"):
      raise ValueError(f"xattn qk_norm {qk_norm!r}; expected '', 'rms' or 'layer'")
    self.media_norm = media_norm
    self.ffw_activation = ffw_activation
    self.norm, self.norm_eps, self.ffw = norm, norm_eps, ffw
    self.ffw_size, self.gate, self.qk_norm = ffw_size, gate, qk_norm
    self.attention_impl = attention_impl
    self.num_heads = num_heads
    self.key_size = key_size
    self.ffw_mult = ffw_mult
    self.only_attend_immediate_media = only_attend_immediate_media
    self._modules = {}

  @hk.name_like("__call__")           # paths: xattn/cross_attention, not xattn/~_module/...
  def _module(self, name: str, build):
    """Submodules shared by `media_kv` and `__call__` (one instance, one set of params)."""
    if name not in self._modules:
      self._modules[name] = build(name)
    return self._modules[name]

  def _media_norm(self):
    if not self.media_norm:
      return lambda x: x
    return self._module("media_norm", lambda n: attention.LayerNorm(name=n))

  def _cross_attention(self, dim: int):
    qk_norm = (attention.QKNorm(self.qk_norm, self.norm_eps, bias=True, per_head=True)
               if self.qk_norm else None)
    return self._module("cross_attention", lambda n: attention.MultiHeadAttention(
        num_heads=self.num_heads, key_size=self.key_size, model_size=dim,
        impl=self.attention_impl, qk_norm=qk_norm, name=n))

  @hk.name_like("__call__")           # paths: xattn/query_norm
  def _block_norm(self, name: str) -> hk.Module:
    return attention.make_norm(self.norm, eps=self.norm_eps, bias=True, name=name)

  @hk.name_like("__call__")
  def _alpha(self, name: str, dim: int) -> jax.Array:
    return hk.get_parameter(name, [] if self.gate == "scalar" else [dim], init=jnp.zeros)

  @hk.name_like("__call__")
  def media_kv(self, visual: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    """visual [B, N, R, Dv] -> cross-attention (k, v) [B, N, R, H, K]: what generation keeps
    per xattn layer instead of recomputing it for every new token. `dim` is the text width."""
    b, n, r, dv = visual.shape
    kv = self._media_norm()(visual.reshape(b, n * r, dv))                  # [B, N*R, Dv]
    k, v = self._cross_attention(dim).project_kv(kv)                       # [B, N*R, H, K]
    return k.reshape(b, n, r, *k.shape[2:]), v.reshape(b, n, r, *v.shape[2:])

  def __call__(self, y: jax.Array, visual: Optional[jax.Array], phi: jax.Array, *,
               media_kv: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """y [B, L, D] text, visual [B, N, R, Dv] resampler tokens (or their `media_kv`),
    phi [B, L] -> [B, L, D]."""
    dim = y.shape[-1]
    if media_kv is None:
      b, n, r, dv = visual.shape
      kv_input = self._media_norm()(
          visual.astype(y.dtype).reshape(b, n * r, dv))                    # [B, N*R, Dv], one LN for K and V
    else:
      b, n, r = media_kv[0].shape[:3]
    mask, row_has_media = media_attention_mask(
        phi, n, r, only_attend_immediate_media=self.only_attend_immediate_media)
    q = self._block_norm("query_norm")(y)
    # The same mask as segment ids: query φ(t), key its media's index (1-based; models/splash.py).
    splash_mask = (splash.SplashMask(q_segments=phi, kv_segments=media_index(n, r))
                   if self.only_attend_immediate_media else None)
    if media_kv is None:
      attn = self._cross_attention(dim)(q, kv_input, mask=mask, splash_mask=splash_mask)
    else:
      kv = tuple(x.reshape(b, n * r, *x.shape[3:]) for x in media_kv)     # [B, N*R, H, K]
      attn = self._cross_attention(dim)(q, mask=mask, kv=kv)
    attn = jnp.where(row_has_media[:, :, None], attn, jnp.zeros_like(attn))
    y = _gated_add(y, attn, self._alpha("alpha_xattn", dim))

    h = self._block_norm("ffw_norm")(y)
    h = attention.FeedForward(hidden_size=self.ffw_size or self.ffw_mult * dim,
                              activation=self.ffw_activation, kind=self.ffw, name="ffw")(h)
    return _gated_add(y, h, self._alpha("alpha_dense", dim))


def _gated_add(y: jax.Array, branch: jax.Array, alpha: jax.Array) -> jax.Array:
  """y + tanh(alpha)·branch, in float32: alpha's gradient is a sum over every element of the
  batch, which bfloat16 accumulation would garble."""
  gated = jnp.tanh(alpha.astype(jnp.float32)) * branch.astype(jnp.float32)
  return (y.astype(jnp.float32) + gated).astype(y.dtype)
