"""Checkpoints (DESIGN.md §9): orbax CheckpointManager, async, keep-N, restore into shardings.

    WORKDIR/checkpoints/<step>/state    TrainState (params, opt_state, step, rng key data)
                              /input    shard-<d>-of-<D>.json: the input pipeline's
                                        state of data shard d, written by one of the
                                        processes feeding it (InputStateHandler)
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

import dataclasses
import json
import logging as logging_lib
import os
import re
import sys
import time
from typing import Any, Callable
import warnings

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flamingo_jax import weights
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


class InputStateHandler(ocp.CheckpointHandler):
  """The input pipeline's state as one JSON file per data shard, `shard-<d>-of-<D>.json`
  ({stream: {"cursor", "skipped"}}). Each process writes the shards it was given (the trainer
  gives each shard to the first process feeding it) and reads the shards it feeds: no
  collective, and a restore with another process count reads the shards it now feeds."""

  _PATTERN = re.compile(r"shard-(\d+)-of-(\d+)\.json$")

  def save(self, directory: epath.Path, args: "InputStateSave") -> None:
    state = args.state
    for shard in args.shards:
      per_stream = {name: shards[str(shard)] for name, shards in state["streams"].items()}
      (directory / f"shard-{shard}-of-{state['num_shards']}.json").write_text(
          json.dumps(per_stream))

  def restore(self, directory: epath.Path, args: "InputStateRestore") -> dict:
    """The pipeline state ({"num_shards", "streams"}) of `args.shards` (None: all stored)."""
    stored = {}
    for path in directory.iterdir():
      match = self._PATTERN.match(path.name)
      if match:
        stored[int(match.group(1))] = (int(match.group(2)), path)
    counts = {count for count, _ in stored.values()}
    if len(counts) != 1:
      raise ValueError(f"{directory} holds input states for {sorted(counts) or 'no'} data "
                       f"shard counts; expected one")
    num_shards = counts.pop()
    wanted = sorted(stored) if args.shards is None else list(args.shards)
    streams = {}
    if num_shards == args.num_shards or args.num_shards is None:
      missing = [d for d in wanted if d not in stored]
      if missing:
        raise ValueError(f"{directory} lacks the input state of data shards {missing}")
      for d in wanted:
        for name, value in json.loads(stored[d][1].read_text()).items():
          streams.setdefault(name, {})[str(d)] = value
    # Another shard count: returned as is, for the pipeline to refuse with its own message.
    return {"num_shards": num_shards, "streams": streams}

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(InputStateHandler, for_save=True)
@dataclasses.dataclass
class InputStateSave(ocp.args.CheckpointArgs):
  state: dict                     # pipeline.InputPipeline.state()
  shards: tuple[int, ...]         # the data shards this process writes


@ocp.args.register_with_handler(InputStateHandler, for_restore=True)
@dataclasses.dataclass
class InputStateRestore(ocp.args.CheckpointArgs):
  shards: tuple[int, ...] | None = None     # None: every stored shard
  num_shards: int | None = None             # this pipeline's


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
                  what: str, load: Callable[[], Any]) -> tuple[Any, str | None]:
  """(load(), None), or (None, why `directory` is damaged: no commit marker, unreadable
  metadata, a failed load; judged on every process alike). Raises
  IncompatibleCheckpointError when it is whole but holds other shapes than `expected`."""
  value, problem = None, None
  if not (epath.Path(directory) / _COMMIT_MARKER).exists():
    problem = f"no {_COMMIT_MARKER} (the save did not finish)"
  else:
    try:
      stored = leaf_shapes(weights.pytree_metadata(pytree_directory))
    except Exception as e:  # pylint: disable=broad-except
      problem = f"unreadable metadata ({_first_words(e)})"
    else:
      check_compatible(stored, expected, what)
  if problem is None:
    try:
      value = load()
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      problem = _first_words(e)
      _damaged_directories.add(os.path.join(os.fspath(directory), ""))
  if not _all_processes(problem is None):
    problem = problem or "it does not load on another process"
  return value, problem


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (restore decisions must agree)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


_restore_noise_filtered = False
# Directories a restore failed on: echoes of reads from them are dropped (below).
_damaged_directories: set[str] = set()
# orbax's read coroutines, abandoned when another read of the same restore fails.
_ORBAX_READS = ("_read_shard", "_read_array_index_and_device_put", "_read_and_create_array",
                "async_deserialize")


def _mentions_failed_read(text: str) -> bool:
  return "orbax" in text or any(d in text for d in _damaged_directories)


def _is_read_failure_echo(error: BaseException | None, source: object = None) -> bool:
  """An echo of a failed orbax read: the closed event loop its late TensorStore callbacks
  hit, or an exception left in one of orbax's coroutines or on a damaged directory."""
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(source, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  return error is not None and _damaged_directories and _mentions_failed_read(str(error))


def _orbax_in_traceback(error: BaseException | None) -> bool:
  while error is not None:
    tb = error.__traceback__
    while tb is not None:
      if "orbax" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    error = error.__cause__ or error.__context__
  return False


class _DropReadFailureTasks(logging_lib.Filter):
  """asyncio's "<Task | _GatheringFuture | Future> exception was never retrieved" for the reads
  of a failed restore: an orbax coroutine or traceback, or a TensorStore error that names a
  damaged directory."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    message = record.getMessage()
    if "exception was never retrieved" not in message.split("\n", 1)[0]:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (_mentions_failed_read(message) or _orbax_in_traceback(error)
                or _is_read_failure_echo(error))


def _filter_restore_noise() -> None:
  """A failed orbax restore (a damaged checkpoint) leaves its other reads running; each
  later reports its error on its own (one traceback per array, hundreds of lines, after our
  one-line warning has said what failed): through asyncio's logger, sys.unraisablehook, or a
  "coroutine … was never awaited" warning. Drop exactly those echoes."""
  global _restore_noise_filtered
  if _restore_noise_filtered:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_read_failure_echo(unraisable.exc_value, unraisable.object):
      previous(unraisable)
  sys.unraisablehook = hook
  logging_lib.getLogger("asyncio").addFilter(_DropReadFailureTasks())
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message=rf"coroutine '({'|'.join(_ORBAX_READS)})' was never awaited")
  _restore_noise_filtered = True


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
        _INPUT: InputStateSave(pipeline_state, tuple(written_shards)),
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
      args = ocp.args.Composite(**{_INPUT: InputStateRestore(
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
    _filter_restore_noise()
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
    if not jax.tree.leaves(setup.abstract_frozen):
      return setup.abstract_frozen         # nothing is frozen: the empty tree itself
    if not epath.Path(self.frozen_directory).is_dir():
      return None
    _filter_restore_noise()
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          setup.abstract_frozen, setup.frozen_shardings)
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
