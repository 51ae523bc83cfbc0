r"""Train a Flamingo model (DESIGN.md §7).

  python -m flamingo_jax.train --config=experiments/configs/tiny.py --workdir=runs/tiny \
      [--config.train.steps=100 --config.optim.learning_rate=3e-4 ...]

  # several processes without a TPU (gloo collectives on CPU):
  python -m flamingo_jax.train ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0

On Cloud TPU pods every worker runs the same command; `jax.distributed.initialize()` finds
its peers. Re-running with the same --workdir resumes; SIGTERM saves and exits 0.

  # will this config start on that slice? (mesh, model and batch checks, which data shards
  # each host feeds; no TPU, no data, no workdir needed)
  python -m flamingo_jax.train --config=experiments/configs/flamingo_80b.py --dry_run=v4:8x12x16
"""

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from flamingo_jax.tools import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/*.py).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and config.json.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Resume a workdir whose config.json differs from --config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 "
                                   "(multi-process runs without a TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
_DRY_RUN = flags.DEFINE_string("dry_run", "", "TOPOLOGY (e.g. v4:8x12x16, or cpu): build the "
                               "mesh, the train setup and the input plan for its devices, print "
                               "them and exit; trains nothing.")


def _print_plan(plan: dict) -> None:
  mesh = plan["mesh"]
  print(f"dry run on {plan['topology']}: {plan['devices']} devices, {plan['processes']} "
        f"processes, mesh data={mesh['data']} x model={mesh['model']}")
  spans = ", ".join(map(str, plan["processes_per_shard"]))
  print(f"each process feeds {plan['shards_per_process']} data shard(s); each data shard (one "
        f"model group) is fed by {spans} process(es), which produce the same rows")
  for name, batch in plan["batch"].items():
    print(f"  {name}: global batch {batch} = {mesh['data']} shards x {plan['rows_per_shard'][name]}"
          f" rows; {plan['rows_per_process'][name]} rows per process per step")
  print("ok: the model and the batches fit the mesh and every data shard is fed", flush=True)


def _init_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    # Before any backend starts: cross-process collectives on CPU go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()          # TPU pod: peers from the environment


def main(argv):
  del argv
  if _DRY_RUN.value:
    from flamingo_jax.training import trainer  # pylint: disable=g-import-not-at-top
    _print_plan(trainer.dry_run(_CONFIG.value, _DRY_RUN.value))
    return
  _init_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from flamingo_jax import lease  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import trainer  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0 or not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # orbax logs every file at INFO; -v 0 shows it
  try:
    summary = trainer.train(_CONFIG.value, _WORKDIR.value, _ALLOW_CHANGE.value)
  except (trainer.NonFiniteError, checkpointing.NoLoadableCheckpointError, ValueError,
          FileNotFoundError, lease.LeaseHeldError, lease.LeaseLostError) as e:  # one-line errors
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print(f"done: step {summary['last_step']} ({summary['stopped_by']}); workdir {_WORKDIR.value}",
          flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  flags.register_multi_flags_validator(
      ["workdir", "dry_run"], lambda f: bool(f["workdir"] or f["dry_run"]),
      message="--workdir is required (except with --dry_run)")
  cli.run(main)
