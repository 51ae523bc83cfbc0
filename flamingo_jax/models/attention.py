"""Shared transformer pieces: float32 norms, multi-head attention, feed-forward.

Activations follow the dtype of the parameters (the trainer casts parameters to the
compute dtype); norms, attention softmax and rotary phases are computed in float32.

Projection names are part of the sharding contract (training/sharding.py):
`query`/`key`/`value`/`ffw_in` are column-parallel, `output`/`ffw_out` row-parallel.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import splash

# Mask value for logits: finite so that a fully masked row gives a uniform softmax
# (never NaN); exp(MASK - max) underflows to exactly 0 for any real max.
MASK_VALUE = float(np.finfo(np.float32).min)
# How attention is computed (config.model.attention_impl). "einsum": our own einsums, the
# reference the tests compare against; "xla": jax.nn.dot_product_attention on XLA; "cudnn":
# its cuDNN flash attention (GPU, bfloat16/float16 only); "splash": the Pallas TPU kernel
# (models/splash.py) where the mask has its form; "auto": cuDNN or splash where they apply,
# else the einsums (resolve_impl). All keep float32 logits and softmax.
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "splash", "auto")


def squared_relu(x: jax.Array) -> jax.Array:
  """Squared ReLU (So et al. 2021), used by the resampler and the xattn FFW."""
  return jnp.square(jax.nn.relu(x))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,                                        # tanh approximation
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),  # erf (GPT-NeoX, BERT)
    "silu": jax.nn.silu,                                        # SwiGLU (Llama, Mistral)
    "squared_relu": squared_relu,
    "relu": jax.nn.relu,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scores(spec: str, q: jax.Array, k: jax.Array) -> jax.Array:
  """Attention logits q·k over `spec`, accumulated and returned in float32 (the softmax's
  input). Its backward casts the logits' gradient to the operands' dtype before its two
  matmuls, as flash-attention kernels do: under bfloat16 compute no matmul of attention's
  backward takes float32 operands (autodiff's would, for the float32 output). In float32
  compute it is autodiff's gradient."""
  return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def _scores_fwd(spec, q, k):
  return _scores(spec, q, k), (q, k)


def _scores_bwd(spec, residuals, g):
  q, k = residuals
  (q_spec, k_spec), out_spec = spec.split("->")[0].split(","), spec.split("->")[1]
  g = g.astype(q.dtype)
  dq = jnp.einsum(f"{out_spec},{k_spec}->{q_spec}", g, k.astype(q.dtype),
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum(f"{out_spec},{q_spec}->{k_spec}", g, q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype)


_scores.defvjp(_scores_fwd, _scores_bwd)


def resolve_impl(impl: str, dtype: Any, key_size: int, platform: Optional[str] = None,
                 splash_mask: bool = False) -> str:
  """The kernel `impl` means for this call. "auto": cuDNN's flash attention on a GPU for
  bfloat16 / float16 and head widths it takes (multiples of 8 up to 128); splash on a TPU
  where the call's mask has splash's form (`splash_mask`); else our einsums. "cudnn" on
  float32 operands (which cuDNN refuses) runs the einsums: that is the parameter
  initialisation's forward, always float32 (models/flamingo.py); a float32 training config
  with cudnn is refused up front (training/tasks). "splash" without `splash_mask` runs the
  einsums too (the resampler, the ViT, ALiBi, a decoding cache)."""
  platform = platform or splash.platform()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "auto":
    if platform == "tpu" and splash_mask:
      return "splash"
    fits = platform == "gpu" and half and key_size % 8 == 0 and key_size <= 128
    return "cudnn" if fits else "einsum"
  if (impl == "cudnn" and not half) or (impl == "splash" and not splash_mask):
    return "einsum"
  return impl


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x, w)


def _dense_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _dense_bwd(residuals, dy):
  x, w = residuals
  rows = tuple(range(x.ndim - 1))
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))       # [..., Din]
  # dW [Din, Dout] straight from one dot over every row. JAX's own transpose rule forms
  # dy^T x and transposes it, and XLA:CPU then lays the [rows, Dout] cotangent out
  # transposed, with the activation's gradient fused into that copy (twice: once per layout).
  dw = jax.lax.dot_general(x, dy, ((rows, rows), ((), ())))                  # [Din, Dout]
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(hk.Linear):
  """hk.Linear (same parameters, same forward) whose weight gradient is one dot over all
  rows, laid out as the weight: 10-20% off the resampler's backward on XLA:CPU (issue 15,
  WORKSPACE "Step speed vs OpenFlamingo"). Equal to autodiff's gradient up to summation order."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not inputs.shape:
      raise ValueError("Linear needs an input of at least one axis")
    w_init = self.w_init or hk.initializers.TruncatedNormal(stddev=1. / np.sqrt(inputs.shape[-1]))
    w = hk.get_parameter("w", [inputs.shape[-1], self.output_size], inputs.dtype, init=w_init)
    out = _dense(inputs, w)
    if self.with_bias:
      out = out + hk.get_parameter("b", [self.output_size], inputs.dtype, init=self.b_init)
    return out


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


def make_norm(kind: str, *, eps: float, bias: bool, name: str) -> hk.Module:
  """kind "rms" (Chinchilla, Llama, Gemma) | "layer" (GPT-NeoX; `bias`: with an offset)."""
  if kind == "rms":
    return RMSNorm(eps=eps, name=name)
  if kind == "layer":
    return LayerNorm(create_offset=bias, eps=eps, name=name)
  raise ValueError(f"norm {kind!r}; expected 'rms' or 'layer'")


ROTARY_LAYOUTS = ("half", "interleaved")


def apply_rotary(x: jax.Array, positions: jax.Array, max_wavelength: float, *,
                 fraction: float = 1.0, layout: str = "half") -> jax.Array:
  """Rotary position embedding (Su et al.) on x [B, L, H, K] at positions [B, L].

  The first `int(K * fraction)` dims of each head rotate (GPT-NeoX's partial rotary), the
  rest pass through. Pair i of the R rotating dims turns at max_wavelength^(-2i/R); the pairs
  are (i, i + R/2) in the "half" layout (GPT-NeoX, Hugging Face Llama) and (2i, 2i + 1) in
  the "interleaved" one (GPT-J, Meta's original Llama checkpoints).
  """
  if layout not in ROTARY_LAYOUTS:
    raise ValueError(f"rotary layout {layout!r}; expected one of {ROTARY_LAYOUTS}")
  rot = int(x.shape[-1] * fraction)
  if rot % 2 or rot == 0:
    raise ValueError(f"rotary dims int({x.shape[-1]} * {fraction}) = {rot} must be even and > 0")
  half = rot // 2
  freq = max_wavelength ** (-np.arange(half, dtype=np.float32) * 2.0 / rot)  # [R/2]
  phase = positions.astype(jnp.float32)[..., None] * freq                    # [B, L, R/2]
  sin, cos = jnp.sin(phase)[:, :, None, :], jnp.cos(phase)[:, :, None, :]   # [B, L, 1, R/2]
  x32 = x.astype(jnp.float32)
  x_rot, x_pass = x32[..., :rot], x32[..., rot:]
  if layout == "half":
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    pairs = x_rot.reshape(*x_rot.shape[:-1], half, 2)                        # [B, L, H, R/2, 2]
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    rotated = rotated.reshape(x_rot.shape)                                   # [B, L, H, R]
  return jnp.concatenate([rotated, x_pass], axis=-1).astype(x.dtype)


def alibi_slopes(num_heads: int, bias_max: float) -> np.ndarray:
  """ALiBi slopes [H] as MPT computes them: 2^(-m * bias_max / H') for m = 1..H', H' the
  next power of two; for other head counts the odd then the even ones, the first H."""
  padded = 2 ** int(np.ceil(np.log2(num_heads)))
  slopes = 1.0 / np.power(2.0, np.arange(1, padded + 1, dtype=np.float32) * (bias_max / padded))
  if padded != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)


class QKNorm(NamedTuple):
  """A norm on the queries and keys before the logits: over each head's K dims
  (`per_head`: IDEFICS, QK-norm) or over all heads' H*K (MPT's qk_ln)."""
  kind: str = "layer"                  # layer | rms
  eps: float = 1e-5
  bias: bool = True                    # layer norm with an offset
  per_head: bool = True


class Rotary(NamedTuple):
  """Rotary settings of a self-attention layer (see `apply_rotary`)."""
  max_wavelength: float
  fraction: float = 1.0
  layout: str = "half"


class MultiHeadAttention(hk.Module):
  """Multi-head attention (grouped-query when num_kv_heads < num_heads); logits and softmax
  in float32. Query head h reads key/value head h // (num_heads / num_kv_heads), as in
  Hugging Face's `repeat_kv`."""

  def __init__(self, *, num_heads: int, key_size: int, model_size: int,
               num_kv_heads: Optional[int] = None, qkv_bias: bool = False,
               output_bias: bool = False, w_init_scale: float = 1.0,
               impl: str = "einsum", clip: float = 0.0, qk_norm: Optional[QKNorm] = None,
               scale: float = 0.0, alibi: Optional[np.ndarray] = None,
               name: Optional[str] = None):
    """clip: clamp queries, keys and values to [-clip, clip] after their projection (MPT's
    clip_qkv; 0: no clamp). qk_norm: a norm on queries and keys (`query_norm`, `key_norm`).
    scale: of the logits (0: 1/sqrt(key_size)). alibi: ALiBi slopes [H]; the logit of query
    position p for key position s gets slope * (s - p) (causal: minus the distance)."""
    super().__init__(name=name)
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention impl={impl!r}; expected one of {ATTENTION_IMPLS}")
    self.impl = impl
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    if num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={num_heads}")
    self.key_size = key_size
    self.model_size = model_size
    self.qkv_bias = qkv_bias
    self.output_bias = output_bias
    self.w_init_scale = w_init_scale
    self.clip = clip
    self.qk_norm = qk_norm
    self.scale = scale or 1.0 / np.sqrt(key_size)
    self.alibi = None if alibi is None else np.asarray(alibi, np.float32)
    if self.alibi is not None and self.alibi.shape != (num_heads,):
      raise ValueError(f"alibi slopes {self.alibi.shape} for {num_heads} heads")
    self._linears = {}
    self._norms = {}

  @hk.name_like("__call__")           # submodule paths: self_attention/query, not ~_linear/query
  def _linear(self, name: str, size: int, with_bias: bool) -> Linear:
    """One projection per name, created on first use: `project_kv` and `__call__` share them."""
    if name not in self._linears:
      self._linears[name] = Linear(
          size, with_bias=with_bias, w_init=hk.initializers.VarianceScaling(self.w_init_scale),
          name=name)
    return self._linears[name]

  @hk.name_like("__call__")           # paths: self_attention/query_norm
  def _norm(self, name: str) -> hk.Module:
    if name not in self._norms:
      n = self.qk_norm
      self._norms[name] = make_norm(n.kind, eps=n.eps, bias=n.bias, name=name)
    return self._norms[name]

  def _project(self, x: jax.Array, heads: int, name: str) -> jax.Array:
    y = self._linear(name, heads * self.key_size, self.qkv_bias)(x)          # [B, L, H*K]
    if self.clip:
      y = jnp.clip(y, -self.clip, self.clip)
    norm = self.qk_norm is not None and name in ("query", "key")
    if norm and not self.qk_norm.per_head:
      y = self._norm(f"{name}_norm")(y)
    y = y.reshape(*x.shape[:-1], heads, self.key_size)                       # [B, L, H, K]
    if norm and self.qk_norm.per_head:
      y = self._norm(f"{name}_norm")(y)
    return y

  def _alibi_bias(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """float32 [B, H, Lq, Lk]: slope_h * (key position - query position)."""
    distance = (k_positions[:, None, None, :] - q_positions[:, None, :, None]).astype(jnp.float32)
    return jnp.asarray(self.alibi)[None, :, None, None] * distance

  @hk.name_like("__call__")
  def project_kv(self, key_value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """key_value [B, Lk, Dkv] -> (k, v) [B, Lk, Hkv, K], unrotated: computed once and
    passed back as `kv=` (cross-attention to visual tokens during generation)."""
    return (self._project(key_value, self.num_kv_heads, "key"),
            self._project(key_value, self.num_kv_heads, "value"))

  def __call__(self, query: jax.Array, key_value: Optional[jax.Array] = None, *,
               mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               rotary: Optional[Rotary] = None,
               kv: Optional[tuple[jax.Array, jax.Array]] = None,
               cache: Optional[dict] = None,
               splash_mask: Optional[splash.SplashMask] = None):
    """query [B, Lq, D], key_value [B, Lk, Dkv], mask bool [B, 1|H, Lq, Lk] -> [B, Lq, model_size].

    splash_mask: the same mask in the form splash attention takes (models/splash.py), where
    it has one; the "splash" / "auto" impls use the kernel only then.

    kv: precomputed `project_kv(key_value)` instead of key_value. cache (self-attention
    decoding): a layer stack's keys/values {"k", "v": [B, N, Hkv, S, K], "layer": int32 []}
    holding earlier positions; the new keys/values (rotated) are written into layer `layer`
    at `positions` (contiguous per row), the queries attend over its S slots under `mask`
    [B, 1, Lq, S], and (output, updated cache) is returned. The whole stack goes in and out
    (a scan's carry, not its per-layer input and output), so that XLA writes the new
    positions in place instead of copying every layer's slots on every token.
    """
    q = self._project(query, self.num_heads, "query")
    k, v = kv if kv is not None else self.project_kv(key_value)
    if rotary is not None:
      q = apply_rotary(q, positions, rotary.max_wavelength, fraction=rotary.fraction,
                       layout=rotary.layout)
      k = apply_rotary(k, positions, rotary.max_wavelength, fraction=rotary.fraction,
                       layout=rotary.layout)
    if cache is not None:
      layer = cache["layer"]
      # Row b's token t goes to [b, layer, :, positions[b, t]] of the [B, N, Hkv, S, K] stack:
      # one scatter into the carried buffer (prompts are ragged; slots past S are dropped).
      rows = jnp.arange(positions.shape[0])[:, None]                       # [B, 1]
      write = lambda full, new: full.at[rows, layer, :, positions].set(new.astype(full.dtype),
                                                                    mode="drop")
      cache = {"k": write(cache["k"], k), "v": write(cache["v"], v), "layer": layer}
      k, v = (jnp.swapaxes(jax.lax.dynamic_index_in_dim(cache[name], layer, 1, keepdims=False),
                           1, 2) for name in ("k", "v"))                   # [B, S, Hkv, K]
    b, lq = q.shape[:2]
    bias = None
    if self.alibi is not None:
      k_positions = (jnp.broadcast_to(jnp.arange(k.shape[1]), (b, k.shape[1]))
                     if cache is not None else positions)                  # cache: slot = position
      bias = self._alibi_bias(positions, k_positions)                     # [B, H, Lq, Lk]
    impl = resolve_impl(self.impl, q.dtype, self.key_size, splash_mask=(
        splash_mask is not None and bias is None and cache is None))
    if impl == "splash":
      attn = splash.attention(q, k, v, splash_mask, scale=float(self.scale))   # [B, Lq, H, K]
      attn = attn.reshape(b, lq, self.num_heads * self.key_size)
      return self._linear("output", self.model_size, self.output_bias)(attn)
    if impl != "einsum":
      attn = jax.nn.dot_product_attention(
          q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=float(self.scale),
          bias=None if bias is None else bias.astype(q.dtype),
          implementation=impl)                                               # [B, Lq, H, K]
      attn = attn.reshape(b, lq, self.num_heads * self.key_size)
      out = self._linear("output", self.model_size, self.output_bias)(attn)
      return out if cache is None else (out, cache)
    groups = self.num_heads // self.num_kv_heads
    if groups > 1:                  # grouped-query: no copies of the key/value heads
      q = q.reshape(b, lq, self.num_kv_heads, groups, self.key_size)       # [B, Lq, Hkv, G, K]
      logits = _scores("bqngk,btnk->bngqt", q, k)
      logits = logits.reshape(b, self.num_heads, lq, -1)                 # [B, H, Lq, Lk]
    else:
      logits = _scores("bqhk,bthk->bhqt", q, k)
    logits = logits * np.float32(self.scale)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)            # [B, H, Lq, Lk]
    if groups > 1:
      weights = weights.reshape(b, self.num_kv_heads, groups, lq, -1)    # [B, Hkv, G, Lq, Lk]
      attn = jnp.einsum("bngqt,btnk->bqngk", weights, v)                  # [B, Lq, Hkv, G, K]
    else:
      attn = jnp.einsum("bhqt,bthk->bqhk", weights, v)                    # [B, Lq, H, K]
    attn = attn.reshape(b, lq, self.num_heads * self.key_size)            # [B, Lq, H*K]
    out = self._linear("output", self.model_size, self.output_bias)(attn)
    return out if cache is None else (out, cache)


FFW_KINDS = ("mlp", "gated")


class FeedForward(hk.Module):
  """MLP `ffw_out(act(ffw_in(x)))`, or gated (SwiGLU / GeGLU): `ffw_out(act(ffw_gate(x)) *
  ffw_in(x))`. `ffw_in`/`ffw_gate` are column-parallel, `ffw_out` row-parallel."""

  def __init__(self, *, hidden_size: int, activation: str, kind: str = "mlp",
               bias: bool = False, w_init_scale: float = 1.0, name: Optional[str] = None):
    super().__init__(name=name)
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    if kind not in FFW_KINDS:
      raise ValueError(f"feed-forward kind {kind!r}; expected one of {FFW_KINDS}")
    self.hidden_size = hidden_size
    self.activation = ACTIVATIONS[activation]
    self.kind = kind
    self.bias = bias
    self.w_init_scale = w_init_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    w_init = hk.initializers.VarianceScaling(self.w_init_scale)
    linear = lambda size, name: Linear(size, with_bias=self.bias, w_init=w_init, name=name)
    if self.kind == "gated":
      h = self.activation(linear(self.hidden_size, "ffw_gate")(x)) * linear(
          self.hidden_size, "ffw_in")(x)
    else:
      h = self.activation(linear(self.hidden_size, "ffw_in")(x))
    return linear(x.shape[-1], "ffw_out")(h)
