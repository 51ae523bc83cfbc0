"""The training loop: owns I/O around one jitted step (DESIGN.md §7, §9).

    summary = trainer.train(config, workdir)

Resumes from the newest loadable checkpoint in WORKDIR; SIGTERM (and orbax's preemption
notice on TPU) finishes the current step, saves and returns; writes WORKDIR/config.json,
metrics.jsonl (process 0), TensorBoard events and checkpoints. A non-finite loss or gradient
skips that update (train_step.py); `train.max_consecutive_nonfinite` of them in a row stop
the run with the last good checkpoint intact, and a non-finite state is never saved.
"""

import json
import os
import signal
import time
from typing import Any

from absl import logging
from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

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


def check_config(config: Any, workdir: str, allow_change: bool) -> None:
  """Writes WORKDIR/config.json, or checks the run's config against it."""
  path = epath.Path(workdir) / "config.json"
  new = json.loads(config.to_json())
  if path.exists():
    old = json.loads(path.read_text())
    a, b = _flatten(old), _flatten(new)
    differing = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    if differing and not allow_change:
      details = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                          for k in differing[:20])
      raise ValueError(f"{workdir} holds a run with a different config ({details}); use "
                       f"another --workdir or pass --allow_config_change")
    if differing:
      logging.warning("config changed in %s: %s", workdir, differing)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=2, sort_keys=True))


class MetricsLog:
  """metrics.jsonl + TensorBoard (process 0) and a console line."""

  def __init__(self, workdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total = total_steps
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._tb = None
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

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


class _Preemption:
  """SIGTERM sets a flag; the loop saves and stops after the current step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: finishing this step, saving, exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def global_batches(setup: train_step.TrainSetup, local: dict) -> dict:
  """This process's rows -> global arrays on the mesh (rows of process p at p's devices)."""
  def put(sharding_, x):
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding_, x, shape)
  return jax.tree.map(put, setup.batch_shardings, local)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _initial_state(config, setup, ckpt):
  """(state, frozen, iterator state or None): from the checkpoints, else fresh."""
  frozen = ckpt.restore_frozen(setup)
  restored = ckpt.restore(setup)
  if restored is None or frozen is None:
    fresh_state, fresh_frozen = setup.init(jax.random.key(config.seed))
    fresh_state = fresh_state._replace(
        params=load_init_trainable(config.model, fresh_state.params))
    if frozen is None:
      frozen = load_init_checkpoints(config.model, fresh_frozen, setup)
      if not (config.model.lm.init_checkpoint or config.model.vision.init_checkpoint):
        ckpt.save_frozen(frozen)      # random towers: keep them, so a resume is exact
  if restored is None:
    return fresh_state, frozen, None
  state, data_state = restored
  return state, frozen, data_state


def restore_workdir_params(config: Any, workdir: str, mesh=None) -> hk.Params:
  """All parameters (trainable + frozen, merged) of a run's newest loadable checkpoint, for
  inference and checks; the frozen towers as the run had them (frozen/ or init checkpoints)."""
  mesh = mesh or sharding.make_mesh(-1, 1)
  setup = train_step.make_train_setup(config, mesh)
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
  return hk.data_structures.merge(restored[0].params, frozen)


def load_init_checkpoints(model_config: Any, frozen, setup: train_step.TrainSetup):
  """Replaces the LM / vision parameters of `frozen` by those of their init checkpoints.

  Each checkpoint is a parameter directory whose paths match ours (e.g.
  `flamingo/language_model/...`), as `tools/import_weights` writes it (weights/loading.py).
  """
  for component, path in _init_paths(model_config):
    part, _ = hk.data_structures.partition(
        lambda module, name, value, c=component: models.component_of(module) == c, frozen)
    frozen = hk.data_structures.merge(frozen, weights.restore_params(path, part))
    logging.info("loaded %s from %s", component, path)
  return frozen


def load_init_trainable(model_config: Any, params):
  """Trainable parameters that an LM import also holds (the `<image>`/`<EOC>` rows, started
  at the mean pretrained row), taken from it at a fresh start."""
  path = model_config.lm.init_checkpoint
  if not path:
    return params
  stored = weights.stored_param_names(path)
  part, _ = hk.data_structures.partition(
      lambda module, name, value: (module, name) in stored
      and models.component_of(module) == "lm", params)
  if not part:
    return params
  return hk.data_structures.merge(params, weights.restore_params(path, part))


def _init_paths(model_config: Any) -> list[tuple[str, str]]:
  return [(c, p) for c, p in (("lm", model_config.lm.init_checkpoint),
                              ("vision", model_config.vision.init_checkpoint)) if p]


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def train(config: Any, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains to `config.train.steps`; returns {"steps_run", "last_step", "losses", ...}."""
  workdir = _absolute(workdir)
  check_config(config, workdir, allow_config_change)
  if not config.data.data_dir:
    config = config.copy_and_resolve_references()
    config.data.data_dir = os.path.join(workdir, "data")
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  setup = train_step.make_train_setup(config, mesh)
  ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  if jax.process_count() > 1:          # one process builds the datasets, the others wait
    if jax.process_index() == 0:
      for name in config.data.streams:
        pipeline_lib.prepare_stream(config, name)
    multihost_utils.sync_global_devices("datasets prepared")
  pipe = pipeline_lib.InputPipeline(config, jax.process_index(), jax.process_count())
  state, frozen, data_state = _initial_state(config, setup, ckpt)
  if data_state is not None:
    pipe.restore(data_state)
  step = int(state.step)
  total = int(config.train.steps)
  logging.info("starting at step %d of %d in %s (%d processes, mesh %s)", step, total, workdir,
               jax.process_count(), dict(mesh.shape))

  log = MetricsLog(workdir, total)
  preemption = _Preemption()
  analytic_flops = flops_lib.train_step_flops(config)["total"]
  peak = peak_tflops(config)
  streams = config.data.streams
  tokens_per_step = sum(s.batch_size * s.max_tokens for s in streams.values())
  examples_per_step = sum(s.batch_size for s in streams.values())
  summary = {"first_step": step, "losses": {}, "skipped_updates": 0, "stopped_by": "end"}
  nonfinite_run = 0
  last_log_time, last_log_step, start_time, start_step = time.time(), step, time.time(), step

  def save(step_):
    if not bool(_all_finite((state.params, state.opt_state))):
      logging.error("state at step %d is not finite: not saving it", step_)
      return
    ckpt.save(step_, state, pipe.state(), config)

  try:
    while step < total:
      batches = global_batches(setup, next(pipe))
      state, metrics = setup.step(state, frozen, batches)
      step += 1
      skipped = int(metrics["skipped"])
      summary["skipped_updates"] += skipped
      nonfinite_run = nonfinite_run + 1 if skipped else 0
      if nonfinite_run >= config.train.max_consecutive_nonfinite:
        summary["stopped_by"] = "nonfinite"
        raise NonFiniteError(
            f"{nonfinite_run} non-finite steps in a row (up to step {step}); stopping. The last "
            f"good checkpoint is step {max(ckpt.all_steps(), default=None)} in {ckpt.directory}")
      if step % config.train.log_every == 0 or step == total:
        now = time.time()
        seconds = (now - last_log_time) / max(1, step - last_log_step)
        record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        record.update(
            step_seconds=seconds,
            examples_per_sec=examples_per_step / seconds, tokens_per_sec=tokens_per_step / seconds,
            tflops_per_device=analytic_flops / seconds / jax.device_count() / 1e12,
            skipped_updates=summary["skipped_updates"])
        if peak:
          record["mfu"] = record["tflops_per_device"] / peak
        for name, counts in pipe.skipped().items():
          for reason, count in counts.items():
            record[f"skipped_examples/{name}/{reason}"] = count
        summary["losses"][step] = record["loss"]
        eta = (now - start_time) / max(1, step - start_step) * (total - step)
        log.write(record, eta)
        last_log_time, last_log_step = time.time(), step
      stop = preemption.requested or ckpt.manager.reached_preemption(step)
      if jax.process_count() > 1:       # every process stops at the same step
        stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
      if step % config.train.checkpoint_every == 0 or step == total or stop:
        save(step)
      if stop:
        summary["stopped_by"] = "preemption"
        break
  finally:
    preemption.restore()
    ckpt.close()
    log.close()
    pipe.close()
  if jax.process_count() > 1:
    # Leave together: a process that exits while a peer is still saving would otherwise
    # wait in the coordination service's shutdown barrier, and time out under load.
    multihost_utils.sync_global_devices("training finished")
  summary["last_step"] = step
  return summary
