#!/usr/bin/env python3
r"""Expand a config's `get_sweep()` into runs with distinct names and workdirs, and run them.

  python launch/sweep.py --config=experiments/configs/tiny.py --workdir=runs/sweep --local
  python launch/sweep.py --config=experiments/configs/flamingo_3b.py \
      --workdir=gs://BUCKET/sweeps/lr --tpu=fl3b --zone=us-central2-b
  ... --dry_run     # print the commands only

`get_sweep()` returns a list of override dicts ({"optim.learning_rate": 3e-4, "seed": 1});
each becomes `--config.KEY=VALUE` flags and the run name `KEY=VALUE,...`. The runs go one
after another, each with its own workdir: locally as `flamingo_jax.train`, on a pod as an
attached `launch/tpu.py run` (it returns when the run ends) with its own log on the workers,
`~/flamingo_logs/<run name>.log`. A failed run does not stop the sweep; the failures are
listed at the end (exit 1).
"""

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_LOG_DIR = "~/flamingo_logs"


def load_sweep(config_spec: str) -> list[dict]:
  path = config_spec.partition(":")[0]
  spec = importlib.util.spec_from_file_location("sweep_config", os.path.join(REPO, path)
                                                if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, REPO)           # config files import flamingo_jax.config_base
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"{path} defines no get_sweep()")
  sweep = module.get_sweep()
  if not sweep:
    raise SystemExit(f"{path}: get_sweep() is empty")
  return sweep


def run_name(overrides: dict) -> str:
  name = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
  return re.sub(r"[^\w.=,\-]", "_", name)


def flags_of(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in sorted(overrides.items())]


def commands(argv) -> tuple[list[list[str]], bool]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="parent of the runs' workdirs")
  where = p.add_mutually_exclusive_group(required=True)
  where.add_argument("--local", action="store_true")
  where.add_argument("--tpu", default="", help="TPU VM name (launch/tpu.py)")
  p.add_argument("--zone", default="")
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--dry_run", action="store_true")
  args = p.parse_args(argv)
  sweep = load_sweep(args.config)
  names = [run_name(o) for o in sweep]
  if len(set(names)) != len(names):
    raise SystemExit(f"get_sweep() repeats a run: {names}")
  cmds = []
  for overrides, name in zip(sweep, names):
    workdir = f"{args.workdir.rstrip('/')}/{name}"
    if args.local:
      cmds.append([args.python, "-m", "flamingo_jax.train", f"--config={args.config}",
                   f"--workdir={workdir}", *flags_of(overrides)])
    else:
      if not args.zone:
        raise SystemExit("--tpu needs --zone")
      cmds.append([args.python, os.path.join("launch", "tpu.py"), "run", f"--name={args.tpu}",
                   f"--zone={args.zone}", f"--config={args.config}", f"--workdir={workdir}",
                   f"--log={POD_LOG_DIR}/{name}.log", "--", *flags_of(overrides)])
  return cmds, args.dry_run


def main(argv=None):
  cmds, dry_run = commands(sys.argv[1:] if argv is None else argv)
  failed = []
  for i, cmd in enumerate(cmds, 1):
    print(shlex.join(cmd), flush=True)
    if not dry_run and subprocess.run(cmd, check=False, cwd=REPO).returncode:
      failed.append(f"run {i}/{len(cmds)}: {shlex.join(cmd)}")
  if failed:
    print(f"{len(failed)} of {len(cmds)} runs failed:\n" + "\n".join(failed), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
