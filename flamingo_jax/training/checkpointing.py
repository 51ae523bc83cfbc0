"""Checkpoints (DESIGN.md §9): orbax CheckpointManager, async, keep-N, restore into shardings.

    WORKDIR/checkpoints/<step>/state    TrainState (params, opt_state, step, rng key data)
                              /data     {"process_count": P, "processes": [iterator state per process]}
                              /config   the run's config (JSON)
    WORKDIR/frozen/                    the frozen towers, written once when they were
                                       initialised at random (no init_checkpoint), so that
                                       a resume restores the same values

Restore walks back from the latest step: a checkpoint that fails to load (truncated or
corrupt) is reported and the previous one tried; if steps exist but none loads, that is an
error, never a silent fresh start.
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flamingo_jax.training import train_step

_STATE, _DATA, _CONFIG = "state", "data", "config"
_MAX_STATE_BYTES = 1 << 16      # per process iterator state, JSON


def _savable(state: train_step.TrainState) -> train_step.TrainState:
  return state._replace(rng=jax.random.key_data(state.rng))


def _abstract_savable(setup: train_step.TrainSetup) -> train_step.TrainState:
  """ShapeDtypeStructs with shardings: orbax restores straight into them."""
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      setup.abstract_state._replace(rng=jax.eval_shape(jax.random.key_data,
                                                       setup.abstract_state.rng)),
      setup.state_shardings)
  return state


def restore_args(setup: train_step.TrainSetup) -> ocp.args.Composite:
  """Restores a step's train state (rng as key data) into `setup`'s shardings, and its data."""
  return ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(_abstract_savable(setup)),
                               _DATA: ocp.args.JsonRestore()})


def gather_process_states(local_state: dict) -> list[dict]:
  """Every process's iterator state, on every process (a JSON string per process)."""
  data = json.dumps(local_state).encode()
  if len(data) > _MAX_STATE_BYTES:
    raise ValueError(f"iterator state is {len(data)} bytes, over {_MAX_STATE_BYTES}")
  if jax.process_count() == 1:
    return [local_state]
  buffer = np.zeros(_MAX_STATE_BYTES, np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer))     # [P, bytes]
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]


class Checkpointer:
  """Saves and restores (train state, per-process iterator states, config) by step."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    workdir = workdir if "://" in workdir else os.path.abspath(workdir)   # gs:// as is
    self.directory = os.path.join(workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=(_STATE, _DATA, _CONFIG))
    self.frozen_directory = os.path.join(workdir, "frozen")

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: train_step.TrainState, data_state: dict, config: Any) -> None:
    processes = gather_process_states(data_state)
    self.manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(_savable(state)),
        _DATA: ocp.args.JsonSave({"process_count": jax.process_count(), "processes": processes}),
        _CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
    }), force=True)

  def restore(self, setup: train_step.TrainSetup) -> tuple[train_step.TrainState, dict] | None:
    """(state, this process's iterator state) of the newest loadable step, or None if none."""
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        restored = self.manager.restore(step, args=restore_args(setup))
        state, data = restored[_STATE], restored[_DATA]
        if int(state.step) != step:
          raise ValueError(f"state.step {int(state.step)} != directory step {step}")
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %d in %s does not load (%s: %s); trying the previous one",
                        step, self.directory, type(e).__name__, str(e)[:300])
        continue
      if data["process_count"] != jax.process_count():
        raise ValueError(f"checkpoint {step} was written by {data['process_count']} processes; "
                         f"this run has {jax.process_count()} (the data order is per process)")
      if step != steps[-1]:
        logging.warning("resuming from step %d, not the latest %d (which is damaged)", step,
                        steps[-1])
      state = state._replace(rng=jax.random.wrap_key_data(state.rng))
      return state, data["processes"][jax.process_index()]
    if steps:
      raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} loads; refusing "
                         f"to start from scratch over them (move them away to do so)")
    return None

  def save_frozen(self, frozen) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(self.frozen_directory, frozen)
    checkpointer.wait_until_finished()

  def restore_frozen(self, setup: train_step.TrainSetup):
    if not epath.Path(self.frozen_directory).is_dir():
      return None
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          setup.abstract_frozen, setup.frozen_shardings)
    return ocp.StandardCheckpointer().restore(self.frozen_directory, target)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
