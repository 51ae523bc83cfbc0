"""A run's workdir: its config.json against the command's config, and its lease.

    workdir.check_config(config, WORKDIR, allow_change)   # before anything is written
    lease = workdir.take_lease(config, WORKDIR)            # process 0 holds it (lease.py)
    workdir.write_config(config, WORKDIR)

A rerun may change how a run is driven (RUN_CONTROL_KEYS: steps, cadences, the non-finite
policy, ...) but not what it computes, unless --allow_config_change; an option added to the
code after the run started reads as its default (config_base.implied_default).
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from flamingo_jax import config_base
from flamingo_jax import lease as lease_lib


def absolute(path: str) -> str:
  """An absolute local path; gs:// and other URLs as they are."""
  return path if "://" in path else os.path.abspath(path)


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


def take_lease(config: Any, workdir: str) -> lease_lib.Lease | None:
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


def remove_if_empty(path: str) -> None:
  try:
    os.rmdir(path)
  except OSError:
    pass


def lease_lost(lease: lease_lib.Lease | None) -> bool:
  """Whether process 0 lost the workdir's lease (told to every process)."""
  lost = lease is not None and not lease.verify()
  if jax.process_count() > 1:
    lost = bool(multihost_utils.broadcast_one_to_all(np.int32(lost)))
  return lost
