"""The training loop: bit-exact resume after SIGTERM, multi-process equivalence, NaN handling,
corrupt checkpoints and config changes (DESIGN.md §7, §9)."""

import copy
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, XLA_TEST_FLAGS, config_path
from flamingo_jax.data import pipeline
from flamingo_jax.training import checkpointing
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step
from flamingo_jax.training import trainer
from train_helpers import two_stream


def train_command(workdir, data_dir, steps, *extra):
  return [sys.executable, "-m", "flamingo_jax.train", f"--config={config_path('tiny')}",
          f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=10", f"--config.data.data_dir={data_dir}",
          "--config.data.synthetic_examples=64", *extra]


def env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}")


def train(command, devices):
  """Runs train.py to completion; a failure shows the run's own output, not just its status."""
  result = subprocess.run(command, env=env(devices), cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), steps            # a resume never repeats a step
  return {r["step"]: r["loss"] for r in records}


@pytest.mark.slow
def test_sigterm_and_resume_log_exactly_the_same_losses(tmp_path):
  data = str(tmp_path / "data")
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(train_command(straight, data, 40), devices=1)
  proc = subprocess.Popen(train_command(resumed, data, 40), env=env(1), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(resumed, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 15:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  assert proc.wait(timeout=300) == 0                     # SIGTERM: save and exit 0
  stopped_at = max(losses(resumed))
  assert 15 <= stopped_at < 40, stopped_at
  assert stopped_at in [int(d) for d in os.listdir(os.path.join(resumed, "checkpoints"))]
  train(train_command(resumed, data, 40), devices=1)
  expected, got = losses(straight), losses(resumed)
  assert sorted(got) == list(range(1, 41))
  assert got == expected                                 # float equality, data order included


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 devices (gloo) vs 1 process x 4 devices: same losses for 10 steps."""
  data = str(tmp_path / "data")
  one = str(tmp_path / "one")
  train(train_command(one, data, 10), devices=4)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  two = str(tmp_path / "two")
  procs = [subprocess.Popen(train_command(two, data, 10, f"--coordinator_address=127.0.0.1:{port}",
                                          "--num_processes=2", f"--process_id={i}"),
                            env=env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  expected, got = losses(one), losses(two)
  assert sorted(got) == list(range(1, 11))
  for step in expected:
    assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got, expected)


def small_config(tiny_config, tmp_path, **train):
  """Tiny with two streams (m3w, vtp), 64 examples each, logging and saving every step."""
  config = two_stream(tiny_config)
  config.data.data_dir = str(tmp_path / "data")
  config.data.synthetic_examples = 64
  config.train.log_every = 1
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 100
  config.train.update(train)
  return config


def poison(monkeypatch, steps):
  """Makes the m3w loss NaN at the given (1-based) steps through a NaN in its loss mask."""
  original = pipeline.InputPipeline.__next__
  count = {"n": 0}

  def poisoned(self):
    batches = original(self)
    count["n"] += 1
    if count["n"] in steps:
      batches["m3w"]["loss_mask"] = np.full_like(batches["m3w"]["loss_mask"], np.nan)
    return batches
  monkeypatch.setattr(pipeline.InputPipeline, "__next__", poisoned)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = small_config(tiny_config, tmp_path, steps=8, max_consecutive_nonfinite=3)
  poison(monkeypatch, {3} | set(range(5, 100)))
  with pytest.raises(trainer.NonFiniteError, match="3 non-finite steps in a row"):
    trainer.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert [records[s]["skipped"] for s in range(1, 7)] == [0, 0, 1, 0, 1, 1]
  assert records[6]["skipped_updates"] == 3
  # A skipped update leaves the parameters alone: step 3's checkpoint equals step 2's.
  setup = train_step.make_train_setup(config, sharding.make_mesh(-1, 1))
  ckpt = checkpointing.Checkpointer(workdir, keep=100)
  assert ckpt.all_steps() == [1, 2, 3, 4, 5, 6]
  params = {}
  for step in (2, 3, 4):
    state = ckpt.manager.restore(step, args=checkpointing.restore_args(setup))["state"]
    params[step] = jax.device_get(state.params)
  ckpt.close()
  same = jax.tree.map(np.array_equal, params[2], params[3])
  assert all(jax.tree.leaves(same))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params[3], params[4])))


def test_nonfinite_state_is_never_saved(tiny_config, tmp_path, monkeypatch):
  """Parameters turned NaN after step 2 (as a diverging update would): step 2 is not saved."""
  make_setup = train_step.make_train_setup

  def diverging_setup(*args, **kwargs):
    setup = make_setup(*args, **kwargs)

    def step(state, frozen, batches):
      state, metrics = setup.step(state, frozen, batches)
      if int(state.step) == 2:
        state = state._replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
      return state, metrics
    return dataclasses.replace(setup, step=step)

  monkeypatch.setattr(train_step, "make_train_setup", diverging_setup)
  workdir = str(tmp_path / "run")
  config = small_config(tiny_config, tmp_path, steps=8, max_consecutive_nonfinite=2)
  with pytest.raises(trainer.NonFiniteError, match="last good checkpoint is step 1"):
    trainer.train(config, workdir)
  ckpt = checkpointing.Checkpointer(workdir, keep=100)
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_config, tmp_path, caplog):
  config = small_config(tiny_config, tmp_path)
  setup = train_step.make_train_setup(config, sharding.make_mesh(-1, 1))
  state, _ = setup.init(jax.random.key(0))
  workdir = str(tmp_path / "run")
  ckpt = checkpointing.Checkpointer(workdir, keep=5)
  data_state = {"m3w": {"cursor": 3, "skipped": {}}}
  for step in (1, 2):
    ckpt.save(step, state._replace(step=state.step + step), dict(data_state, step=step), config)
  ckpt.close()
  # Damage every data file of the newest checkpoint's train state.
  damaged = 0
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "2", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
      damaged += 1
  assert damaged
  ckpt = checkpointing.Checkpointer(workdir, keep=5)
  with caplog.at_level("WARNING"):
    restored_state, restored_data = ckpt.restore(setup)
  assert int(restored_state.step) == 1 and restored_data["step"] == 1
  assert "checkpoint 2" in caplog.text and "does not load" in caplog.text
  # Nothing loads: an error, not a silent fresh start.
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "1", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  with pytest.raises(RuntimeError, match="none of the checkpoints \\[1, 2\\]"):
    ckpt.restore(setup)
  ckpt.close()


def test_config_change_in_the_same_workdir_is_an_error_naming_the_keys(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  trainer.check_config(tiny_config, workdir, allow_change=False)
  trainer.check_config(tiny_config, workdir, allow_change=False)        # same config: fine
  changed = copy.deepcopy(tiny_config)
  changed.optim.learning_rate = 3e-4
  changed.train.steps = 7
  with pytest.raises(ValueError, match=r"optim.learning_rate: 0.001 -> 0.0003, "
                                       r"train.steps: 300 -> 7.*--allow_config_change"):
    trainer.check_config(changed, workdir, allow_change=False)
  trainer.check_config(changed, workdir, allow_change=True)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["learning_rate"] == 3e-4


def test_frozen_towers_load_from_init_checkpoints(tiny_config, tmp_path):
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flamingo_jax import models  # pylint: disable=g-import-not-at-top
  config = small_config(tiny_config, tmp_path)
  setup = train_step.make_train_setup(config, sharding.make_mesh(-1, 1))
  _, frozen = setup.init(jax.random.key(0))
  _, other = setup.init(jax.random.key(1))               # "pretrained" towers: other values
  lm, _ = hk.data_structures.partition(
      lambda module, name, value: models.component_of(module) == "lm", other)
  path = str(tmp_path / "lm_ckpt")
  saver = ocp.StandardCheckpointer()
  saver.save(path, lm)
  saver.wait_until_finished()
  config.model.lm.init_checkpoint = path
  loaded = trainer.load_init_checkpoints(config.model, frozen, setup)
  for module, name, value in hk.data_structures.traverse(loaded):
    source = other if models.component_of(module) == "lm" else frozen
    np.testing.assert_array_equal(value, source[module][name], err_msg=f"{module}/{name}")
