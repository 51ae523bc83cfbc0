"""The training loop: owns I/O around one jitted step (DESIGN.md §7, §9).

    summary = trainer.train(config, workdir)

Resumes from the newest loadable checkpoint in WORKDIR (damaged newer ones are moved aside;
checkpointing.py); SIGTERM (and orbax's preemption notice on TPU) finishes the current step,
saves and returns. Nothing is written into WORKDIR until the config, the mesh, the data and
the restore have been checked; then config.json, metrics.jsonl (process 0; rows of steps
that are run again after a resume are moved aside), TensorBoard events and checkpoints.

Divergence. A step skips its update when the loss or gradient is not finite, or when the
update would make the state non-finite (train_step.py). A checkpoint is *good* once its
parameters have produced a finite loss (the next step's); good steps are recorded in
WORKDIR/good_checkpoints.json. `train.max_consecutive_nonfinite` skipped steps in a row then
either stop the run (`train.on_nonfinite = "stop"`: exit 1) or roll back to the last good
checkpoint and go on with the data after the bad stretch (`"rollback"`, at most
`train.max_rollbacks` times). Either way the checkpoints newer than the last good one are
moved aside first, so that a rerun resumes from a good state; `train.skip_batches = N` makes
a resumed run drop N batches per stream first (once per resume point), to step over data
that triggered a loss spike.
"""

import collections
import copy
import json
import os
import signal
import time
from typing import Any

from absl import logging
from etils import epath
import haiku as hk
import jax
from jax.experimental import multihost_utils
import numpy as np
from orbax.checkpoint import multihost as ocp_multihost

from flamingo_jax import config_base
from flamingo_jax import lease as lease_lib
from flamingo_jax import models
from flamingo_jax import weights
from flamingo_jax.data import pipeline as pipeline_lib
from flamingo_jax.training import checkpointing
from flamingo_jax.training import flops as flops_lib
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step

# Dense bf16 peak TFLOP/s of one JAX device, by device_kind prefix (for MFU).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
               "NVIDIA A100": 312.0}


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


def peak_tflops(config: Any) -> float:
  if config.train.peak_tflops_per_device:
    return float(config.train.peak_tflops_per_device)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), 0.0)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# Settings of how a run is driven, not of what it computes: a rerun may change them (e.g.
# more steps) without --allow_config_change.
RUN_CONTROL_KEYS = ("train.steps", "train.log_every", "train.checkpoint_every",
                    "train.keep_checkpoints", "train.max_consecutive_nonfinite",
                    "train.on_nonfinite", "train.max_rollbacks", "train.skip_batches",
                    "train.profile_steps",
                    "train.peak_tflops_per_device", "data.prefetch", "data.workers",
                    "train.lease_seconds",
                    "model.attention_impl",   # how attention is computed, not what
                    "init_from")              # read at a fresh start only


def check_workdir(workdir: str) -> None:
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a directory")


def check_config(config: Any, workdir: str, allow_change: bool) -> None:
  """Checks the run's config against WORKDIR/config.json, if there is one (writes nothing)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  a, b = _flatten(json.loads(path.read_text())), _flatten(json.loads(config.to_json()))
  # An option added after the run started is absent from its config.json: its default is
  # what the run computed with.
  value = lambda flat, k: flat.get(k, config_base.implied_default(k))
  differing = sorted(k for k in set(a) | set(b) if value(a, k) != value(b, k))
  changed = [k for k in differing if k not in RUN_CONTROL_KEYS]
  if changed and not allow_change:
    details = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                        for k in changed[:20])
    raise ValueError(f"{workdir} holds a run with a different config ({details}); use "
                     f"another --workdir or pass --allow_config_change")
  if changed:
    logging.warning("config changed in %s: %s", workdir, changed)
  elif differing:
    logging.info("run settings changed in %s: %s", workdir, differing)


def write_config(config: Any, workdir: str) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True))


class MetricsLog:
  """metrics.jsonl + TensorBoard (process 0) and a console line."""

  def __init__(self, workdir: str, total_steps: int, ckpt: checkpointing.Checkpointer,
               start_step: int):
    self.enabled = jax.process_index() == 0
    self.total = total_steps
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._ckpt = ckpt
    self._tb = None
    self._skips_shown = {}
    self.rewind(start_step)
    if self.enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], "GPU")
      self._tf = tf
      self._tb = tf.summary.create_file_writer(self.tb_dir)

  def write(self, record: dict, eta_seconds: float) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")     # floats: repr precision
    with self._tb.as_default(step=record["step"]):
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tf.summary.scalar(key, value)
    self._tb.flush()
    streams = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss/"))
    mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
    print(f"step {record['step']:>6}/{self.total} loss {record['loss']:.4f} [{streams}] "
          f"{record['tokens_per_sec']:.0f} tok/s{mfu} eta {_duration(eta_seconds)}", flush=True)

  def rewind(self, step: int) -> None:
    """Rows of steps after `step` (they are about to be run again) go to moved_aside/, so
    that metrics.jsonl holds each step once."""
    if not self.enabled or not self.path.exists():
      return
    rows = self.path.read_text().splitlines(keepends=True)
    later = [r for r in rows if r.strip() and json.loads(r)["step"] > step]
    if not later:
      return
    kept = epath.Path(str(self.path) + ".tmp")
    kept.write_text("".join(r for r in rows if r.strip() and json.loads(r)["step"] <= step))
    epath.Path(self._ckpt.aside_directory).mkdir(parents=True, exist_ok=True)
    epath.Path(self._ckpt.aside_path(f"metrics-after-step-{step}", ".jsonl")).write_text(
        "".join(later))
    kept.replace(self.path)

  def show_skips(self, skipped: dict[str, dict[str, int]]) -> None:
    """One console line when the skip counts changed since the last one."""
    if not self.enabled:
      return
    parts = [f"{name} " + ", ".join(f"{reason} {count}" for reason, count in sorted(c.items()))
             for name, c in sorted(skipped.items()) if c]
    if parts and skipped != self._skips_shown:
      print(f"  skipped examples: {'; '.join(parts)}", flush=True)
    self._skips_shown = copy.deepcopy(skipped)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


class _Preemption:
  """SIGTERM sets a flag; the loop saves and stops after the current step.

  One process: a Python handler. Several: JAX's preemption service (started by
  `jax.distributed.initialize`) catches SIGTERM itself and agrees on a step at which every
  process stops (`reached_preemption`), without a host synchronisation per step, so no
  handler of ours is installed over its own."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: finishing this step, saving, exiting")
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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


def dry_run(config: Any, topology: str) -> dict:
  """Everything `train` builds before it needs devices or data, for `topology`'s devices
  (e.g. "v4:8x12x16" through libtpu): option checks, the mesh, the train setup (the model and
  the batches fit the mesh) and the input plan."""
  _validate_train_options(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model,
                            sharding.topology_devices(topology))
  train_step.make_train_setup(config, mesh)
  return dict(input_plan(config, mesh), topology=topology)


def save_checkpoint(ckpt, step, state, pipe, written_shards, config, skip_applied) -> None:
  ckpt.save(step, state, pipe.state(), written_shards, config, skip_applied)


def _initial_state(config, setup, ckpt, shards):
  """(state, frozen, the checkpoint's data item or None, whether the frozen towers are new and
  must be saved): from the checkpoints, else fresh. Writes nothing but moving damage aside."""
  restored = ckpt.restore(setup, shards, setup.mesh.shape[sharding.DATA])
  frozen = ckpt.restore_frozen(setup)
  frozen_is_new = False
  if restored is None or frozen is None:
    fresh_state, fresh_frozen = setup.init(jax.random.key(config.seed))
    if frozen is None:
      frozen = load_init_checkpoints(config.model, fresh_frozen, setup)
      frozen_is_new = not _init_paths(config.model)   # random towers: keep them (exact resume)
  if restored is None:
    if config.get("init_from"):        # every parameter from another run / parameter folder
      params, frozen = load_init_from(config.init_from, setup)
      return fresh_state._replace(params=params), frozen, None, True
    state = fresh_state._replace(params=load_init_trainable(config.model, fresh_state.params))
    return state, frozen, None, frozen_is_new
  state, data = restored
  return state, frozen, data, frozen_is_new


def restore_workdir_params(config: Any, workdir: str, mesh=None) -> hk.Params:
  """All parameters (trainable + frozen, merged) of a run's newest loadable checkpoint, for
  inference and checks; the frozen towers as the run had them (frozen/ or init checkpoints)."""
  return restore_workdir_params_and_step(config, workdir, mesh)[0]


def restore_workdir_params_and_step(config: Any, workdir: str, mesh=None,
                                    setup: train_step.TrainSetup | None = None
                                    ) -> tuple[hk.Params, int]:
  """`restore_workdir_params`, and the step of the checkpoint they come from. `setup`: the
  caller's own TrainSetup of `config` (not built twice)."""
  if setup is None:
    setup = train_step.make_train_setup(config, mesh or sharding.make_mesh(-1, 1))
  ckpt = checkpointing.Checkpointer(_absolute(workdir), config.train.keep_checkpoints,
                                    async_save=False)
  try:
    restored = ckpt.restore(setup)
    if restored is None:
      raise ValueError(f"no checkpoint in {workdir}/checkpoints")
    frozen = ckpt.restore_frozen(setup)
    if frozen is None:
      if not _init_paths(config.model):
        raise ValueError(f"{workdir} has no frozen/ and the config names no init_checkpoint")
      frozen = load_init_checkpoints(config.model, setup.init(jax.random.key(config.seed))[1],
                                     setup)
  finally:
    ckpt.close()
  return hk.data_structures.merge(restored[0].params, frozen), int(restored[0].step)


def load_init_from(source: str, setup: train_step.TrainSetup) -> tuple[hk.Params, hk.Params]:
  """`config.init_from`: (trainable, frozen) parameters of `setup`'s model, every one taken
  from `source` — a run's workdir (its newest checkpoint, frozen towers included) or a
  parameter folder (`save_params`: an import's `params/` or the folder holding it) — and
  split by this config's trainability (fine-tuning: the vision tower trains now). The
  optimizer starts fresh. A parameter `source` lacks, or of another shape, is an error."""
  target = hk.data_structures.merge(
      jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                   setup.abstract_state.params, setup.state_shardings.params),
      jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                   setup.abstract_frozen, setup.frozen_shardings))
  if os.path.isfile(os.path.join(source, "config.json")):
    loaded = _workdir_params(source, setup.mesh)
    for module, name, value in hk.data_structures.traverse(target):
      have = loaded.get(module, {}).get(name)
      if have is None:
        raise ValueError(f"config.init_from={source} has no parameter {module}/{name} (a run "
                         f"of another model?)")
      if tuple(have.shape) != tuple(value.shape):
        raise ValueError(f"config.init_from={source}: {module}/{name} is {tuple(have.shape)} "
                         f"but this config's is {tuple(value.shape)}")
    params = jax.tree.map(lambda t, x: jax.device_put(x.astype(t.dtype), t.sharding), target,
                          {m: {n: loaded[m][n] for n in leaves} for m, leaves in target.items()})
  else:
    path = os.path.join(source, "params") if os.path.isdir(os.path.join(source, "params")) else source
    if not os.path.isdir(path):
      raise ValueError(f"config.init_from={source} is neither a run's workdir (config.json) "
                       f"nor a parameter folder")
    params = weights.restore_params(path, target)
  trainable = {m: {n: params[m][n] for n in leaves}
               for m, leaves in setup.abstract_state.params.items()}
  frozen = {m: {n: params[m][n] for n in leaves} for m, leaves in setup.abstract_frozen.items()}
  logging.info("parameters from %s (config.init_from)", source)
  return trainable, frozen


def run_config(workdir: str) -> Any:
  """The config a run was started with (its WORKDIR/config.json), as a ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found: is {workdir} a training run's workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _workdir_params(workdir: str, mesh) -> hk.Params:
  """Every parameter of a run's newest checkpoint, restored on `mesh`: the run's own config
  (its config.json) with batches set to fit the mesh (they do not shape a parameter)."""
  config = run_config(workdir)
  for name, stream in config.data.streams.items():
    stream.batch_size = mesh.shape[sharding.DATA]
    config.train.microbatches[name] = 1
  return restore_workdir_params(config, workdir, mesh)


def load_init_checkpoints(model_config: Any, frozen, setup: train_step.TrainSetup):
  """Replaces the LM / vision parameters of `frozen` by those of their init checkpoints.

  Each checkpoint is a parameter directory whose paths match ours (e.g.
  `flamingo/language_model/...`), as `tools/import_weights` writes it (weights/loading.py).
  """
  for component, path in _init_paths(model_config):
    part, _ = hk.data_structures.partition(
        lambda module, name, value, c=component: models.component_of(module) == c, frozen)
    if component == "vision":
      weights.check_vision_import(path, model_config.vision)
    if not part:      # the component trains (lm.trainable): load_init_trainable loads it
      continue
    frozen = hk.data_structures.merge(frozen, weights.restore_params(path, part))
    logging.info("loaded %s from %s", component, path)
  return frozen


def load_init_trainable(model_config: Any, params):
  """Trainable parameters that an init checkpoint also holds, taken from it at a fresh start:
  an LM import's `<image>`/`<EOC>` rows (started at the mean pretrained row), a tower that
  trains (vision.trainable), a whole-model import's resampler and gated blocks (OpenFlamingo)."""
  for path in dict.fromkeys(p for _, p in _init_paths(model_config)):
    stored = weights.stored_param_names(path)
    part, _ = hk.data_structures.partition(lambda module, name, value: (module, name) in stored,
                                           params)
    if part:
      params = hk.data_structures.merge(params, weights.restore_params(path, part))
  return params


def _init_paths(model_config: Any) -> list[tuple[str, str]]:
  lm = model_config.get("lm")       # a contrastive model has none
  return [(c, p) for c, p in (("lm", lm.init_checkpoint if lm else ""),
                              ("vision", model_config.vision.init_checkpoint)) if p]


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def _validate_train_options(config: Any) -> None:
  if config.train.on_nonfinite not in ("stop", "rollback"):
    raise ValueError(f"train.on_nonfinite is {config.train.on_nonfinite!r}; expected 'stop' "
                     f"or 'rollback'")
  if config.train.skip_batches < 0:
    raise ValueError(f"train.skip_batches is {config.train.skip_batches}; expected >= 0")


def train(config: Any, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains to `config.train.steps`; returns {"last_step", "losses", "stopped_by", ...}."""
  workdir = _absolute(workdir)
  check_workdir(workdir)
  if not config.data.data_dir:         # before the check: the run's saved config has it set
    config = config.copy_and_resolve_references()
    config.data.data_dir = os.path.join(workdir, "data")
  check_config(config, workdir, allow_config_change)
  _validate_train_options(config)
  created = not epath.Path(workdir).exists()
  lease = take_workdir_lease(config, workdir)
  ckpt = pipe = log = preemption = None
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
    setup = train_step.make_train_setup(config, mesh)
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints, heal=True)
    if jax.process_count() > 1:          # one process builds the datasets, the others wait
      if jax.process_index() == 0:
        pipeline_lib.check_stream_sources(config)
        for name in config.data.streams:
          pipeline_lib.prepare_stream(config, name)
      multihost_utils.sync_global_devices("datasets prepared")
    shards, written_shards = input_shards(mesh)
    pipe = pipeline_lib.InputPipeline(config, shards, mesh.shape[sharding.DATA])
    state, frozen, data, frozen_is_new = _initial_state(config, setup, ckpt, shards)
    skip_applied = 0
    if data is not None:
      pipe.restore(data["pipeline"])
      skip_applied = data.get("skip_batches_applied", 0)
    # Everything is checked: from here on the workdir is written.
    write_config(config, workdir)
    if frozen_is_new:
      ckpt.save_frozen(frozen)
    step = int(state.step)
    if config.train.skip_batches and config.train.skip_batches != skip_applied:
      if jax.process_index() == 0:
        print(f"dropping {config.train.skip_batches} batches per stream before step "
              f"{step + 1} (train.skip_batches)", flush=True)
      for _ in range(config.train.skip_batches):
        next(pipe)
      skip_applied = config.train.skip_batches
    log = MetricsLog(workdir, int(config.train.steps), ckpt, step)
    preemption = _Preemption()
    pipe.start()                         # the loader warms up while the step compiles
    return _loop(config, setup, ckpt, pipe, shards, written_shards, log, preemption, state,
                 frozen, step, resumed=data is not None, skip_applied=skip_applied, lease=lease)
  finally:
    if preemption is not None:
      preemption.restore()
    if ckpt is not None:
      ckpt.close()
    if log is not None:
      log.close()
    if pipe is not None:
      pipe.close()
    if jax.process_count() > 1:
      # Leave together: a process that exits while a peer is still saving would otherwise
      # wait in the coordination service's shutdown barrier, and time out under load.
      multihost_utils.sync_global_devices("training finished")
    if lease is not None:
      lease.release()
    if created and jax.process_index() == 0:
      _remove_if_empty(workdir)        # a start that failed its checks leaves nothing behind


def take_workdir_lease(config: Any, workdir: str) -> lease_lib.Lease | None:
  """Process 0 takes the workdir's lease (lease.py); every process learns whether it did, so
  a refused start ends everywhere with process 0's one-line reason."""
  ttl = float(config.train.get("lease_seconds", lease_lib.DEFAULT_TTL))
  held, error = None, None
  if jax.process_index() == 0:
    held = lease_lib.Lease(epath.Path(workdir) / "lease.json", what="training run", ttl=ttl)
    try:
      held.acquire()
    except lease_lib.LeaseHeldError as e:
      held, error = None, e
  if jax.process_count() > 1:
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not taken and error is None:
      error = lease_lib.LeaseHeldError(f"process 0 could not take the lease on {workdir}")
  if error is not None:
    raise error
  return held


def _remove_if_empty(path: str) -> None:
  try:
    os.rmdir(path)
  except OSError:
    pass


class _Profile:
  """`train.profile_steps = (first, last)`: a jax.profiler trace of those steps (input,
  dispatch and device work) in WORKDIR/profile, for TensorBoard's profile plugin or Perfetto."""

  def __init__(self, steps, directory: str):
    if steps and (len(steps) != 2 or not 0 < steps[0] <= steps[1]):
      raise ValueError(f"train.profile_steps is {tuple(steps)}; expected (first, last) with "
                       f"0 < first <= last")
    self.first, self.last = (steps or (0, 0))
    self.directory, self.active = directory, False

  def before(self, step: int) -> None:
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, metrics) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(metrics)            # the traced steps' device work, whole
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile of steps from %d in %s", self.first, self.directory)


class _Judge:
  """Which updates were skipped and which checkpoints are good, read from the steps' flags
  in bulk at log and save steps (no host sync on every step)."""

  def __init__(self, ckpt: checkpointing.Checkpointer, limit: int, resumed_step: int | None):
    self.ckpt, self.limit = ckpt, limit
    self.verified = ckpt.verified_steps()
    self.unverified = ([resumed_step] if resumed_step is not None
                       and resumed_step not in self.verified else [])   # saved, not judged
    self.pending = []
    self.run = 0                     # skipped steps in a row
    self.skipped_updates = 0
    self.last_skipped = False

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics["skipped"], metrics["finite_loss"]))

  def saved(self, step: int) -> None:
    self.unverified.append(step)

  def update(self) -> tuple[int, int] | None:
    """Judges the pending steps; (first, last) step of a run of `limit` skipped steps in a
    row when one happened (the steps after it are dropped: they are about to be undone)."""
    steps = [step for step, _, _ in self.pending]
    flags = jax.device_get([(skipped, finite) for _, skipped, finite in self.pending])
    self.pending = []
    for step, (skipped, finite_loss) in zip(steps, flags):
      self.skipped_updates += int(skipped)
      self.last_skipped = bool(skipped)
      self.run = self.run + 1 if skipped else 0
      if finite_loss and self.unverified:     # the saved parameters gave a finite loss
        self.verified.update(self.unverified)
        self.ckpt.mark_verified(self.verified)
        self.unverified.clear()
      if self.run >= self.limit:
        streak = (step - self.run + 1, step)
        self.run = 0
        return streak
    return None

  def set_aside_diverged(self) -> tuple[int | None, list[str]]:
    """(last good step or None, paths moved): checkpoints newer than the last good one, and
    those saved since the parameters were last judged, go to moved_aside/."""
    self.ckpt.wait()
    steps = self.ckpt.all_steps()
    good = max((s for s in steps if s in self.verified), default=None)
    suspect = sorted(s for s in steps
                     if s in self.unverified or (good is not None and s > good))
    self.unverified.clear()
    return good, self.ckpt.move_steps_aside(suspect, "diverged")


def _lease_lost(lease: lease_lib.Lease | None) -> bool:
  """Whether process 0 lost the workdir's lease (told to every process)."""
  lost = lease is not None and not lease.verify()
  if jax.process_count() > 1:
    lost = bool(multihost_utils.broadcast_one_to_all(np.int32(lost)))
  return lost


def _loop(config, setup, ckpt, pipe, shards, written_shards, log, preemption, state, frozen, step,
          resumed, skip_applied, lease=None) -> dict:
  total = int(config.train.steps)
  logging.info("starting at step %d of %d in %s (%d processes, mesh %s)", step, total,
               ckpt.workdir, jax.process_count(), dict(setup.mesh.shape))
  analytic_flops = flops_lib.train_step_flops(config)["total"]
  peak = peak_tflops(config)
  streams = config.data.streams
  tokens_per_step = sum(s.batch_size * s.max_tokens for s in streams.values())
  examples_per_step = sum(s.batch_size for s in streams.values())
  summary = {"first_step": step, "losses": {}, "skipped_updates": 0, "stopped_by": "end",
             "rollbacks": 0, "moved_aside": []}
  judge = _Judge(ckpt, config.train.max_consecutive_nonfinite, step if resumed else None)
  last_log_time, last_log_step, start_time, start_step = time.time(), step, time.time(), step
  all_finite = jax.jit(train_step.all_finite)
  step_fn = setup.step
  if jax.process_count() > 1:
    # Compile first, then start together: a process that compiled sooner would wait alone in
    # the step's first collective, and gloo gives a new communicator only 30 s.
    step_fn = setup.step.lower(state, frozen, setup.abstract_batches).compile()
    ocp_multihost.sync_global_processes("train step compiled")

  profile = _Profile(config.train.profile_steps, os.path.join(ckpt.workdir, "profile"))
  try:
    while step < total:
      profile.before(step + 1)
      batches = global_batches(setup, next(pipe), shards)
      state, metrics = step_fn(state, frozen, batches)
      step += 1
      judge.add(step, metrics)
      profile.after(step, metrics)
      stop = preemption.requested or ckpt.manager.reached_preemption(step)
      log_now = step % config.train.log_every == 0 or step == total
      periodic_save = step % config.train.checkpoint_every == 0
      if not (log_now or periodic_save or stop):
        continue
      if _lease_lost(lease):
        raise lease_lib.LeaseLostError(
            f"the lease on {ckpt.workdir} was taken over by another training run (this one "
            f"stalled for more than {config.train.get('lease_seconds', lease_lib.DEFAULT_TTL):g} "
            f"s); stopping at step {step} without saving")
      streak = judge.update()
      if streak is not None:
        good, moved = judge.set_aside_diverged()
        summary["moved_aside"] += moved
        moved_text = f"; moved aside: {', '.join(moved)}" if moved else ""
        what = (f"{streak[1] - streak[0] + 1} non-finite steps in a row (steps "
                f"{streak[0]}-{streak[1]})")
        if (config.train.on_nonfinite == "rollback" and good is not None
            and summary["rollbacks"] < config.train.max_rollbacks):
          state, _ = ckpt.restore_step(good, setup)
          logging.warning("%s: rolled back to step %d, the last good checkpoint%s; going on with "
                          "the data after the bad stretch", what, good, moved_text)
          print(f"rollback: {what}; back to step {good}{moved_text}", flush=True)
          step = good
          summary["rollbacks"] += 1
          log.rewind(step)
          last_log_time, last_log_step = time.time(), step
          continue
        summary["stopped_by"] = "nonfinite"
        remaining = ckpt.all_steps()
        resume_step = max(remaining) if remaining else 0
        skip = streak[1] - resume_step
        raise NonFiniteError(
            f"{what}; stopping. The last good checkpoint is step {good} in {ckpt.directory} "
            f"(its parameters gave a finite loss afterwards){moved_text}; rerunning resumes "
            f"from step {resume_step}. Lower the learning rate, or rerun with "
            f"--config.train.skip_batches={skip} to step over the batches of steps "
            f"{resume_step + 1}-{streak[1]}, where it diverged.")
      summary["skipped_updates"] = judge.skipped_updates
      if log_now:
        now = time.time()
        seconds = (now - last_log_time) / max(1, step - last_log_step)
        record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        record.update(
            step_seconds=seconds,
            examples_per_sec=examples_per_step / seconds, tokens_per_sec=tokens_per_step / seconds,
            tflops_per_device=analytic_flops / seconds / jax.device_count() / 1e12,
            skipped_updates=judge.skipped_updates)
        if peak:
          record["mfu"] = record["tflops_per_device"] / peak
        skipped_examples = pipe.skipped()
        for name, counts in skipped_examples.items():
          for reason, count in counts.items():
            record[f"skipped_examples/{name}/{reason}"] = count
        summary["losses"][step] = record["loss"]
        eta = (now - start_time) / max(1, step - start_step) * (total - step)
        log.write(record, eta)
        log.show_skips(skipped_examples)
        last_log_time, last_log_step = time.time(), step
      # No periodic save of a skipped step: its state is the last one's, not yet judged good.
      if (periodic_save and not judge.last_skipped) or step == total or stop:
        if bool(all_finite((state.params, state.opt_state))):
          save_checkpoint(ckpt, step, state, pipe, written_shards, config, skip_applied)
          judge.saved(step)
        else:
          logging.error("state at step %d is not finite: not saving it", step)
      if stop:
        summary["stopped_by"] = "preemption"
        break
  finally:
    profile.stop()
  summary["last_step"] = step
  return summary
