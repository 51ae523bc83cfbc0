"""Contrastive vision pretraining (docs/paper.md §5): the loss, global negatives over the mesh,
AGC, the schedule, a tiny run that resumes bit-exactly and retrieves, and the NFNet's
hand-off to a Flamingo run."""

import json
import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, config_path
from flamingo_jax import config_base
from flamingo_jax.evaluation import retrieval
from flamingo_jax.training import optimizer
from flamingo_jax.training import param_sources
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training.tasks import contrastive
from flamingo_jax import weights
from train_helpers import env, losses, run, train, train_command
from train_helpers import stream_subset_config_file, train_until_sigterm


@pytest.fixture(scope="module")
def contrastive_config():
  return config_base.load_config(config_path("contrastive_tiny"))


def test_contrastive_loss_equals_a_hand_computed_value():
  image = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
  text = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
  beta, s, n = 3.0, 0.1, 3
  logits = beta * image @ text.T
  expected = 0.0
  for rows in (logits, logits.T):              # image->text, then text->image
    for i in range(n):
      log_z = np.log(np.sum(np.exp(rows[i])))
      for j in range(n):
        target = (1 - s) * (i == j) + s / n
        expected -= target * (rows[i, j] - log_z) / n
  loss, parts = contrastive.contrastive_loss(jnp.asarray(image), jnp.asarray(text),
                                             jnp.float32(beta), s)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(float(parts["image_to_text"] + parts["text_to_image"]), expected,
                             rtol=1e-6)
  # Image 0 finds text 0; image 1 prefers text 2 (1.0 > 0.8), image 2 text 1 (1.0 > 0.8).
  np.testing.assert_allclose(float(parts["accuracy"]), 1 / 3, rtol=1e-6)
  # Without smoothing: the plain two-way softmax loss.
  plain, _ = contrastive.contrastive_loss(jnp.asarray(image), jnp.asarray(text),
                                          jnp.float32(beta), 0.0)
  log_softmax = lambda x: x - np.log(np.sum(np.exp(x), axis=1, keepdims=True))
  want = -np.mean(np.diag(log_softmax(logits))) - np.mean(np.diag(log_softmax(logits.T)))
  np.testing.assert_allclose(float(plain), want, rtol=1e-6)


@pytest.mark.slow
def test_eight_devices_with_global_negatives_equal_one_device(contrastive_config):
  """Mesh 4x2: the text tower split over 'model', the pairs over 'data'; the loss uses the
  whole batch's negatives, so losses and parameters equal the 1-device run's. (Negatives of
  each data shard alone would give another loss.)"""
  config = contrastive_config
  one, _, _, _, setup_one = run(config, 1, 1, steps=2)
  eight, _, _, _, _ = run(config, 4, 2, steps=2)
  for a, b in zip(one, eight):
    for key in ("loss", "loss/align", "loss/ltip", "accuracy/align"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
  # The gradients (after an Adam step, parameters whose true gradient is 0, e.g. the key
  # biases, move by ±lr on rounding noise, so the second step is compared by its loss).
  np.testing.assert_allclose(eight[0]["grad_norm"], one[0]["grad_norm"], rtol=1e-5)
  # What negatives of each data shard alone would have given: another loss.
  from flamingo_jax.data import schema  # pylint: disable=g-import-not-at-top
  batch = schema.random_batches(config, seed=0)["align"]
  state, _ = setup_one.init(jax.random.key(config.seed))
  image, text, beta = jax.jit(setup_one.model.apply)(
      state.params, jax.random.key(0), batch["input_ids"], batch["loss_mask"], batch["media"])
  local = np.mean([float(contrastive.contrastive_loss(image[k:k + 8], text[k:k + 8], beta,
                                                      0.1)[0]) for k in range(0, 32, 8)])
  whole = float(contrastive.contrastive_loss(image, text, beta, 0.1)[0])
  assert abs(local - whole) > 0.1, (local, whole)


def test_agc_clips_each_unit_to_a_share_of_its_parameter_norm():
  """Units are output channels (the last axis) of each layer; a stacked stage's layers are
  kept apart; gains are their own units."""
  params = {"vision_encoder/stem_conv0": {"w": jnp.asarray([[3.0, 0.1], [4.0, 0.0]])},
            "vision_encoder/stage1_blocks/block/conv0": {
                "w": jnp.asarray([[[1.0], [0.0]], [[0.0], [2.0]]]),      # [layers 2, I 2, O 1]
                "gain": jnp.asarray([[1.0], [0.5]])}}                    # [layers 2, O 1]
  grads = {"vision_encoder/stem_conv0": {"w": jnp.asarray([[30.0, 0.0], [40.0, 1e-4]])},
           "vision_encoder/stage1_blocks/block/conv0": {
               "w": jnp.asarray([[[0.0], [0.01]], [[10.0], [0.0]]]),
               "gain": jnp.asarray([[1.0], [0.001]])}}
  clip = optimizer.adaptive_gradient_clipping(0.1)
  out, _ = clip.update(grads, clip.init(params), params)
  # Column 0: ‖w‖ = 5, ‖g‖ = 50 -> scaled to 0.5; column 1: ‖w‖ = 0.1 -> max(0.1, 1e-3) ·
  # 0.1 = 0.01 > 1e-4, kept.
  np.testing.assert_allclose(out["vision_encoder/stem_conv0"]["w"], [[0.3, 0.0], [0.4, 1e-4]],
                             rtol=1e-6)
  stacked = out["vision_encoder/stage1_blocks/block/conv0"]
  # Layer 0: ‖w‖ = 1, ‖g‖ = 0.01 kept; layer 1: ‖w‖ = 2, ‖g‖ = 10 -> 0.2.
  np.testing.assert_allclose(stacked["w"], [[[0.0], [0.01]], [[0.2], [0.0]]], rtol=1e-6)
  np.testing.assert_allclose(stacked["gain"], [[0.1], [0.001]], rtol=1e-6)


def test_the_learning_rate_decays_linearly_to_zero(contrastive_config):
  optim = contrastive_config.optim
  schedule = optimizer.learning_rate_schedule(optim)
  steps = optim.decay_steps
  np.testing.assert_allclose([float(schedule(s)) for s in (0, steps // 2, steps, steps + 5)],
                             [1e-3, 5e-4, 0.0, 0.0], atol=1e-9)


def test_a_contrastive_config_checks_its_streams_and_its_start(contrastive_config):
  config = contrastive_config.copy_and_resolve_references()
  config.data.streams.align.max_media = 2
  with pytest.raises(ValueError, match="align.*one image|image_text pairs with max_media=1"):
    tasks.make_train_setup(config)
  config = contrastive_config.copy_and_resolve_references()
  config.model.vision.init_checkpoint = "/somewhere/params"
  with pytest.raises(ValueError, match="from scratch"):
    tasks.make_train_setup(config)


# -- a whole tiny run: bit-exact resume, retrieval, hand-off ---------------------------------

STEPS = 24


def _command(workdir, data, *extra):
  return train_command(workdir, data, STEPS, "--config.data.synthetic_examples=256",
                       *extra, config=config_path("contrastive_tiny"))


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory):
  """A straight run and one stopped by SIGTERM and resumed (2 devices: data=2)."""
  root = tmp_path_factory.mktemp("contrastive")
  data = str(root / "data")
  straight, resumed = str(root / "straight"), str(root / "resumed")
  train(_command(straight, data), devices=2)
  train_until_sigterm(_command(resumed, data), 2, resumed, 10)
  stopped_at = max(losses(resumed))
  train(_command(resumed, data), devices=2)
  return {"straight": straight, "resumed": resumed, "stopped_at": stopped_at}


@pytest.mark.slow
def test_a_contrastive_run_resumes_bit_exactly_after_sigterm(contrastive_run):
  assert 10 <= contrastive_run["stopped_at"] < STEPS
  for key in ("loss", "loss/align", "accuracy/ltip", "inverse_temperature"):
    expected, got = losses(contrastive_run["straight"], key), losses(contrastive_run["resumed"], key)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected, key                          # float equality


def _retrieval(run, *flags):
  result = subprocess.run(
      [sys.executable, "-m", "flamingo_jax.tools.retrieval", f"--workdir={run}", "--json",
       *flags],
      env=env(1), cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _write_karpathy(directory, count, seed):
  """A COCO-format captions file (Karpathy splits) over held-out synthetic scenes with their
  captions, and one test image that is missing."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(directory, "val2014"))
  images = []
  for k in range(count + 1):
    image, attrs = synthetic.scene(rng, 96)
    name = f"COCO_val2014_{k:012d}.png"
    if k < count:
      Image.fromarray(image).save(os.path.join(directory, "val2014", name))
    caption = synthetic.caption(attrs)
    images.append({"filepath": "val2014", "filename": name, "cocoid": k, "split": "test",
                   "sentences": [{"raw": caption}]})
  with open(os.path.join(directory, "dataset_coco.json"), "w") as f:
    json.dump({"images": images}, f)


@pytest.mark.slow
def test_retrieval_on_held_out_pairs_is_far_above_chance(contrastive_run, tmp_path):
  report = _retrieval(contrastive_run["straight"], "--examples=200")
  assert report["images"] == 200
  for direction in ("image_to_text", "text_to_image"):
    assert report[direction]["R@1"] > 4 * report["chance_R@1"][direction], report
    assert report[direction]["R@5"] >= report[direction]["R@1"]
  # The same model on a captioning benchmark's files (COCO's Karpathy JSON): a missing
  # image is skipped and counted.
  _write_karpathy(str(tmp_path / "coco"), 60, seed=4242)
  report = _retrieval(contrastive_run["straight"], "--task=coco",
                      f"--data_dir={tmp_path / 'coco'}")
  assert report["images"] == 60 and report["skipped"] == {"missing_image": 1}, report
  assert report["image_to_text"]["R@1"] > 4 * report["chance_R@1"]["image_to_text"], report


@pytest.mark.slow
def test_the_trained_nfnet_loads_into_a_flamingo_run(contrastive_run, tiny_config, tmp_path):
  """import_weights --kind=contrastive -> vision.init_checkpoint of a Flamingo config: its
  frozen NFNet is the contrastive one, value for value; another variant is an error naming
  both."""
  out = str(tmp_path / "nfnet")
  result = subprocess.run(
      [sys.executable, "-m", "flamingo_jax.tools.import_weights", "--kind=contrastive",
       f"--source={contrastive_run['straight']}", f"--output={out}"], env=env(1), cwd=REPO,
      capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(out, "model.json")) as f:
    assert json.load(f)["vision"]["variant"] == "tiny"
  run_config = config_base.load_config(config_path("contrastive_tiny"))
  run_config.data.data_dir = os.path.join(os.path.dirname(contrastive_run["straight"]), "data")
  trained = param_sources.restore_run(run_config, contrastive_run["straight"])[0]
  config = tiny_config.copy_and_resolve_references()
  config.model.vision.init_checkpoint = os.path.join(out, "params")
  setup = tasks.make_train_setup(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
  _, frozen = setup.init(jax.random.key(0))
  loaded = param_sources.init_checkpoints(config.model, frozen)
  vision = [(m, n, v) for m, n, v in hk.data_structures.traverse(loaded)
            if m.startswith("flamingo/vision_encoder")]
  assert len(vision) == sum(1 for m in trained if m.startswith("contrastive/vision_encoder")
                            for _ in trained[m])
  for module, name, value in vision:
    source = trained[module.replace("flamingo/", "contrastive/", 1)][name]
    np.testing.assert_array_equal(value, source, err_msg=f"{module}/{name}")
  config.model.vision.variant = "F0"
  with pytest.raises(weights.CheckpointError, match=r"an NFNet tiny but config.model.vision builds an NFNet F0"):
    param_sources.init_checkpoints(config.model, frozen)

  # The second stage as launch/local.sh runs it: a Flamingo run on the import (no frozen/ of
  # its own), then the caption probe given the run alone: its config.json (with the override
  # naming the import) finds the towers through the init checkpoint.
  flamingo_run, vision_flag = str(tmp_path / "flamingo"), f"--config.model.vision.init_checkpoint={out}/params"
  subset = stream_subset_config_file(tmp_path, keep=("align",))
  train(train_command(flamingo_run, str(tmp_path / "data"), 2, vision_flag, config=subset), devices=1)
  assert not os.path.exists(os.path.join(flamingo_run, "frozen"))
  result = subprocess.run(
      [sys.executable, "-m", "flamingo_jax.tools.image_text_probe",
       f"--workdir={flamingo_run}", "--examples=8", "--captions=4", "--json"],
      env=env(1), cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["step"] == 2 and report["captions"] == 4, report
  assert 0.0 <= report["caption_exact_match"] <= 1.0
  assert os.path.exists(os.path.join(flamingo_run, "example.png"))


def test_retrieval_recall_counts_shared_captions_once():
  texts, relevant = retrieval.relevance([["a red circle"], ["a blue square"], ["a red circle"]])
  assert texts == ["a red circle", "a blue square"]
  np.testing.assert_array_equal(relevant, [[1, 0], [0, 1], [1, 0]])
  similarity = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7]])   # image 1 and 2 wrong at R@1
  report = retrieval.recall_at_k(similarity, relevant, ks=(1, 2))
  assert report["image_to_text"] == {"R@1": 1 / 3, "R@2": 1.0}
  # Text "red circle": top image 0 (relevant); "blue square": top image 2 (not), then 1.
  assert report["text_to_image"] == {"R@1": 0.5, "R@2": 1.0}
  np.testing.assert_allclose(retrieval.chance(relevant)["image_to_text"], 0.5)
