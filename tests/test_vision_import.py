"""Vision-tower import: timm's NFNet -> ours, equal features (weights/vision.py), and the two
NFNet arithmetics (models/vision/nfnet.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from flamingo_jax import weights
from flamingo_jax.models.vision import nfnet
from flamingo_jax.weights import vision

FIXTURE = os.path.join(REPO, "tests", "data", "nfnet_timm")
# The fixture's network (make_fixture.py): our tiny widths, two stacked blocks in stages 1, 3.
FIXTURE_VARIANT = dict(width=(16, 32, 64, 64), depth=(1, 2, 1, 2), group_size=8,
                       train_imsize=64, test_imsize=64)


@pytest.fixture
def fixture_variant(monkeypatch):
  monkeypatch.setitem(nfnet.NFNET_VARIANTS, "fixture", FIXTURE_VARIANT)


def _features(params, images, numerics, variant="fixture"):
  def forward(x):
    return nfnet.NFNet(variant, numerics=numerics, name="vision_encoder")(x, is_training=False)
  ours = {k.removeprefix("flamingo/"): v for k, v in params.items()}
  return np.asarray(hk.transform(forward).apply(ours, None, jnp.asarray(images)))


def _relative_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compare_with_timm(directory):
  """(relative L2 with timm numerics, with deepmind numerics) of our features vs timm's."""
  params, fields = vision.load_timm_nfnet(os.path.join(directory, "weights.safetensors"))
  assert fields == {"vision": {"variant": "fixture", "numerics": "timm"}}
  images = np.load(os.path.join(directory, "images.npy"))
  expected = np.load(os.path.join(directory, "features.npy"))
  return (_relative_l2(_features(params, images, "timm"), expected),
          _relative_l2(_features(params, images, "deepmind"), expected))


def test_imported_timm_nfnet_gives_timm_features(fixture_variant):
  timm_numerics, deepmind_numerics = compare_with_timm(FIXTURE)
  assert timm_numerics < 1e-5, timm_numerics
  # The other arithmetic on the same weights is measurably different: the option matters.
  assert deepmind_numerics > 1e-3, deepmind_numerics


def test_stacked_blocks_take_their_rows_and_the_head_is_left_out(fixture_variant):
  params, _ = vision.load_timm_nfnet(os.path.join(FIXTURE, "weights.safetensors"))
  ckpt = weights.SafetensorsCheckpoint(os.path.join(FIXTURE, "weights.safetensors"))
  stacked = params["flamingo/vision_encoder/stage3_blocks/block/conv1"]["w"]
  assert stacked.shape == (1, 3, 3, 8, 32)                   # stage 3: blocks 1.. as rows
  np.testing.assert_array_equal(stacked[0], ckpt.read("stages.3.1.conv2.weight")
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["flamingo/vision_encoder/stage1_block0"]["skip_gain"],
                                ckpt.read("stages.1.0.skipinit_gain"))
  assert not any("classifier" in module for module in params)


def test_a_network_no_variant_matches_is_named(tmp_path):
  # Without the fixture's variant registered, its depths match nothing we have.
  with pytest.raises(weights.CheckpointError, match=r"no NFNet variant has stage depths "
                                                    r"\(1, 2, 1, 2\)"):
    vision.load_timm_nfnet(os.path.join(FIXTURE, "weights.safetensors"))
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"layer.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
  with pytest.raises(weights.CheckpointError, match="not an NFNet state dict"):
    vision.load_timm_nfnet(str(tmp_path / "x.safetensors"))


def test_import_weights_writes_params_the_model_loads(fixture_variant, tmp_path):
  from flamingo_jax.tools import vision_import  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "nfnet")
  report = vision_import.run("nfnet", os.path.join(FIXTURE, "weights.safetensors"), out)
  assert report["variant"] == "fixture" and report["parameters"] > 90_000
  with open(os.path.join(out, "model.json")) as f:
    assert json.load(f) == {"vision": {"variant": "fixture", "numerics": "timm"}}
  shapes = vision.expected_shapes("fixture")
  target = {m: {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in leaves.items()}
            for m, leaves in shapes.items()}
  restored = weights.restore_params(os.path.join(out, "params"), target)
  images = np.load(os.path.join(FIXTURE, "images.npy"))
  expected = np.load(os.path.join(FIXTURE, "features.npy"))
  assert _relative_l2(_features(restored, images, "timm"), expected) < 1e-5
  with pytest.raises(weights.CheckpointError, match="already exists"):
    vision_import.run("nfnet", os.path.join(FIXTURE, "weights.safetensors"), out)


def test_stochastic_depth_follows_the_numerics():
  """DeepMind's reference zeroes dropped rows and leaves the kept ones as they are; timm
  divides the kept ones by the keep probability."""
  rate = 0.5

  def block(numerics):
    def forward(x, is_training):
      return nfnet.NFBlock(in_ch=8, out_ch=8, group_size=8, stride=1, beta=1.0, alpha=0.2,
                           activation="gelu", se_ratio=0.5, stochdepth_rate=rate,
                           numerics=numerics)(x, is_training)
    return hk.transform(forward)

  x = jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
  for numerics, kept_scale in (("deepmind", 1.0), ("timm", 1.0 / (1.0 - rate))):
    net = block(numerics)
    params = net.init(jax.random.key(1), x, True)
    params = jax.tree.map(lambda p: p + 0.5, params)       # a non-zero skip gain
    full = net.apply(params, None, x, False) - x            # the branch, never dropped
    trained = net.apply(params, jax.random.key(2), x, True) - x
    per_row = [float(jnp.vdot(t, f) / jnp.vdot(f, f)) for t, f in zip(trained, full)]
    assert set(np.round(per_row, 5)) == {0.0, round(kept_scale, 5)}, (numerics, per_row)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="timm/torch not installed (see tests/data/nfnet_timm/make_fixture.py)")
def test_fixture_regenerates_with_the_installed_timm(fixture_variant, tmp_path):
  result = subprocess.run([sys.executable, os.path.join(FIXTURE, "make_fixture.py"),
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  timm_numerics, _ = compare_with_timm(str(tmp_path))
  assert timm_numerics < 1e-5, timm_numerics


def test_a_flamingo_run_loads_the_imported_tower(fixture_variant, tiny_config, tmp_path):
  """pretrained.py's `vision=DIR` path: the import's model.json sets variant and numerics,
  and the trainer's frozen towers hold the imported values."""
  import copy  # pylint: disable=g-import-not-at-top
  from flamingo_jax import config_base  # pylint: disable=g-import-not-at-top
  from flamingo_jax.tools import vision_import  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import sharding, train_step, trainer  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "nfnet")
  vision_import.run("nfnet", os.path.join(FIXTURE, "weights.safetensors"), out)
  with open(os.path.join(out, "model.json")) as f:
    fields = json.load(f)
  config = copy.deepcopy(tiny_config)
  config.model = config_base.with_imported_vision(config.model, fields,
                                                  os.path.join(out, "params"))
  assert (config.model.vision.variant, config.model.vision.numerics) == ("fixture", "timm")
  setup = train_step.make_train_setup(config, sharding.make_mesh(-1, 1))
  _, fresh = setup.init(jax.random.key(0))
  frozen = trainer.load_init_checkpoints(config.model, fresh, setup)
  imported, _ = vision.load_timm_nfnet(os.path.join(FIXTURE, "weights.safetensors"))
  for module, leaves in imported.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(np.asarray(frozen[module][name]), value,
                                    err_msg=f"{module}/{name}")     # float32 frozen towers
