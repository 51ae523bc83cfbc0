"""bfloat16 compute as docs/precision.md states it: in the lowered train step no matmul or
convolution takes a float32 operand; attention's score gradient is autodiff's in float32;
the attention kernel `auto` and `cudnn` resolve as documented."""

import os
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config_path
from flamingo_jax import config_base
from flamingo_jax import models
from flamingo_jax.models import attention
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks

# A matmul or convolution of the lowered program and its two operand types.
_MATMUL = re.compile(r"stablehlo\.(dot_general|convolution)[^\n]*?:\s*\((tensor<[^>]*>), "
                     r"(tensor<[^>]*>)\)[^\n]*?loc\((#loc\d+)\)")
_LOCATION = re.compile(r"^#(loc\d+) = loc\(\"?([^\"\n]*)", re.M)


# The float32 matmuls docs/precision.md's table allows, by the op name they lower under.
ALLOWED = {"ie,je->ij": "the contrastive loss's similarity matrix"}
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "precision.md")


def _bf16(config):
  config.precision.compute = "bfloat16"
  config.precision.frozen_params = "bfloat16"
  return config


def _with_options(config):
  """A CLIP ViT (every token) and IDEFICS' gated-layer options: SwiGLU, RMSNorms, per-head QK
  norms, per-channel gates; a perceiver with QK LayerNorms; grouped-query LM attention."""
  model = config.model
  model.vision.kind = "vit"
  model.vision.pixel_stats = "clip"
  model.vision.vit.update(width=32, layers=2, heads=2, patch_size=16, output="tokens")
  model.xattn.update(norm="rms", ffw="gated", ffw_size=96, gate="vector", qk_norm="rms")
  model.resampler.qk_norm = "layer"
  model.lm.num_kv_heads = 2
  return config


def _float32_matmuls(config) -> list[str]:
  setup = tasks.make_train_setup(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
  text = setup.step.lower(setup.abstract_state, setup.abstract_frozen,
                          setup.abstract_batches).as_text(debug_info=True)
  names = dict(_LOCATION.findall(text))
  found = [f"{kind} {a} x {b} at {names.get(loc[1:], loc)}"
           for kind, a, b, loc in _MATMUL.findall(text) if "f32" in a or "f32" in b]
  found = [f for f in found if not any(f"({op})" in f for op in ALLOWED)]
  total = len(_MATMUL.findall(text))
  assert total > 100, f"only {total} matmuls found: the pattern no longer reads the program"
  return found


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "vit_and_idefics_options", "contrastive"])
def test_bfloat16_step_has_no_float32_matmul_operand(variant):
  name = "contrastive_tiny" if variant == "contrastive" else "tiny"
  config = _bf16(config_base.load_config(config_path(name)))
  if variant == "vit_and_idefics_options":
    config = _with_options(config)
  assert _float32_matmuls(config) == []


def test_the_allowed_float32_matmuls_are_in_the_table():
  table = open(DOC).read()
  for op, what in ALLOWED.items():
    assert f"`{op}`" in table and what in table


@pytest.mark.slow
def test_the_check_sees_a_float32_matmul():
  """The same reading finds the float32 matmuls of a float32 step."""
  config = config_base.load_config(config_path("tiny"))
  config.precision.compute = "float32"
  assert len(_float32_matmuls(config)) > 100


@pytest.mark.parametrize("spec, q_shape, k_shape", [
    ("bqhk,bthk->bhqt", (2, 5, 3, 8), (2, 7, 3, 8)),
    ("bqngk,btnk->bngqt", (2, 5, 2, 3, 8), (2, 7, 2, 8)),      # grouped-query heads
])
def test_score_gradient_is_autodiffs_in_float32_and_bf16_operands_in_bfloat16(
    spec, q_shape, k_shape):
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (q_shape, k_shape))
  weight = jnp.asarray(rng.normal(size=jnp.einsum(spec, q, k).shape), jnp.float32)
  ours = jax.grad(lambda q, k: jnp.sum(attention._scores(spec, q, k) * weight), (0, 1))(q, k)  # pylint: disable=protected-access
  ref = jax.grad(lambda q, k: jnp.sum(jnp.einsum(spec, q, k) * weight), (0, 1))(q, k)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  q16, k16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  low = jax.grad(lambda q, k: jnp.sum(attention._scores(spec, q, k) * weight), (0, 1))(q16, k16)  # pylint: disable=protected-access
  grad = jax.grad(lambda q, k: jnp.sum(attention._scores(spec, q, k) * weight), (0, 1))  # pylint: disable=protected-access
  matmuls = _MATMUL.findall(jax.jit(grad).lower(q16, k16).as_text(debug_info=True))
  assert len(matmuls) == 2            # the backward's two (the forward's output is unused)
  assert all("f32" not in a and "f32" not in b for _, a, b, _ in matmuls), matmuls
  for a, b in zip(low, ref):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.1)


def test_attention_kernel_resolution():
  resolve = attention.resolve_impl
  assert resolve("auto", jnp.bfloat16, 128, "gpu") == "cudnn"
  assert resolve("auto", jnp.float16, 64, "gpu") == "cudnn"
  assert resolve("auto", jnp.float32, 128, "gpu") == "einsum"       # cuDNN takes half only
  assert resolve("auto", jnp.bfloat16, 96 + 4, "gpu") == "einsum"   # not a multiple of 8
  assert resolve("auto", jnp.bfloat16, 256, "gpu") == "einsum"      # wider than 128
  assert resolve("auto", jnp.bfloat16, 128, "cpu") == "einsum"
  assert resolve("auto", jnp.bfloat16, 128, "tpu") == "einsum"      # no splash-form mask
  assert resolve("xla", jnp.float32, 64, "cpu") == "xla"
  assert resolve("cudnn", jnp.bfloat16, 64, "gpu") == "cudnn"
  assert resolve("cudnn", jnp.float32, 64, "gpu") == "einsum"       # the float32 init's forward
  config = config_base.load_config(config_path("tiny"))
  config.model.attention_impl = "cudnn"                              # tiny computes in float32
  with pytest.raises(ValueError, match="attention_impl=cudnn needs precision.compute=bfloat16"):
    tasks.make_train_setup(config, sharding.make_mesh(1, 1, jax.devices()[:1]))


def test_cudnn_models_initialise_without_a_gpu():
  """Parameters are made in float32, which cuDNN refuses (the H200's crash: "Q must be
  fp16/bf16"): the init's forward runs the einsums, here on a CPU."""
  config = config_base.load_config(config_path("tiny"))
  config.model.attention_impl = "cudnn"
  model = models.make_flamingo(config.model, compute_dtype=jnp.bfloat16)
  size = config.model.image_size
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                          jnp.zeros((1, 1, 1, size, size, 3), jnp.uint8))
  reference = jax.eval_shape(
      models.make_flamingo(config_base.load_config(config_path("tiny")).model).init,
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 1, 1, size, size, 3),
                                                                jnp.uint8))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), reference)
  assert hk.data_structures.tree_size(params) > 0
