"""OpenFlamingo 2.0.1 compatibility (weights/openflamingo.py): its modules' weights run in ours
with equal outputs. Fixtures: tests/data/openflamingo/make_fixture.py (OpenFlamingo's own
modules, randomised)."""

import os

import haiku as hk
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, needs_reference, regenerate_fixture
from flamingo_jax import weights
from flamingo_jax.models import gated_xattn
from flamingo_jax.models import perceiver
from flamingo_jax.weights import openflamingo

FIXTURE = os.path.join(REPO, "tests", "data", "openflamingo")


def _resampler_output(directory):
  ckpt = weights.SafetensorsCheckpoint(os.path.join(directory, "resampler.safetensors"))
  params, fields = openflamingo.resampler_params(dict(ckpt), dim_head=8)
  forward = hk.transform(lambda x: perceiver.PerceiverResampler(max_frames=8, **fields)(x))
  ours = {k.removeprefix("flamingo/"): v for k, v in params.items()}
  x = np.load(os.path.join(directory, "resampler_in.npy"))     # [b, media, frames, v, D]
  return np.asarray(forward.apply(ours, None, jnp.asarray(x))), fields


def test_openflamingo_resampler_runs_in_ours():
  """Its vision_x layout [b, media, frames, tokens, D] is our [B, N, T, S, C]; frames are
  concatenated with no time embedding, as its factory builds it."""
  got, fields = _resampler_output(FIXTURE)
  expected = np.load(os.path.join(FIXTURE, "resampler_out.npy"))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert fields == dict(num_layers=2, dim=32, num_heads=4, key_size=8, ffw_mult=4,
                        num_latents=6, num_time_embeddings=0, input_projection=False,
                        ffw_activation="gelu_exact")


def test_the_paper_resampler_options_differ_on_the_same_weights():
  """Each option matters: squared ReLU instead of GELU changes the output."""
  ckpt = weights.SafetensorsCheckpoint(os.path.join(FIXTURE, "resampler.safetensors"))
  params, fields = openflamingo.resampler_params(dict(ckpt), dim_head=8)
  fields["ffw_activation"] = "squared_relu"
  forward = hk.transform(lambda x: perceiver.PerceiverResampler(max_frames=8, **fields)(x))
  ours = {k.removeprefix("flamingo/"): v for k, v in params.items()}
  x = np.load(os.path.join(FIXTURE, "resampler_in.npy"))
  got = np.asarray(forward.apply(ours, None, jnp.asarray(x)))
  expected = np.load(os.path.join(FIXTURE, "resampler_out.npy"))
  assert np.abs(got - expected).max() > 1e-2


def test_unsupported_and_foreign_tensors_are_named():
  ckpt = dict(weights.SafetensorsCheckpoint(os.path.join(FIXTURE, "resampler.safetensors")))
  with pytest.raises(weights.CheckpointError, match="frame / media-time embeddings"):
    openflamingo.resampler_params(ckpt | {"perceiver.frame_embs": np.zeros((4, 32))},
                                  dim_head=8)
  with pytest.raises(weights.CheckpointError, match="perceiver.extra.w has no place"):
    openflamingo.resampler_params(ckpt | {"perceiver.extra.w": np.zeros(2)}, dim_head=8)
  with pytest.raises(weights.CheckpointError, match="not a multiple of dim_head 64"):
    openflamingo.resampler_params(ckpt, dim_head=64)


def _xattn_output(directory, **options):
  ckpt = weights.SafetensorsCheckpoint(os.path.join(directory, "xattn.safetensors"))
  block = openflamingo.xattn_block_params(dict(ckpt), 0)
  params = {"xattn" + (f"/{m}" if m else ""): leaves for m, leaves in block.items()}
  if options.get("media_norm"):                                   # an identity-initialised LN
    params["xattn/media_norm"] = {"scale": np.ones(24, np.float32),
                                  "offset": np.zeros(24, np.float32)}
  options = dict(media_norm=False, ffw_activation="gelu_exact") | options
  forward = hk.transform(lambda y, visual, phi: gated_xattn.GatedCrossAttentionDense(
      num_heads=4, key_size=8, ffw_mult=4, name="xattn", **options)(y, visual, phi))
  load = lambda name: np.load(os.path.join(directory, f"{name}.npy"))
  phi = np.cumsum(load("xattn_locations"), axis=-1, dtype=np.int32)   # OpenFlamingo's text_time
  return np.asarray(forward.apply(params, None, jnp.asarray(load("xattn_text")),
                                  jnp.asarray(load("xattn_media")), jnp.asarray(phi)))


def test_openflamingo_gated_block_runs_in_ours():
  """Same output on text with tokens before any image (zeroed cross-attention), two images
  in a row, and one image at position 0 with a second media slot unused."""
  expected = np.load(os.path.join(FIXTURE, "xattn_out.npy"))
  np.testing.assert_allclose(_xattn_output(FIXTURE), expected, rtol=1e-5, atol=1e-5)
  # The paper's LayerNorm on the visual tokens is a real difference on the same weights
  # (with scale 1 and offset 0 it still normalises), and so is its squared ReLU.
  assert np.abs(_xattn_output(FIXTURE, media_norm=True) - expected).max() > 1e-3
  assert np.abs(_xattn_output(FIXTURE, ffw_activation="squared_relu") - expected).max() > 1e-3


def test_openflamingo_gated_block_maps_every_tensor_and_names_a_missing_block():
  ckpt = dict(weights.SafetensorsCheckpoint(os.path.join(FIXTURE, "xattn.safetensors")))
  block = openflamingo.xattn_block_params(ckpt, 0)
  assert block[""]["alpha_xattn"].shape == () and block[""]["alpha_dense"].shape == ()
  assert set(block) == {"", "query_norm", "ffw_norm", "cross_attention/query",
                        "cross_attention/key", "cross_attention/value",
                        "cross_attention/output", "ffw/ffw_in", "ffw/ffw_out"}
  with pytest.raises(weights.CheckpointError, match="no lang_encoder.gated_cross_attn_layers.3"):
    openflamingo.xattn_block_params(ckpt, 3)


@needs_reference("open_flamingo", "torch", script="tests/data/openflamingo/make_fixture.py")
def test_openflamingo_fixture_regenerates_with_the_installed_library(tmp_path):
  regenerate_fixture(os.path.join(FIXTURE, "make_fixture.py"), tmp_path)
  got, _ = _resampler_output(str(tmp_path))
  np.testing.assert_allclose(got, np.load(str(tmp_path / "resampler_out.npy")),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_xattn_output(str(tmp_path)),
                             np.load(str(tmp_path / "xattn_out.npy")), rtol=1e-5, atol=1e-5)
