"""How a mesh is fed: which data shards each process produces, and its rows placed as
global arrays (multi-host input; docs/design.md §4, §8)."""

import collections
from typing import Any

import jax

from flamingo_jax.training import sharding
from flamingo_jax.training import train_step


def global_batches(setup: train_step.TrainSetup, local: dict, shards: tuple[int, ...]) -> dict:
  """The rows of this process's data shards (in shard order) -> global arrays on the mesh.

  Data shard d holds rows [d·b, (d+1)·b) of the global batch; every device of mesh row d
  takes its rows from the process that holds it, whichever other processes hold the rest of
  its model group."""
  num_shards = setup.mesh.shape[sharding.DATA]
  local_offset = {d: i for i, d in enumerate(shards)}

  def put(sharding_, x):
    rows = x.shape[0] // len(shards)                       # per data shard
    shape = (rows * num_shards,) + x.shape[1:]

    def rows_of(index):
      start = index[0].start or 0
      stop = shape[0] if index[0].stop is None else index[0].stop
      shard = start // rows
      begin = local_offset[shard] * rows + start - shard * rows
      return x[(slice(begin, begin + stop - start),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding_, rows_of)
  return jax.tree.map(put, setup.batch_shardings, local)


def input_shards(mesh) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(the data shards this process feeds, those whose input state it saves: the shards it is
  the first process to feed) (sharding.assign_data_shards)."""
  assignment = sharding.assign_data_shards(sharding.process_grid(mesh))
  me = jax.process_index()
  written = tuple(d for d in assignment[me]
                  if next(p for p, shards in enumerate(assignment) if d in shards) == me)
  return assignment[me], written


def input_plan(config: Any, mesh) -> dict:
  """How `mesh` is fed: each process's data shards (sharding.assign_data_shards) and rows per
  stream, and how many processes feed each shard. Reads no data and touches no device, so a
  pod's layout can be checked from its topology (train.py --dry_run)."""
  num_shards = mesh.shape[sharding.DATA]
  sharding.check_batches_fit_mesh(config.data.streams, num_shards, config.train.microbatches)
  assignment = sharding.assign_data_shards(sharding.process_grid(mesh))
  feeders = collections.Counter(d for shards in assignment for d in shards)
  unfed = sorted(set(range(num_shards)) - set(feeders))
  if unfed:
    raise ValueError(f"data shards {unfed} are fed by no process")
  per_shard = {name: spec.batch_size // num_shards for name, spec in config.data.streams.items()}
  shards_per_process = len(assignment[0])
  return {
      "processes": len(assignment), "devices": int(mesh.devices.size),
      "mesh": dict(mesh.shape), "shards_per_process": shards_per_process,
      "processes_per_shard": sorted(set(feeders.values())),
      "batch": {name: spec.batch_size for name, spec in config.data.streams.items()},
      "rows_per_shard": per_shard,
      "rows_per_process": {n: b * shards_per_process for n, b in per_shard.items()},
      "assignment": [list(shards) for shards in assignment],
  }
