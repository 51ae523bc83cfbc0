r"""Train a Flamingo model (docs/design.md §7).

  python -m flamingo_jax.train --config=experiments/configs/tiny.py --workdir=runs/tiny \
      [--config.train.steps=100 --config.optim.learning_rate=3e-4 ...]

  # several processes without a TPU (gloo collectives on CPU):
  python -m flamingo_jax.train ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0

On Cloud TPU pods every worker runs the same command; `jax.distributed.initialize()` finds
its peers. Re-running with the same --workdir resumes (`--workdir=RUN` alone: with the
config the run was started with, overrides on top); SIGTERM saves and exits 0.

  # will this config start on that slice? (mesh, model and batch checks, which data shards
  # each host feeds; no TPU, no data, no workdir needed)
  python -m flamingo_jax.train --config=experiments/configs/flamingo_80b.py --dry_run=v4:8x12x16
"""

import sys

from absl import flags
from absl import logging
import jax

from flamingo_jax import cli
from flamingo_jax import lease
from flamingo_jax.training import checkpointing
from flamingo_jax.training import guards
from flamingo_jax.training import trainer

_CONFIG = cli.define_config(run_flags=("workdir",))
_WORKDIR = cli.define_workdir("Checkpoints, logs and config.json; a run's workdir alone "
                              "resumes it with its own config.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Resume a workdir whose config.json differs from --config.")
cli.define_start()
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


def main(argv):
  del argv
  if _DRY_RUN.value:
    _print_plan(trainer.dry_run(_CONFIG.value, _DRY_RUN.value))
    return
  cli.start()
  if jax.process_index() != 0 or not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # orbax logs every file at INFO; -v 0 shows it
  try:
    summary = trainer.train(_CONFIG.value, _WORKDIR.value, _ALLOW_CHANGE.value)
  except (guards.NonFiniteError, checkpointing.NoLoadableCheckpointError, ValueError,
          FileNotFoundError, lease.LeaseHeldError, lease.LeaseLostError) as e:  # one-line errors
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print(f"done: step {summary['last_step']} ({summary['stopped_by']}); workdir {_WORKDIR.value}",
          flush=True)


if __name__ == "__main__":
  flags.register_multi_flags_validator(
      ["workdir", "dry_run"], lambda f: bool(f["workdir"] or f["dry_run"]),
      message="--workdir is required (except with --dry_run)")
  cli.run(main)
