"""Shared transformer pieces: float32 norms, multi-head attention, feed-forward.

Activations follow the dtype of the parameters (the trainer casts parameters to the
compute dtype); norms, attention softmax and rotary phases are computed in float32.

Projection names are part of the sharding contract (training/sharding.py):
`query`/`key`/`value`/`ffw_in` are column-parallel, `output`/`ffw_out` row-parallel.
"""

from typing import Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# Mask value for logits: finite so that a fully masked row gives a uniform softmax
# (never NaN); exp(MASK - max) underflows to exactly 0 for any real max.
MASK_VALUE = float(np.finfo(np.float32).min)


def squared_relu(x: jax.Array) -> jax.Array:
  """Squared ReLU (So et al. 2021), used by the resampler and the xattn FFW."""
  return jnp.square(jax.nn.relu(x))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "squared_relu": squared_relu,
    "relu": jax.nn.relu,
}


class LayerNorm(hk.Module):
  """LayerNorm over the last axis, computed in float32, returned in the input dtype."""

  def __init__(self, *, create_offset: bool = True, eps: float = 1e-5,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.create_offset = create_offset
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    scale = hk.get_parameter("scale", [dim], init=jnp.ones)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    if self.create_offset:
      y = y + hk.get_parameter("offset", [dim], init=jnp.zeros).astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(hk.Module):
  """RMSNorm (Gopher / Chinchilla), computed in float32."""

  def __init__(self, *, eps: float = 1e-6, name: Optional[str] = None):
    super().__init__(name=name)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = hk.get_parameter("scale", [x.shape[-1]], init=jnp.ones)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rotary(x: jax.Array, positions: jax.Array, max_wavelength: float) -> jax.Array:
  """Rotary position embedding (Su et al.) on x [B, L, H, K] at positions [B, L]."""
  half = x.shape[-1] // 2
  freq = max_wavelength ** (-np.arange(half, dtype=np.float32) / half)       # [K/2]
  phase = positions.astype(jnp.float32)[..., None] * freq                    # [B, L, K/2]
  sin, cos = jnp.sin(phase)[:, :, None, :], jnp.cos(phase)[:, :, None, :]   # [B, L, 1, K/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class MultiHeadAttention(hk.Module):
  """Multi-head attention without biases; logits and softmax in float32."""

  def __init__(self, *, num_heads: int, key_size: int, model_size: int,
               w_init_scale: float = 1.0, name: Optional[str] = None):
    super().__init__(name=name)
    self.num_heads = num_heads
    self.key_size = key_size
    self.model_size = model_size
    self.w_init_scale = w_init_scale

  def __call__(self, query: jax.Array, key_value: jax.Array, *,
               mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               rotary_max_wavelength: Optional[float] = None) -> jax.Array:
    """query [B, Lq, D], key_value [B, Lk, Dkv], mask bool [B, 1|H, Lq, Lk] -> [B, Lq, model_size]."""
    w_init = hk.initializers.VarianceScaling(self.w_init_scale)

    def project(x, name):
      y = hk.Linear(self.num_heads * self.key_size, with_bias=False, w_init=w_init,
                    name=name)(x)
      return y.reshape(*x.shape[:-1], self.num_heads, self.key_size)     # [B, L, H, K]

    q = project(query, "query")
    k = project(key_value, "key")
    v = project(key_value, "value")
    if rotary_max_wavelength is not None:
      q = apply_rotary(q, positions, rotary_max_wavelength)
      k = apply_rotary(k, positions, rotary_max_wavelength)
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k,
                        preferred_element_type=jnp.float32) / np.sqrt(self.key_size)
    if mask is not None:
      logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)            # [B, H, Lq, Lk]
    attn = jnp.einsum("bhqt,bthk->bqhk", weights, v)                      # [B, Lq, H, K]
    attn = attn.reshape(*attn.shape[:2], self.num_heads * self.key_size)  # [B, Lq, H*K]
    return hk.Linear(self.model_size, with_bias=False, w_init=w_init, name="output")(attn)


class FeedForward(hk.Module):
  """Two-layer MLP: `ffw_in` (column-parallel) -> activation -> `ffw_out` (row-parallel)."""

  def __init__(self, *, hidden_size: int, activation: str, w_init_scale: float = 1.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.hidden_size = hidden_size
    self.activation = ACTIVATIONS[activation]
    self.w_init_scale = w_init_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    w_init = hk.initializers.VarianceScaling(self.w_init_scale)
    h = hk.Linear(self.hidden_size, with_bias=False, w_init=w_init, name="ffw_in")(x)
    h = self.activation(h)
    return hk.Linear(x.shape[-1], with_bias=False, w_init=w_init, name="ffw_out")(h)
