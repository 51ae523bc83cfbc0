"""Perceiver Resampler (docs/paper.md §1.3, Fig. 4): any number of frames and positions -> R tokens.

    x_f = proj(features) + time_emb[t]          # [T, S, D], no spatial embedding
    x   = latents                                # [R, D]
    for each layer:
      x = x + attn(q=LN(x), kv=concat(LN(x_f), LN(x)))
      x = x + ffw(LN(x))                         # squared ReLU, hidden 4·D
    return LN(x)                                 # [R, D]

Options for other checkpoints (config.model.resampler; the paper's by default):
`input_projection=False` (features already D wide: OpenFlamingo, IDEFICS), `ffw_activation`
("gelu_exact": OpenFlamingo; "relu": IDEFICS), `num_time_embeddings=0` (no time embedding:
OpenFlamingo's resampler as its factory builds it; frames are then only concatenated),
`qk_norm="layer"` (a LayerNorm per head on queries and keys: IDEFICS'
qk_layer_norms_perceiver).
"""

from typing import Optional

import chex
import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import attention


def temporal_embeddings(table: jax.Array, num_frames: int, max_frames: int) -> jax.Array:
  """Time embeddings [num_frames, D] from a learned table [E, D].

  Up to E frames use the first rows; more frames (evaluation: 8 -> 30, docs/paper.md §3.3)
  linearly interpolate the E rows over the same span, allowed up to `max_frames`.
  """
  num_table = table.shape[0]
  if num_frames < 1 or num_frames > max(max_frames, num_table):
    raise ValueError(
        f"media has {num_frames} frames; this resampler has {num_table} temporal "
        f"embeddings and interpolates them up to max_frames={max_frames}")
  if num_frames <= num_table:
    return table[:num_frames]
  grid = jnp.linspace(0.0, num_table - 1.0, num_frames)                   # [T]
  lo = jnp.clip(jnp.floor(grid).astype(jnp.int32), 0, num_table - 2)
  frac = (grid - lo)[:, None].astype(table.dtype)
  return table[lo] * (1 - frac) + table[lo + 1] * frac


class PerceiverResampler(hk.Module):
  """Maps vision features [B, N, T, S, C] to visual tokens [B, N, R, D]."""

  def __init__(self, *, num_layers: int, dim: int, num_heads: int, key_size: int,
               ffw_mult: int, num_latents: int, num_time_embeddings: int,
               max_frames: int, attention_impl: str = "einsum",
               input_projection: bool = True, ffw_activation: str = "squared_relu",
               qk_norm: str = "", name: Optional[str] = "perceiver_resampler"):
    super().__init__(name=name)
    if qk_norm not in ("", "layer"):
      raise ValueError(f"resampler qk_norm {qk_norm!r}; expected '' or 'layer'")
    self.qk_norm = qk_norm
    self.attention_impl = attention_impl
    self.num_layers = num_layers
    self.dim = dim
    self.num_heads = num_heads
    self.key_size = key_size
    self.ffw_mult = ffw_mult
    self.num_latents = num_latents
    self.num_time_embeddings = num_time_embeddings
    self.max_frames = max_frames
    self.input_projection = input_projection
    self.ffw_activation = ffw_activation

  def __call__(self, features: jax.Array) -> jax.Array:
    if features.ndim != 5:
      raise ValueError(f"resampler expects features [B, N, T, S, C], got shape {features.shape}")
    b, n, t, s, c = features.shape
    dtype = features.dtype
    if self.input_projection:
      # Encoder channels -> resampler width (docs/paper.md §10.3: 3072 -> 1536 for NFNet-F6).
      x_f = attention.Linear(self.dim, with_bias=False,
                             name="input_projection")(features)                 # [B,N,T,S,D]
    elif c != self.dim:
      raise ValueError(f"resampler without input projection needs {self.dim}-wide features "
                       f"(config.model.resampler.dim), the vision encoder gives {c}")
    else:
      x_f = features
    if self.num_time_embeddings:
      time_table = hk.get_parameter(
          "time_embeddings", [self.num_time_embeddings, self.dim],
          init=hk.initializers.TruncatedNormal(0.02))
      time_emb = temporal_embeddings(time_table.astype(dtype), t, self.max_frames)  # [T, D]
      x_f = x_f + time_emb[:, None, :]
    x_f = x_f.reshape(b * n, t * s, self.dim)                                       # [BN, T*S, D]

    latents = hk.get_parameter("latents", [self.num_latents, self.dim],
                               init=hk.initializers.TruncatedNormal(0.02))
    x = jnp.broadcast_to(latents.astype(dtype), (b * n, self.num_latents, self.dim))

    def layer(x):
      latents_normed = attention.LayerNorm(name="latents_norm")(x)
      media_normed = attention.LayerNorm(name="media_norm")(x_f)
      kv = jnp.concatenate([media_normed, latents_normed], axis=1)                # [BN, T*S+R, D]
      x = x + attention.MultiHeadAttention(
          num_heads=self.num_heads, key_size=self.key_size, model_size=self.dim,
          impl=self.attention_impl, name="attention",
          qk_norm=attention.QKNorm("layer", 1e-5, bias=True) if self.qk_norm else None)(
              latents_normed, kv)
      h = attention.LayerNorm(name="ffw_norm")(x)
      return x + attention.FeedForward(hidden_size=self.ffw_mult * self.dim,
                                       activation=self.ffw_activation, name="ffw")(h)

    x = hk.layer_stack(self.num_layers, name="layers")(layer)(x)
    x = attention.LayerNorm(name="final_norm")(x)
    out = x.reshape(b, n, self.num_latents, self.dim)                              # [B, N, R, D]
    chex.assert_shape(out, (b, n, self.num_latents, self.dim))
    return out
