"""Checkpoints (docs/design.md §9): orbax CheckpointManager, async, keep-N, restore into shardings.

    WORKDIR/checkpoints/<step>/state    TrainState (params, opt_state, step, rng key data)
                              /input    shard-<d>-of-<D>.json: the input pipeline's
                                        state of data shard d, written by one of the
                                        processes feeding it (input_state.InputStateHandler)
                              /data     {"process_count": P, "skip_batches_applied": N}
                              /config   the run's config (JSON)
    WORKDIR/frozen/                    the frozen towers, written once when they were
                                       initialised at random (no init_checkpoint), so that
                                       a resume restores the same values
    WORKDIR/good_checkpoints.json      steps whose parameters produced a finite loss afterwards
    WORKDIR/moved_aside/               what was set aside, never deleted:
                                       checkpoint-<step>-<reason>-<time>, frozen-damaged-<time>

Restore walks back from the latest step. A step that does not load (a truncated or missing
file, no commit marker) is damaged: once an older step loads, the damaged ones are moved
aside with a warning, so that training can save those steps again. A step whose stored
shapes differ from this config's is not damaged but incompatible: that is an error, and
nothing moves. If steps exist but none loads, that is an error too, never a silent fresh
start. A damaged `frozen/` is moved aside and the towers are made again (trainer.py).
"""

import json
import os
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from flamingo_jax import weights
from flamingo_jax.training import input_state
from flamingo_jax.training import restore_noise
from flamingo_jax.training import train_step

_STATE, _DATA, _CONFIG, _INPUT = "state", "data", "config", "input"


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


class NoLoadableCheckpointError(RuntimeError):
  """Checkpoints exist but none loads."""


class IncompatibleCheckpointError(ValueError):
  """A checkpoint that is intact but holds other shapes than this config's (a config change
  that cannot restore)."""


_COMMIT_MARKER = "commit_success.txt"      # written by orbax when a save is complete
_UNFINISHED = ".orbax-checkpoint-tmp"      # orbax's name for a save in progress


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def leaf_shapes(tree) -> dict[str, tuple]:
  """{"params/flamingo/.../w": shape}: paths of NamedTuples, dicts and lists alike (orbax
  stores NamedTuples as dicts)."""
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _first_words(error: BaseException) -> str:
  """An orbax/TensorStore error in one short line (their specs run to dozens of lines)."""
  text = str(error).split(" See full TensorStore details")[0].split("\n")[0]
  return f"{type(error).__name__}: {text[:200]}"


def check_compatible(stored: dict[str, tuple], expected: dict[str, tuple], what: str) -> None:
  """Raises IncompatibleCheckpointError naming the first differing leaf."""
  for name in sorted(set(stored) | set(expected), key=lambda n: (not n.startswith("params"), n)):
    if stored.get(name) != expected.get(name):
      raise IncompatibleCheckpointError(
          f"{what} holds {name} with shape {stored.get(name, 'absent')}, this config makes "
          f"{expected.get(name, 'absent')}: the config change cannot restore from it (use "
          f"another --workdir, or the config it was written with)")


def _load_checked(directory: str, pytree_directory: str, expected: dict[str, tuple],
                  what: str, load: Callable[[], Any],
                  partial: bool = False) -> tuple[Any, str | None]:
  """(load(), None), or (None, why `directory` is damaged: no commit marker, unreadable
  metadata, a failed load; judged on every process alike). Raises
  IncompatibleCheckpointError when it is whole but holds other shapes than `expected`
  (`partial`: only the leaves `expected` names are compared)."""
  value, problem = None, None
  if not (epath.Path(directory) / _COMMIT_MARKER).exists():
    problem = f"no {_COMMIT_MARKER} (the save did not finish)"
  else:
    try:
      stored = leaf_shapes(weights.pytree_metadata(pytree_directory))
    except Exception as e:  # pylint: disable=broad-except
      problem = f"unreadable metadata ({_first_words(e)})"
    else:
      if partial:
        stored = {k: v for k, v in stored.items() if k in expected}
      check_compatible(stored, expected, what)
  if problem is None:
    try:
      value = load()
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      problem = _first_words(e)
      restore_noise.damaged_directories.add(os.path.join(os.fspath(directory), ""))
  if not _all_processes(problem is None):
    problem = problem or "it does not load on another process"
  return value, problem


def _restore_part(directory: str, target: Any) -> Any:
  """The leaves of `target` (ShapeDtypeStructs with shardings) from a saved pytree that may
  hold more (the train state's params without its optimizer state)."""
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  finally:
    checkpointer.close()


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (restore decisions must agree)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Saves and restores (train state, per-process iterator states, config) by step."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True, heal: bool = False):
    """`heal`: move damaged steps, unfinished saves and a damaged frozen/ aside (the trainer
    does; readers of a workdir that may be in use by a run must not)."""
    workdir = workdir if "://" in workdir else os.path.abspath(workdir)   # gs:// as is
    self.workdir = workdir
    self.directory = os.path.join(workdir, "checkpoints")
    self.frozen_directory = os.path.join(workdir, "frozen")
    self.aside_directory = os.path.join(workdir, "moved_aside")
    self._verified_path = epath.Path(workdir) / "good_checkpoints.json"
    # create=False: nothing is written into the workdir before the first save.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                             enable_async_checkpointing=async_save),
        item_names=(_STATE, _DATA, _CONFIG, _INPUT))
    self.heal = heal
    if heal:
      self._move_unfinished_saves()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # -- moving aside -------------------------------------------------------------------------

  def aside_path(self, name: str, suffix: str = "") -> str:
    """WORKDIR/moved_aside/<name>-<UTC time><suffix>: where set-aside things go."""
    return os.path.join(self.aside_directory,
                        f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}{suffix}")

  def move_aside(self, path: str, name: str, sync: bool = True) -> str:
    """Renames `path` to aside_path(name) (process 0; the others wait)."""
    target = self.aside_path(name)
    if jax.process_index() == 0:
      epath.Path(self.aside_directory).mkdir(parents=True, exist_ok=True)
      suffix = 1
      while epath.Path(target).exists():            # two in the same second
        target = f"{target.rsplit('~', 1)[0]}~{suffix}"
        suffix += 1
      epath.Path(path).rename(target)
    if sync:
      _sync(f"moved aside {name}")
    return target

  def move_steps_aside(self, steps: list[int], reason: str) -> list[str]:
    """Moves whole step directories aside; the manager forgets them (they can be saved again)."""
    self.manager.wait_until_finished()
    moved = [self.move_aside(os.path.join(self.directory, str(step)), f"checkpoint-{step}-{reason}")
             for step in steps]
    self.manager.reload()
    return moved

  def _move_unfinished_saves(self) -> None:
    """Saves cut short before orbax's final rename (`<step>.orbax-checkpoint-tmp-…`)."""
    if jax.process_index() != 0:
      _sync("unfinished saves moved")
      return
    for directory, prefix in ((self.directory, "checkpoint-"), (self.workdir, "")):
      root = epath.Path(directory)
      if not root.is_dir():
        continue
      for path in sorted(root.iterdir()):
        if _UNFINISHED in path.name:
          name = f"{prefix}{path.name.split('.')[0]}-unfinished"
          moved = self.move_aside(os.fspath(path), name, sync=False)
          logging.warning("an unfinished save %s was moved to %s", path, moved)
    _sync("unfinished saves moved")

  # -- train state --------------------------------------------------------------------------

  def save(self, step: int, state: train_step.TrainState, pipeline_state: dict,
           written_shards: tuple[int, ...], config: Any, skip_batches_applied: int = 0) -> None:
    """`pipeline_state`: this process's input state; it writes that of `written_shards`
    (together, the processes write every data shard once)."""
    if jax.process_index() == 0:
      epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
    _sync("checkpoint directory")
    self.manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(_savable(state)),
        _INPUT: input_state.InputStateSave(pipeline_state, tuple(written_shards)),
        _DATA: ocp.args.JsonSave({"process_count": jax.process_count(),
                                  "skip_batches_applied": skip_batches_applied}),
        _CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
    }), force=True)

  def restore_step(self, step: int, setup: train_step.TrainSetup,
                   input_shards: tuple[int, ...] | None = None,
                   num_shards: int | None = None) -> tuple[train_step.TrainState, dict]:
    """(state, the step's data item) of one step; raises if it does not load. With
    `input_shards`, the data item's "pipeline" is the input state of those data shards (of a
    pipeline with `num_shards`)."""
    restored = self.manager.restore(step, args=restore_args(setup))
    state, data = restored[_STATE], restored[_DATA]
    if int(state.step) != step:
      raise ValueError(f"state.step {int(state.step)} != directory step {step}")
    if input_shards is not None:
      data = dict(data, pipeline=self.input_state(step, input_shards, num_shards, data))
    return state._replace(rng=jax.random.wrap_key_data(state.rng)), data

  def data_item(self, step: int) -> dict:
    """A step's data item alone (process count, skipped batches), without the train state."""
    args = ocp.args.Composite(**{_DATA: ocp.args.JsonRestore()})
    return self.manager.restore(step, args=args)[_DATA]

  def input_state(self, step: int, shards: tuple[int, ...] | None = None,
                  num_shards: int | None = None, data: dict | None = None) -> dict:
    """The input pipeline's state of `shards` (None: every stored shard) at `step`."""
    if (epath.Path(self.directory) / str(step) / _INPUT).exists():
      args = ocp.args.Composite(**{_INPUT: input_state.InputStateRestore(
          None if shards is None else tuple(shards), num_shards)})
      return self.manager.restore(step, args=args)[_INPUT]
    data = self.data_item(step) if data is None else data       # written before input/
    if "processes" in data:       # before per-shard input state: process p read as shard p
      return {"num_shards": data["process_count"],
              "streams": {name: {str(p): process[name]
                                 for p, process in enumerate(data["processes"])}
                          for name in data["processes"][0]}}
    return data["pipeline"]

  def restore(self, setup: train_step.TrainSetup, input_shards: tuple[int, ...] | None = None,
              num_shards: int | None = None) -> tuple[train_step.TrainState, dict] | None:
    """(state, data item) of the newest loadable step, or None when there is no step.
    Damaged newer steps are moved aside. `input_shards`: see restore_step."""
    restore_noise.install()
    steps = self.all_steps()
    damaged = []
    expected = leaf_shapes(_abstract_savable(setup))
    for step in reversed(steps):
      step_dir = os.path.join(self.directory, str(step))
      restored, problem = _load_checked(
          step_dir, os.path.join(step_dir, _STATE), expected, f"checkpoint {step}",
          lambda step_=step: self.restore_step(step_, setup, input_shards, num_shards))
      if problem is not None:
        logging.warning("checkpoint %d in %s does not load (%s); trying the previous one",
                        step, self.directory, problem)
        damaged.append(step)
        continue
      if damaged and not self.heal:
        logging.warning("using step %d; the newer steps %s are damaged", step, damaged)
      elif damaged:
        for moved in self.move_steps_aside(damaged, "damaged"):
          logging.warning("resuming from step %d: the damaged checkpoint was moved to %s",
                          step, moved)
      return restored
    if steps:
      raise NoLoadableCheckpointError(
          f"none of the checkpoints {steps} in {self.directory} loads; refusing to start from "
          f"scratch over them (move them away to do so)")
    return None

  def restore_params(self, target: Any) -> tuple[Any, int] | None:
    """(the trainable parameters, step) of the newest step that loads, read alone (no
    optimizer state, no train state): `target` is their tree of ShapeDtypeStructs with
    shardings. None when there is no step; damaged steps are skipped, never moved (readers
    of a run may run beside its trainer)."""
    restore_noise.install()
    steps = self.all_steps()
    expected = {f"params/{k}": v for k, v in leaf_shapes(target).items()}
    for step in reversed(steps):
      step_dir = os.path.join(self.directory, str(step))
      state_dir = os.path.join(step_dir, _STATE)
      params, problem = _load_checked(
          step_dir, state_dir, expected, f"checkpoint {step}",
          lambda d=state_dir: _restore_part(d, {"params": target})["params"], partial=True)
      if problem is None:
        return params, step
      logging.warning("checkpoint %d in %s does not load (%s); trying the previous one",
                      step, self.directory, problem)
    if steps:
      raise NoLoadableCheckpointError(f"none of the checkpoints {steps} in {self.directory} "
                                      f"loads")
    return None

  # -- which checkpoints are good -----------------------------------------------------------

  def verified_steps(self) -> set[int]:
    if not self._verified_path.exists():
      return set()
    return set(json.loads(self._verified_path.read_text())["steps"])

  def mark_verified(self, steps: set[int]) -> None:
    """Records steps whose parameters produced a finite loss (process 0 writes)."""
    if jax.process_index() != 0:
      return
    existing = set(self.all_steps())
    known = (self.verified_steps() | set(steps)) & existing
    tmp = self._verified_path.with_name(self._verified_path.name + ".tmp")
    tmp.write_text(json.dumps({"steps": sorted(known)}))
    tmp.replace(self._verified_path)

  # -- frozen towers ------------------------------------------------------------------------

  def save_frozen(self, frozen) -> None:
    if not jax.tree.leaves(frozen):      # everything trains (lm and vision trainable)
      return
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(self.frozen_directory, frozen)
    checkpointer.wait_until_finished()

  def restore_frozen(self, setup: train_step.TrainSetup):
    """The saved frozen towers, or None when there are none or they are damaged (then moved
    aside with a warning; the caller makes them again from their source)."""
    return self.restore_frozen_into(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        setup.abstract_frozen, setup.frozen_shardings))

  def restore_frozen_into(self, target: Any):
    """`restore_frozen` into `target` (ShapeDtypeStructs with shardings)."""
    if not jax.tree.leaves(target):
      return target                        # nothing is frozen: the empty tree itself
    if not epath.Path(self.frozen_directory).is_dir():
      return None
    restore_noise.install()
    frozen, problem = _load_checked(
        self.frozen_directory, self.frozen_directory, leaf_shapes(target), "frozen/",
        lambda: ocp.StandardCheckpointer().restore(self.frozen_directory, target))
    if problem is None:
      return frozen
    if not self.heal:
      raise RuntimeError(f"{self.frozen_directory} does not load ({problem})")
    moved = self.move_aside(self.frozen_directory, "frozen-damaged")
    logging.warning("frozen/ does not load (%s): moved to %s; the frozen towers are made again "
                    "from their source", problem, moved)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
