"""The training loop: owns I/O around one jitted step (docs/design.md §7, §9).

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

import dataclasses
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as ocp_multihost

from flamingo_jax.data import pipeline as pipeline_lib
from flamingo_jax.data import prepare
from flamingo_jax import lease as lease_lib
from flamingo_jax.training import checkpointing
from flamingo_jax.training import feeding
from flamingo_jax.training import guards
from flamingo_jax.training import metrics_log
from flamingo_jax.training import param_sources
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training import train_step
from flamingo_jax.training import workdir as workdir_lib

NonFiniteError = guards.NonFiniteError


@dataclasses.dataclass
class _Run:
  """What the loop works with, built by `train` once everything is checked."""
  config: Any
  setup: train_step.TrainSetup
  ckpt: checkpointing.Checkpointer
  pipe: pipeline_lib.InputPipeline
  shards: tuple[int, ...]
  written_shards: tuple[int, ...]
  log: metrics_log.MetricsLog
  preemption: guards.Preemption
  lease: lease_lib.Lease | None
  skip_applied: int = 0

  def save(self, step: int, state) -> None:
    self.ckpt.save(step, state, self.pipe.state(), self.written_shards, self.config,
                   self.skip_applied)


def _initial_state(config, setup, ckpt, shards):
  """(state, frozen, the checkpoint's data item or None, whether the frozen towers are new and
  must be saved): from the checkpoints, else fresh. Writes nothing but moving damage aside."""
  restored = ckpt.restore(setup, shards, setup.mesh.shape[sharding.DATA])
  frozen = ckpt.restore_frozen(setup)
  frozen_is_new = False
  if restored is None or frozen is None:
    fresh_state, fresh_frozen = setup.init(jax.random.key(config.seed))
    if frozen is None:
      frozen = param_sources.init_checkpoints(config.model, fresh_frozen)
      frozen_is_new = not param_sources.init_paths(config.model)   # random towers: kept
  if restored is None:
    if config.get("init_from"):        # every parameter from another run / parameter folder
      params, frozen = param_sources.init_from(config.init_from, setup)
      return fresh_state._replace(params=params), frozen, None, True
    state = fresh_state._replace(params=param_sources.init_trainable(config.model,
                                                                      fresh_state.params))
    return state, frozen, None, frozen_is_new
  state, data = restored
  return state, frozen, data, frozen_is_new


def dry_run(config: Any, topology: str) -> dict:
  """Everything `train` builds before it needs devices or data, for `topology`'s devices
  (e.g. "v4:8x12x16" through libtpu): option checks, the mesh, the train setup (the model and
  the batches fit the mesh) and the input plan."""
  _validate_train_options(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model,
                            sharding.topology_devices(topology))
  tasks.make_train_setup(config, mesh)
  return dict(feeding.input_plan(config, mesh), topology=topology)


def _validate_train_options(config: Any) -> None:
  if config.train.on_nonfinite not in ("stop", "rollback"):
    raise ValueError(f"train.on_nonfinite is {config.train.on_nonfinite!r}; expected 'stop' "
                     f"or 'rollback'")
  if config.train.skip_batches < 0:
    raise ValueError(f"train.skip_batches is {config.train.skip_batches}; expected >= 0")


def train(config: Any, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains to `config.train.steps`; returns {"last_step", "losses", "stopped_by", ...}."""
  workdir = workdir_lib.absolute(workdir)
  workdir_lib.check_workdir(workdir)
  if not config.data.data_dir:         # before the check: the run's saved config has it set
    config = config.copy_and_resolve_references()
    config.data.data_dir = os.path.join(workdir, "data")
  workdir_lib.check_config(config, workdir, allow_config_change)
  _validate_train_options(config)
  created = not epath.Path(workdir).exists()
  lease = workdir_lib.take_lease(config, workdir)
  ckpt = pipe = log = preemption = None
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
    setup = tasks.make_train_setup(config, mesh)
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints, heal=True)
    if jax.process_count() > 1:          # one process builds the datasets, the others wait
      if jax.process_index() == 0:
        prepare.check_stream_sources(config)
        for name in config.data.streams:
          prepare.prepare_stream(config, name)
      multihost_utils.sync_global_devices("datasets prepared")
    shards, written_shards = feeding.input_shards(mesh)
    pipe = pipeline_lib.InputPipeline(config, shards, mesh.shape[sharding.DATA])
    state, frozen, data, frozen_is_new = _initial_state(config, setup, ckpt, shards)
    skip_applied = 0
    if data is not None:
      pipe.restore(data["pipeline"])
      skip_applied = data.get("skip_batches_applied", 0)
    # Everything is checked: from here on the workdir is written.
    workdir_lib.write_config(config, workdir)
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
    log = metrics_log.MetricsLog(workdir, int(config.train.steps), ckpt, step)
    preemption = guards.Preemption()
    pipe.start()                         # the loader warms up while the step compiles
    run = _Run(config, setup, ckpt, pipe, shards, written_shards, log, preemption, lease,
               skip_applied)
    return _loop(run, state, frozen, step, resumed=data is not None)
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
      workdir_lib.remove_if_empty(workdir)        # a start that failed its checks leaves nothing behind


def _loop(run: _Run, state, frozen, step: int, resumed: bool) -> dict:
  config, setup, ckpt, pipe, log = run.config, run.setup, run.ckpt, run.pipe, run.log
  total = int(config.train.steps)
  logging.info("starting at step %d of %d in %s (%d processes, mesh %s)", step, total,
               ckpt.workdir, jax.process_count(), dict(setup.mesh.shape))
  analytic_flops = tasks.step_flops(config)["total"]
  peak = metrics_log.peak_tflops(config)
  streams = config.data.streams
  tokens_per_step = sum(s.batch_size * s.max_tokens for s in streams.values())
  examples_per_step = sum(s.batch_size for s in streams.values())
  summary = {"first_step": step, "losses": {}, "skipped_updates": 0, "stopped_by": "end",
             "rollbacks": 0, "moved_aside": []}
  judge = guards.DivergenceJudge(ckpt, config.train.max_consecutive_nonfinite,
                                 step if resumed else None)
  last_log_time, last_log_step, start_time, start_step = time.time(), step, time.time(), step
  all_finite = jax.jit(train_step.all_finite)
  step_fn = setup.step
  if jax.process_count() > 1:
    # Compile first, then start together: a process that compiled sooner would wait alone in
    # the step's first collective, and gloo gives a new communicator only 30 s.
    step_fn = setup.step.lower(state, frozen, setup.abstract_batches).compile()
    ocp_multihost.sync_global_processes("train step compiled")

  profile = guards.Profile(config.train.profile_steps, os.path.join(ckpt.workdir, "profile"))
  try:
    while step < total:
      profile.before(step + 1)
      batches = feeding.global_batches(setup, next(pipe), run.shards)
      state, metrics = step_fn(state, frozen, batches)
      step += 1
      judge.add(step, metrics)
      profile.after(step, metrics)
      stop = run.preemption.requested or ckpt.manager.reached_preemption(step)
      log_now = step % config.train.log_every == 0 or step == total
      periodic_save = step % config.train.checkpoint_every == 0
      if not (log_now or periodic_save or stop):
        continue
      if workdir_lib.lease_lost(run.lease):
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
        raise guards.NonFiniteError(
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
          run.save(step, state)
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
