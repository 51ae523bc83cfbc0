"""Vision-tower imports (weights/vision.py): timm's NFNet and OpenCLIP's ViT -> ours, equal
features; the two NFNet arithmetics (models/vision/nfnet.py); a Flamingo around each."""

import copy
import json
import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import REPO, config_path, needs_reference, regenerate_fixture
from flamingo_jax import config_base
from flamingo_jax.models import flamingo
from flamingo_jax.models.vision import nfnet
from flamingo_jax.models.vision import vit
from flamingo_jax.training import flops
from flamingo_jax.training import param_sources
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax import weights
from flamingo_jax.weights import imports
from flamingo_jax.weights import parity
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
  save_file({"layer.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
  with pytest.raises(weights.CheckpointError, match="not an NFNet state dict"):
    vision.load_timm_nfnet(str(tmp_path / "x.safetensors"))


@pytest.mark.slow
def test_import_weights_writes_params_the_model_loads(fixture_variant, tmp_path):
  out = str(tmp_path / "nfnet")
  report = imports.run_vision("nfnet", os.path.join(FIXTURE, "weights.safetensors"), out)
  assert report["fields"]["vision"]["variant"] == "fixture" and report["parameters"] > 90_000
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
    imports.run_vision("nfnet", os.path.join(FIXTURE, "weights.safetensors"), out)


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


@needs_reference("timm", "torch", script="tests/data/nfnet_timm/make_fixture.py")
def test_fixture_regenerates_with_the_installed_timm(fixture_variant, tmp_path):
  regenerate_fixture(os.path.join(FIXTURE, "make_fixture.py"), tmp_path)
  timm_numerics, _ = compare_with_timm(str(tmp_path))
  assert timm_numerics < 1e-5, timm_numerics


@pytest.mark.slow
def test_a_flamingo_run_loads_the_imported_tower(fixture_variant, tiny_config, tmp_path):
  """pretrained.py's `vision=DIR` path: the import's model.json sets variant and numerics,
  and the trainer's frozen towers hold the imported values."""
  out = str(tmp_path / "nfnet")
  imports.run_vision("nfnet", os.path.join(FIXTURE, "weights.safetensors"), out)
  with open(os.path.join(out, "model.json")) as f:
    fields = json.load(f)
  config = copy.deepcopy(tiny_config)
  config.model = config_base.with_imported_vision(config.model, fields,
                                                  os.path.join(out, "params"))
  assert (config.model.vision.variant, config.model.vision.numerics) == ("fixture", "timm")
  setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
  _, fresh = setup.init(jax.random.key(0))
  frozen = param_sources.init_checkpoints(config.model, fresh)
  imported, _ = vision.load_timm_nfnet(os.path.join(FIXTURE, "weights.safetensors"))
  for module, leaves in imported.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(np.asarray(frozen[module][name]), value,
                                    err_msg=f"{module}/{name}")     # float32 frozen towers


# --- CLIP ViT (OpenCLIP layout) -------------------------------------------------------------

CLIP_FIXTURE = os.path.join(REPO, "tests", "data", "clip_vit")


def _vit_tokens(params, fields, images):
  forward = hk.transform(lambda x: vit.VisionTransformer(
      image_size=fields["image_size"], name="vision_encoder", **fields["vision"]["vit"])(x))
  ours = {k.removeprefix("flamingo/"): v for k, v in params.items()}
  return np.asarray(forward.apply(ours, None, jnp.asarray(images)))


def compare_with_open_clip(directory, heads=2):
  params, fields = vision.load_clip_vit(os.path.join(directory, "weights.safetensors"),
                                            heads=heads)
  images = np.load(os.path.join(directory, "images.npy"))
  expected = np.load(os.path.join(directory, "tokens.npy"))
  return _relative_l2(_vit_tokens(params, fields, images), expected), fields


def test_imported_clip_vit_gives_openflamingos_vision_features():
  """The patch tokens after ln_post, without the class token (open_clip's output_tokens),
  from a whole CLIP model's state dict (its text tower is left out)."""
  error, fields = compare_with_open_clip(CLIP_FIXTURE)
  assert error < 1e-5, error
  assert fields == {"image_size": 32, "vision": {
      "kind": "vit", "pixel_stats": "clip",
      "vit": dict(width=64, layers=3, heads=2, patch_size=8, mlp_ratio=4.0,
                  activation="quick_gelu")}}
  # Heads are not in the tensors: open_clip_config.json's head_width gives them (heads=0),
  # and another count (CLIP's usual width / 64 = 1 here) computes other tokens.
  from_config, fields = compare_with_open_clip(CLIP_FIXTURE, heads=0)
  assert from_config < 1e-5 and fields["vision"]["vit"]["heads"] == 2
  wrong_heads, _ = compare_with_open_clip(CLIP_FIXTURE, heads=1)
  assert wrong_heads > 1e-3, wrong_heads


def test_a_hugging_face_clip_vision_model_imports_from_its_folder():
  """transformers' CLIPVisionModel (separate q/k/v, "pre_layrnorm", config.json with the heads
  and activation): our tokens = post_layernorm(last_hidden_state)[:, 1:]."""
  params, fields = vision.load_clip_vit(os.path.join(CLIP_FIXTURE, "hf"))
  assert fields["vision"]["vit"] == dict(width=64, layers=3, heads=2, patch_size=8,
                                         mlp_ratio=4.0, activation="quick_gelu")
  images = np.load(os.path.join(CLIP_FIXTURE, "images.npy"))
  expected = np.load(os.path.join(CLIP_FIXTURE, "hf_tokens.npy"))
  assert _relative_l2(_vit_tokens(params, fields, images), expected) < 1e-5


def test_positions_resize_for_another_resolution():
  source = os.path.join(CLIP_FIXTURE, "weights.safetensors")
  native, _ = vision.load_clip_vit(source, heads=2)
  bigger, fields = vision.load_clip_vit(source, heads=2, image_size=48)
  key = "flamingo/vision_encoder"
  assert fields["image_size"] == 48
  assert bigger[key]["positional_embedding"].shape == (1 + 6 * 6, 64)
  np.testing.assert_array_equal(bigger[key]["positional_embedding"][0],
                                native[key]["positional_embedding"][0])     # class position
  # Bicubic resizing keeps a constant field constant, and the same grid is left as it is.
  constant = np.full((1 + 16, 3), 0.5, np.float32)
  np.testing.assert_allclose(vision.resize_positions(constant, 6), 0.5, atol=1e-6)
  same = native[key]["positional_embedding"]
  assert vision.resize_positions(same, 4) is same
  images = np.zeros((1, 48, 48, 3), np.float32)
  assert _vit_tokens(bigger, fields, images).shape == (1, 6, 6, 64)
  with pytest.raises(weights.CheckpointError, match="not a multiple of the patch 8"):
    vision.load_clip_vit(source, heads=2, image_size=50)


def test_a_flamingo_around_a_clip_vit(tiny_config, tmp_path):
  """config.model.vision.kind="vit": counted as vision, encoded with CLIP's pixel statistics,
  loaded from the import."""
  out = str(tmp_path / "vit")
  report = imports.run_vision("clip_vit", os.path.join(CLIP_FIXTURE, "weights.safetensors"), out,
                             vit_heads=2)
  with open(os.path.join(out, "model.json")) as f:
    fields = json.load(f)
  config = copy.deepcopy(tiny_config)
  config.model = config_base.with_imported_vision(config.model, fields,
                                                  os.path.join(out, "params"))
  assert config.model.image_size == 32 and config.model.vision.kind == "vit"
  counts = flamingo.count_params(config.model)
  assert counts["vision"] == report["parameters"] == 164672 - 64 * 16   # all but CLIP's proj
  assert flops.vision_encoder_shape(config.model, 32)[:2] == (16, 64)
  setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
  trainable, fresh = setup.init(jax.random.key(0))
  frozen = param_sources.init_checkpoints(config.model, fresh)
  # Through Flamingo's own path (kind dispatch, CLIP pixel statistics, the loaded tower):
  # RICES features of uint8 images = the mean of the reference tokens of those images.
  pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  params = hk.data_structures.merge(trainable.params, frozen)
  pooled = flamingo.make_flamingo_stages(config.model).apply.vision_features(params, None, pixels)
  imported, _ = vision.load_clip_vit(os.path.join(CLIP_FIXTURE, "weights.safetensors"),
                                         heads=2)
  normalised = np.asarray(flamingo.normalize_pixels(pixels, jnp.float32, "clip"))
  expected = _vit_tokens(imported, fields, normalised).mean(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-5, atol=1e-5)


@needs_reference("open_clip", "transformers", "torch", script="tests/data/clip_vit/make_fixture.py")
def test_clip_fixture_regenerates_with_the_installed_open_clip(tmp_path):
  regenerate_fixture(os.path.join(CLIP_FIXTURE, "make_fixture.py"), tmp_path)
  error, _ = compare_with_open_clip(str(tmp_path))
  assert error < 1e-5, error
  params, fields = vision.load_clip_vit(str(tmp_path / "hf"))
  hf_error = _relative_l2(_vit_tokens(params, fields, np.load(str(tmp_path / "images.npy"))),
                          np.load(str(tmp_path / "hf_tokens.npy")))
  assert hf_error < 1e-5, hf_error


@pytest.mark.slow
def test_check_logits_compares_imported_towers_with_their_references(fixture_variant, tmp_path):
  """`check_logits --part=vision`: the ViT from the command line (an OK and a FAIL), the
  NFNet in-process (its fixture variant exists only in this process)."""
  out = str(tmp_path / "vit")
  imports.run_vision("clip_vit", os.path.join(CLIP_FIXTURE, "weights.safetensors"), out,
                    vit_heads=2)
  np.save(tmp_path / "off.npy", np.load(os.path.join(CLIP_FIXTURE, "tokens.npy")) * 1.001)
  command = [sys.executable, "-m", "flamingo_jax.tools.check_logits", "--part=vision",
             f"--config={config_path('pretrained')}:vision={out}", f"--params={out}",
             f"--pixels={os.path.join(CLIP_FIXTURE, 'images.npy')}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for reference, status, verdict in ((os.path.join(CLIP_FIXTURE, "tokens.npy"), 0, "OK"),
                                     (str(tmp_path / "off.npy"), 1, "FAIL")):
    result = subprocess.run(command + [f"--reference={reference}"], env=env, cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == status and verdict in result.stdout, result.stderr[-2000:]
  nfnet_out = str(tmp_path / "nfnet")
  imports.run_vision("nfnet", os.path.join(FIXTURE, "weights.safetensors"), nfnet_out)
  config = config_base.load_config(f"{config_path('pretrained')}:vision={nfnet_out}")
  report, _ = parity.check_vision(config.model, param_sources.load(config, nfnet_out)[0],
                                        np.load(os.path.join(FIXTURE, "images.npy")),
                                        np.load(os.path.join(FIXTURE, "features.npy")))
  assert report["ok"] and report["relative_l2"] < 1e-5, report


@pytest.mark.slow
def test_a_tower_import_into_a_config_of_another_tower_names_both(fixture_variant, tiny_config,
                                                                  tmp_path):
  """A ViT import handed to an NFNet config (and an NFNet of another variant)."""
  setup = None
  for kind, source, kwargs, message in (
      ("clip_vit", os.path.join(CLIP_FIXTURE, "weights.safetensors"), dict(vit_heads=2),
       r"holds a ViT \(64 wide, 3 layers, patch 8\) but config.model.vision builds an "
       r"NFNet tiny"),
      ("nfnet", os.path.join(FIXTURE, "weights.safetensors"), {},
       "holds an NFNet fixture but config.model.vision builds an NFNet tiny")):
    out = str(tmp_path / kind)
    imports.run_vision(kind, source, out, **kwargs)
    config = copy.deepcopy(tiny_config)
    config.model.vision.init_checkpoint = os.path.join(out, "params")
    setup = setup or tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
    _, fresh = setup.init(jax.random.key(0))
    with pytest.raises(weights.CheckpointError, match=message):
      param_sources.init_checkpoints(config.model, fresh)
