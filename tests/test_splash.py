"""Splash attention (models/splash.py) equals the einsums: the LM's causal self-attention
(grouped-query, a sliding window, lengths off the 128 grid), the gated cross-attention's
segment mask (tokens before any image, IDEFICS' silenced φ < 0, φ past the media slots), on
one device and shard_mapped over an 8-device mesh; and it compiles for a TPU through libtpu."""

import functools
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flamingo_jax.models import attention, gated_xattn, splash
from flamingo_jax.training import roofline, sharding, train_step


def _self_attention(impl, window, x, positions):
  mask = jnp.tril(jnp.ones((x.shape[1],) * 2, bool))
  if window:
    mask &= ~jnp.tril(mask, -window)
  attn = attention.MultiHeadAttention(num_heads=4, key_size=16, model_size=x.shape[-1],
                                      num_kv_heads=2, impl=impl, name="self_attention")
  return attn(x, x, mask=mask[None, None], positions=positions,
              rotary=attention.Rotary(10_000.0),
              splash_mask=splash.SplashMask(causal=True, sliding_window=window))


def _xattn(impl, y, visual, phi):
  block = gated_xattn.GatedCrossAttentionDense(num_heads=4, key_size=8, ffw_mult=2,
                                               attention_impl=impl, name="xattn")
  return block(y, visual, phi)


def _inputs(batch=4, length=200, dim=32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return x, positions


def _kernels(fn, params, *inputs) -> int:
  """How many Pallas kernels the forward calls (0: it ran the einsums)."""
  return str(jax.make_jaxpr(fn.apply)(params, None, *inputs)).count("pallas_call")


def _value_and_grads(fn, params, *inputs):
  loss = lambda p, *a: jnp.sum(jnp.sin(fn.apply(p, None, *a)))
  out = fn.apply(params, None, *inputs)
  grads = jax.grad(loss, argnums=(0, 1))(params, *inputs)
  return out, grads


def _assert_close(a, b, tol):
  """Each leaf within tol of its own scale (max |reference|, at least 1): float32 sums in
  another order."""
  leaves = jax.tree.leaves(b)
  assert len(jax.tree.leaves(a)) == len(leaves)
  for x, y in zip(jax.tree.leaves(a), leaves):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape
    assert np.max(np.abs(x - y)) <= tol * max(1.0, float(np.max(np.abs(y)))), (x, y)


@pytest.mark.parametrize("window", [0, 50])
def test_splash_self_attention_equals_einsum(window):
  x, positions = _inputs()
  fns = {impl: hk.transform(functools.partial(_self_attention, impl, window))
         for impl in ("einsum", "splash")}
  params = fns["einsum"].init(jax.random.key(0), x, positions)
  assert _kernels(fns["splash"], params, x, positions) == 1
  assert _kernels(fns["einsum"], params, x, positions) == 0
  ref = _value_and_grads(fns["einsum"], params, x, positions)
  got = _value_and_grads(fns["splash"], params, x, positions)
  _assert_close(got, ref, 2e-5)


def _phi_and_visual(batch=4, length=150, media=3, tokens=5, dim=24, seed=1):
  rng = np.random.default_rng(seed)
  # φ: 0 before the first image, IDEFICS' silenced tokens (< 0), past the slots (> media).
  phi = jnp.asarray(rng.integers(-2, media + 2, size=(batch, length)), jnp.int32)
  visual = jnp.asarray(rng.normal(size=(batch, media, tokens, dim)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(batch, length, 32)), jnp.float32)
  return y, visual, phi


def test_splash_cross_attention_equals_einsum():
  y, visual, phi = _phi_and_visual()
  fns = {impl: hk.transform(functools.partial(_xattn, impl)) for impl in ("einsum", "splash")}
  params = fns["einsum"].init(jax.random.key(0), y, visual, phi)
  params = jax.tree.map(lambda p: p + 0.5 if p.ndim == 0 else p, params)  # open the gates
  assert _kernels(fns["splash"], params, y, visual, phi) == 1
  ref = _value_and_grads(fns["einsum"], params, y, visual, phi)
  got = _value_and_grads(fns["splash"], params, y, visual, phi)
  _assert_close(got, ref, 2e-5)


@pytest.mark.parametrize("batch", [8, 2])                # 2: the data axis (4) does not divide it
def test_splash_shard_mapped_over_the_mesh_equals_one_device(batch):
  mesh = sharding.make_mesh(4, 2)
  y, visual, phi = _phi_and_visual(batch=batch)
  fn = hk.transform(functools.partial(_xattn, "splash"))
  params = fn.init(jax.random.key(0), y, visual, phi)
  params = jax.tree.map(lambda p: p + 0.5 if p.ndim == 0 else p, params)
  loss = lambda p, *a: jnp.sum(jnp.sin(fn.apply(p, None, *a)))
  step = jax.value_and_grad(loss)
  ref = jax.jit(step)(params, y, visual, phi)
  data = NamedSharding(mesh, P(sharding.DATA) if batch % 4 == 0 else P())
  sharded = jax.jit(train_step.in_mesh(mesh, step),
                    in_shardings=(NamedSharding(mesh, P()), data, data, data))
  text = sharded.lower(params, y, visual, phi).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text    # the kernel runs per shard
  _assert_close(sharded(params, y, visual, phi), ref, 1e-5)


def test_head_axis_is_the_tensor_parallel_axis():
  assert splash.HEAD_AXIS == sharding.MODEL


def test_auto_picks_splash_on_a_tpu_for_its_masks_only():
  resolve = attention.resolve_impl
  assert resolve("auto", jnp.bfloat16, 128, "tpu", splash_mask=True) == "splash"
  assert resolve("auto", jnp.float32, 128, "tpu", splash_mask=True) == "splash"
  assert resolve("auto", jnp.bfloat16, 128, "tpu") == "einsum"      # resampler, ViT, ALiBi, cache
  assert resolve("auto", jnp.bfloat16, 128, "gpu", splash_mask=True) == "cudnn"
  assert resolve("splash", jnp.bfloat16, 128, "cpu", splash_mask=True) == "splash"  # interpreted
  assert resolve("splash", jnp.bfloat16, 128, "tpu") == "einsum"
  mesh = sharding.make_mesh(1, 1, sharding.topology_devices("v4:2x2x1")[:1])
  seen = []
  jax.jit(train_step.in_mesh(mesh, lambda x: seen.append(splash.platform()) or x)).trace(1.0)
  assert seen == ["tpu"]                                  # the step's target, not this CPU
  jax.jit(lambda x: seen.append(splash.platform()) or x).trace(1.0)
  assert seen[-1] == "cpu"


@pytest.mark.parametrize("topology,chip", [("v4:2x2x1", "TPU v4"), ("v5p:2x2x1", "TPU v5")])
def test_splash_compiles_for_a_tpu_and_the_roofline_counts_its_flops(topology, chip):
  """Through libtpu (no TPU): the attention's forward and backward compile to the splash
  kernels, per shard of a data=2, model=2 mesh, and the roofline counts their FLOPs."""
  batch, length, heads, key_size, dim = 4, 256, 4, 128, 256
  devices = sharding.topology_devices(topology)
  assert devices[0].device_kind == chip
  mesh = sharding.make_mesh(2, 2, devices)

  def attend(x):
    attn = attention.MultiHeadAttention(num_heads=heads, key_size=key_size, model_size=dim,
                                        impl="splash", name="self_attention")
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    return attn(x, x, mask=mask, splash_mask=splash.SplashMask(causal=True))

  fn = hk.without_apply_rng(hk.transform(attend))
  x = jax.ShapeDtypeStruct((batch, length, dim), jnp.bfloat16)
  params = jax.eval_shape(fn.init, jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(fn.apply(p, x).astype(jnp.float32))
  step = jax.jit(train_step.in_mesh(mesh, jax.grad(loss, argnums=(0, 1))),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.DATA))))
  text = step.lower(params, x).compile().as_text()
  kernels = re.findall(r"%(splash_mha_(fwd|dq|dkv)[\w.]*) = .*custom_call_target=\"tpu_custom_call\"",
                       text)
  assert sorted(phase for _, phase in kernels) == ["dkv", "dq", "fwd"], kernels
  # Per shard: batch 4 / data 2, heads 4 / model 2; dense 2 * B * H * L * L * K per matmul.
  per_matmul = 2 * (batch // 2) * (heads // 2) * length * length * key_size
  estimate = roofline.for_device(text, chip)
  assert estimate["kernel_flops"] == per_matmul * (2 + 3 + 4)
