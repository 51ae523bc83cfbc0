"""Shared runs for the train-step tests: each distinct (config, mesh) compiles once."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import haiku as hk
import jax
import numpy as np

from conftest import REPO, XLA_TEST_FLAGS, config_path
from flamingo_jax.data import pipeline
from flamingo_jax.data import schema
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training import train_step


def with_overrides(config, **overrides):
  """Deep copy of `config` with dotted-key overrides, e.g. `{"train.mixing": "round_robin"}`."""
  config = copy.deepcopy(config)
  for dotted, value in overrides.items():
    node, *path = dotted.split(".")
    target = config
    for key in [node] + path[:-1]:
      target = target[key]
    target[path[-1] if path else node] = value
  return config


def two_stream(config):
  """m3w (images, interleaved) + vtp (video): a cheaper mix for the accumulation tests."""
  config = copy.deepcopy(config)
  for name in ("align", "ltip"):
    del config.data.streams[name]
    del config.train.microbatches[name]
  return config


def run(config, data: int, model: int, steps: int = 3):
  """Trains `steps` steps on fixed random batches; returns (metrics list, params, frozen, setup)."""
  mesh = sharding.make_mesh(data, model, jax.devices()[:data * model])
  setup = tasks.make_train_setup(config, mesh)
  state, frozen = setup.init(jax.random.key(config.seed))
  frozen_before = jax.device_get(frozen)
  metrics = []
  for step in range(steps):
    batches = train_step.put_batches(setup, schema.random_batches(config, seed=100 * step))
    state, m = setup.step(state, frozen, batches)
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  return metrics, jax.device_get(state), frozen_before, jax.device_get(frozen), setup


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def global_relative_error(tree_a, tree_b) -> float:
  """‖a - b‖ / ‖b‖ over all leaves together (the whole parameter vector)."""
  diff = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
             for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))
  norm = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(tree_b))
  return (diff / norm) ** 0.5


def max_leaf_relative_error(tree_a, tree_b) -> float:
  errors = jax.tree.leaves(jax.tree.map(relative_error, tree_a, tree_b))
  return max(errors)


def leaves_by_path(params):
  return {f"{m}/{n}": v for m, n, v in hk.data_structures.traverse(params)}


# -- whole runs (the trainer) ------------------------------------------------------------

def stream_subset_config_file(directory, keep=("m3w",)) -> str:
  """A config file: tiny with only the streams `keep` (cheaper subprocess runs: each stream
  adds a loss and its gradient to the compiled step)."""
  path = os.path.join(str(directory), "subset_config.py")
  with open(path, "w") as f:
    f.write(f"from flamingo_jax import config_base\n\n\n"
            f"def get_config(arg=None):\n"
            f"  config = config_base.load_config({config_path('tiny')!r})\n"
            f"  for name in [n for n in config.data.streams if n not in {tuple(keep)!r}]:\n"
            f"    del config.data.streams[name]\n"
            f"    del config.train.microbatches[name]\n"
            f"  return config\n")
  return path


def train_command(workdir, data_dir, steps, *extra, config=None):
  return [sys.executable, "-m", "flamingo_jax.train", f"--config={config or config_path('tiny')}",
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


def train_until_sigterm(command, devices, workdir, logged_steps):
  """Runs train.py and sends SIGTERM once its metrics.jsonl holds `logged_steps` rows; the run
  must save and exit 0."""
  proc = subprocess.Popen(command, env=env(devices), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= logged_steps:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  assert proc.wait(timeout=300) == 0                     # SIGTERM: save and exit 0


def losses(workdir, key="loss"):
  """{step: metrics[key]} of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), steps            # a resume never repeats a step
  return {r["step"]: r[key] for r in records}


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
  """Makes the m3w loss NaN at the given (1-based) batch draws of this process (the steps of
  a fresh run) through a NaN in its loss mask."""
  original = pipeline.InputPipeline.__next__
  count = {"n": 0}

  def poisoned(self):
    batches = original(self)
    count["n"] += 1
    if count["n"] in steps:
      batches["m3w"]["loss_mask"] = np.full_like(batches["m3w"]["loss_mask"], np.nan)
    return batches
  monkeypatch.setattr(pipeline.InputPipeline, "__next__", poisoned)
