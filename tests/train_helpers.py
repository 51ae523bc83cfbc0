"""Shared runs for the train-step tests: each distinct (config, mesh) compiles once."""

import copy
import haiku as hk
import jax
import numpy as np

from flamingo_jax.data import schema
from flamingo_jax.training import sharding
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
  setup = train_step.make_train_setup(config, mesh)
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

