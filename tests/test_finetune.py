"""Fine-tuning (docs/paper.md §8): starting from a Flamingo run (`config.init_from`) with the
vision encoder unfrozen at a larger resolution, the paper's grid as a sweep, task data from
a benchmark's training split."""

import collections
import json
import os
import subprocess
import sys

import haiku as hk
import numpy as np
import pytest

from conftest import REPO, config_path
from flamingo_jax import config_base
from flamingo_jax.data import sources
from flamingo_jax.data import synthetic
from flamingo_jax import models
from flamingo_jax.tools import task_pairs
from flamingo_jax.training import param_sources
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training import trainer
from flamingo_jax import weights
from train_helpers import small_config


def _finetune_config(tmp_path, source):
  config = config_base.load_config(config_path("finetune"))
  config.init_from = source
  config.data.data_dir = str(tmp_path / "ft_data")
  config.data.synthetic_examples = 64
  config.train.steps = 2
  config.train.log_every = 1
  config.train.checkpoint_every = 1
  return config


@pytest.mark.slow
def test_fine_tuning_trains_the_vision_encoder_and_leaves_the_lm_bit_identical(
    tiny_config, tmp_path):
  source_config = small_config(tiny_config, tmp_path, steps=2)
  source = str(tmp_path / "source")
  trainer.train(source_config, source)
  before = param_sources.restore_run(source_config, source)[0]

  config = _finetune_config(tmp_path, source)
  assert config.model.image_size == 96 != tiny_config.model.image_size
  assert config.model.vision.trainable
  # The start: every parameter is the source run's, now split the fine-tuning way.
  setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
  trainable, frozen = param_sources.init_from(source, setup)
  assert any(models.component_of(m) == "vision" for m in trainable)
  assert all(models.component_of(m) == "lm" for m in frozen)
  for module, name, value in hk.data_structures.traverse(hk.data_structures.merge(trainable,
                                                                                   frozen)):
    np.testing.assert_array_equal(value, before[module][name], err_msg=f"{module}/{name}")

  workdir = str(tmp_path / "finetuned")
  summary = trainer.train(config, workdir)
  assert summary["last_step"] == 2 and summary["skipped_updates"] == 0
  after = param_sources.restore_run(config, workdir)[0]
  changed = collections.Counter()
  for module, name, value in hk.data_structures.traverse(after):
    component = models.component_of(module)
    if component == "lm" and "new_token" not in module:
      np.testing.assert_array_equal(value, before[module][name], err_msg=f"{module}/{name}")
    else:
      changed[component] += int(not np.array_equal(value, before[module][name]))
  vision_leaves = sum(1 for m in after if models.component_of(m) == "vision" for _ in after[m])
  assert changed["vision"] > vision_leaves // 2, (changed, vision_leaves)
  assert changed["resampler"] > 0 and changed["xattn"] > 0


def test_init_from_names_what_does_not_fit(tiny_config, tmp_path):
  config = _finetune_config(tmp_path, str(tmp_path / "nowhere"))
  setup = tasks.make_train_setup(config, sharding.make_mesh(-1, 1))
  with pytest.raises(ValueError, match="neither a run's workdir"):
    param_sources.init_from(config.init_from, setup)
  # A parameter folder of another model: the first parameter it lacks, by name.
  part = {"flamingo/vision_encoder/stem_conv0": {
      "w": np.zeros((3, 3, 3, 16), np.float32)}}
  weights.save_params(str(tmp_path / "partial" / "params"), part)
  with pytest.raises(weights.CheckpointError, match=r"has no flamingo/"):
    param_sources.init_from(str(tmp_path / "partial"), setup)


def test_the_sweep_expands_to_the_paper_grid():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "sweep.py"),
       f"--config={config_path('finetune')}:80b", "--workdir=runs/ft", "--local", "--dry_run"],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if "flamingo_jax.train" in line]
  runs = set()
  for line in lines:
    flags = dict(part.split("=", 1) for part in line.split() if part.startswith("--config."))
    runs.add((float(flags["--config.optim.learning_rate"]),
              int(flags["--config.data.streams.task.batch_size"]),
              flags["--config.data.augment.flip"], float(flags["--config.data.augment.color_jitter"])))
  assert len(lines) == len(runs) == 24
  assert {r[0] for r in runs} == {3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5}
  assert {r[1] for r in runs} == {8, 16}
  assert {(r[2], r[3]) for r in runs} == {("True", 0.1), ("False", 0.0)}
  config = config_base.load_config(config_path("finetune") + ":80b")
  assert config.model.image_size == 480 and config.model.vision.trainable
  assert not config.model.lm.trainable


def test_a_benchmark_training_split_becomes_image_text_pairs(tmp_path):
  synthetic.write_attribute_task(str(tmp_path / "task"), seed=3, support=12, queries=2)
  report = task_pairs.write_pairs("attributes", str(tmp_path / "task"), str(tmp_path / "pairs"))
  assert report["pairs"] == 12
  with open(os.path.join(tmp_path / "task", "attributes.json")) as f:
    support = json.load(f)["support"]
  counts = collections.Counter()
  rows = list(sources.read_source("image_text", str(tmp_path / "pairs"), counts))
  assert not counts and len(rows) == 12
  assert [r["text"] for _, r in rows] == [f"this is {s['answer']}." for s in support]
  with pytest.raises(ValueError, match="exists already"):
    task_pairs.write_pairs("attributes", str(tmp_path / "task"), str(tmp_path / "pairs"))
