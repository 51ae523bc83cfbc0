"""Splash attention: the Pallas flash-attention kernel for TPU (attention_impl "splash", and
"auto" on a TPU), for the two attentions that carry most of the FLOPs at long context:

- the LM's causal self-attention (optionally a sliding window): a static mask, whose blocks
  above the diagonal the kernel skips;
- the gated cross-attention with `only_attend_immediate_media`: text token t sees the visual
  tokens of media φ(t) only. That is a segment-id mask: query segment φ(t), key segment the
  media index (1-based), so a token with φ <= 0 or past the media slots matches no key (its
  row comes out finite and the caller zeroes it, as with the einsums).

Other attentions (the resampler, the ViT, ALiBi, decoding against a cache) keep the einsums:
their masks are not of these forms or their queries are too short to gain (docs/precision.md).

Sharding: the kernel is one custom call that GSPMD cannot split, so it runs under `shard_map`
over the mesh the step is traced for (`traced_on`, entered by training/train_step.in_mesh
while the step traces; a trace-time setting only, unlike `jax.set_mesh` it changes no array's
type): the batch over every axis but `HEAD_AXIS`, the heads over `HEAD_AXIS` (Megatron's
column-parallel queries already are), each replicated instead when it does not divide. Off a
TPU (tests on CPU) the same kernel runs in Pallas' interpreter.
"""

import contextlib
import contextvars
import math
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import Mesh, PartitionSpec as P

# The tensor-parallel mesh axis (training/sharding.MODEL; tests/test_splash.py holds them equal).
HEAD_AXIS = "model"
# Sequence lengths are padded to a multiple of this (the TPU lane width) and cut into blocks of
# up to _MAX_BLOCK tokens.
_LANES = 128
_MAX_BLOCK = 512
# A key segment no query segment can equal (φ is >= -num_media).
_PAD_SEGMENT = int(np.iinfo(np.int32).min)


class SplashMask(NamedTuple):
  """A mask in the form the kernel takes: `causal` (key s <= query t; with `sliding_window`
  w > 0 also t - s < w), and/or segment ids (query t sees key s iff q_segments[b, t] ==
  kv_segments[b, s])."""
  causal: bool = False
  sliding_window: int = 0
  q_segments: Optional[jax.Array] = None      # [B, Lq] int32
  kv_segments: Optional[jax.Array] = None     # [B, Lk] int32


_TRACE_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar(
    "splash_trace_mesh", default=None)


@contextlib.contextmanager
def traced_on(mesh: Mesh) -> Iterator[None]:
  """Code traced inside runs on `mesh`: the kernels shard_map over it, and `platform()` is
  its devices' (for an AOT compile, the target's)."""
  token = _TRACE_MESH.set(mesh)
  try:
    yield
  finally:
    _TRACE_MESH.reset(token)


def platform() -> str:
  """The platform the code is being traced for: the `traced_on` mesh's, else the default
  backend's."""
  mesh = _TRACE_MESH.get()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _padded(length: int) -> int:
  return math.ceil(length / _LANES) * _LANES


def _block(length: int) -> int:
  """The largest power-of-two multiple of the lane width, up to _MAX_BLOCK, dividing `length`."""
  block = _MAX_BLOCK
  while length % block:
    block //= 2
  return block


def _kernel(structure: SplashMask, heads: int, q_len: int, kv_len: int, interpret: bool):
  """The kernel for `heads` local query heads over padded lengths (q_len, kv_len)."""
  shape = (q_len, kv_len)
  if structure.causal and structure.sliding_window:
    one = mask_lib.LocalMask(shape, window_size=(structure.sliding_window - 1, 0), offset=0)
  elif structure.causal:
    one = mask_lib.CausalMask(shape)
  else:
    one = mask_lib.FullMask(shape)
  bq, bkv = _block(q_len), _block(kv_len)
  blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                 block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                 block_q_dq=bq, block_kv_dq=bkv)
  return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([one] * heads), block_sizes=blocks,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, structure: SplashMask, *,
              scale: float) -> jax.Array:
  """q [B, Lq, H, K], k, v [B, Lk, Hkv, K] (Hkv divides H: grouped-query) -> [B, Lq, H, K].

  Logits q·k·scale and the softmax accumulate in float32 inside the kernel; q is scaled in
  its own dtype first (the kernel has no scale)."""
  b, lq, heads, _ = q.shape
  lk, kv_heads = k.shape[1], k.shape[2]
  lq_pad, lk_pad = _padded(lq), _padded(lk)
  # [B, L, H, K] -> [B, H, L, K], the kernel's layout; the padding sits past every real key
  # (causal: no real query reaches it) or carries a segment no query has.
  to_heads = lambda x, pad: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
  qh = to_heads(q * jnp.asarray(scale, q.dtype), lq_pad - lq)             # [B, H, Lq', K]
  kh = to_heads(k.astype(q.dtype), lk_pad - lk)                           # [B, Hkv, Lk', K]
  vh = to_heads(v.astype(q.dtype), lk_pad - lk)
  segmented = structure.q_segments is not None
  if segmented:
    q_ids = jnp.pad(structure.q_segments.astype(jnp.int32), ((0, 0), (0, lq_pad - lq)))
    kv_ids = jnp.pad(jnp.broadcast_to(structure.kv_segments.astype(jnp.int32), (b, lk)),
                     ((0, 0), (0, lk_pad - lk)), constant_values=_PAD_SEGMENT)
  else:
    q_ids = kv_ids = jnp.zeros((b, 0), jnp.int32)           # unused; keeps one signature
  interpret = platform() != "tpu"

  def local(qh, kh, vh, q_ids, kv_ids):
    run = _kernel(structure, qh.shape[1], lq_pad, lk_pad, interpret)
    if segmented:
      return jax.vmap(lambda q, k, v, qi, ki: run(q, k, v, segment_ids=kernel_lib.SegmentIds(
          qi, ki)))(qh, kh, vh, q_ids, kv_ids)
    return jax.vmap(run)(qh, kh, vh)

  mesh = _TRACE_MESH.get()
  if mesh is None or mesh.size == 1:
    out = local(qh, kh, vh, q_ids, kv_ids)
  else:
    sizes = dict(mesh.shape)
    batch_axes = tuple(a for a in mesh.axis_names if a != HEAD_AXIS)
    batch = batch_axes if b % math.prod(sizes[a] for a in batch_axes) == 0 else None
    tp = sizes.get(HEAD_AXIS, 1)
    head = HEAD_AXIS if HEAD_AXIS in sizes and heads % tp == 0 and kv_heads % tp == 0 else None
    act, ids = P(batch, head, None, None), P(batch, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, ids, ids), out_specs=act,
                        check_vma=False)(qh, kh, vh, q_ids, kv_ids)
  return jnp.swapaxes(out[:, :, :lq], 1, 2)                               # [B, Lq, H, K]
