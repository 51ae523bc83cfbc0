#!/usr/bin/env python3
r"""Cloud TPU pod launcher: create / setup / run / logs / ssh / delete over `gcloud`.

Every worker of a pod slice runs the same command (`--worker=all`); the trainer's
`jax.distributed.initialize()` finds its peers. Large slices go through queued resources.
`--dry_run` prints the exact commands instead of running them.

  python launch/tpu.py create --name=fl80b --zone=us-central2-b --accelerator=v4-3072 --queued
  python launch/tpu.py setup  --name=fl80b --zone=us-central2-b
  python launch/tpu.py run    --name=fl80b --zone=us-central2-b \
      --config=experiments/configs/flamingo_80b.py --workdir=gs://BUCKET/runs/fl80b \
      [--detach] [--log=~/flamingo_train.log] -- --config.train.steps=500000
  python launch/tpu.py logs   --name=fl80b --zone=us-central2-b [--log=...]
  python launch/tpu.py delete --name=fl80b --zone=us-central2-b --queued

Standard library only: it runs on a laptop without the project installed.
"""

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_VERSION = "0.10.2"                      # = setup.py
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
REMOTE_DIR = "~/flamingo_jax"
TARBALL = "flamingo_jax.tar.gz"
LOG = "~/flamingo_train.log"


def _gcloud(args, *rest):
  cmd = ["gcloud", "compute", "tpus", *rest, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def _ssh(args, command: str, worker: str = "all"):
  return _gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}", f"--command={command}")


def create(args):
  if args.queued:
    return [_gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                    f"--accelerator-type={args.accelerator}",
                    f"--runtime-version={args.version}")]
  return [_gcloud(args, "tpu-vm", "create", args.name, f"--accelerator-type={args.accelerator}",
                  f"--version={args.version}")]


def setup(args):
  """Ships HEAD of this checkout to every worker and installs it with the pinned jax[tpu]."""
  local_tar = os.path.join("/tmp", TARBALL)
  install = (f"mkdir -p {REMOTE_DIR} && tar xzf ~/{TARBALL} -C {REMOTE_DIR} && cd {REMOTE_DIR} "
             f"&& python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip "
             f"&& .venv/bin/pip install -q -e . 'jax[tpu]=={JAX_VERSION}' -f {LIBTPU_INDEX}")
  return [
      ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={local_tar}", "HEAD"],
      _gcloud(args, "tpu-vm", "scp", local_tar, f"{args.name}:~/{TARBALL}", "--worker=all"),
      _ssh(args, install),
  ]


def run(args):
  """The trainer on every worker. Attached (default): waits for the run, streams its output
  (also kept in the log on each worker) and returns its exit status, so that runs given one
  after another (launch/sweep.py) run one after another. `--detach`: starts it in the
  background and returns at once.

  First step of a pod run: `python -m flamingo_jax.tools.aot_compile --config=... --topology=...`
  on any machine proves the config fits before the slice is paid for (WORKSPACE.md).
  """
  if not args.workdir.startswith("gs://"):
    raise SystemExit(f"--workdir={args.workdir}: pod runs need a gs:// workdir every worker sees")
  train = shlex.join([".venv/bin/python", "-m", "flamingo_jax.train", f"--config={args.config}",
                      f"--workdir={args.workdir}", *args.overrides])
  log = args.log
  prepare = f"mkdir -p $(dirname {log}) && cd {REMOTE_DIR}"
  if args.detach:
    command = f"{prepare} && nohup {train} > {log} 2>&1 &"
  else:   # pipefail: the run's status, not tee's
    command = f"set -o pipefail && {prepare} && {train} 2>&1 | tee {log}"
  return [_ssh(args, command)]


def logs(args):
  return [_ssh(args, f"tail -n {args.lines} {args.log}", worker=str(args.worker))]


def ssh(args):
  return [_gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={args.worker}")]


def delete(args):
  if args.queued:
    return [_gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")]
  return [_gcloud(args, "tpu-vm", "delete", args.name, "--quiet")]


COMMANDS = {"create": create, "setup": setup, "run": run, "logs": logs, "ssh": ssh,
            "delete": delete}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  p.add_argument("command", choices=sorted(COMMANDS))
  p.add_argument("--name", required=True, help="TPU VM / queued resource name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument("--accelerator", default="v4-32", help="e.g. v4-3072 = 1536 v4 chips")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
  p.add_argument("--queued", action="store_true", help="use queued resources (large slices)")
  p.add_argument("--config", default="experiments/configs/flamingo_80b.py")
  p.add_argument("--workdir", default="")
  p.add_argument("--worker", default="0")
  p.add_argument("--lines", type=int, default=100)
  p.add_argument("--log", default=LOG, help="the run's log file on each worker")
  p.add_argument("--detach", action="store_true",
                 help="run: start in the background and return at once")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  return p


def commands(argv) -> tuple[list[list[str]], bool]:
  """Arguments after `--` are flags for the trainer (`run`)."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser().parse_args(argv[:split])
  args.overrides = argv[split + 1:]
  return COMMANDS[args.command](args), args.dry_run


def main(argv=None):
  cmds, dry_run = commands(sys.argv[1:] if argv is None else argv)
  for cmd in cmds:
    print(shlex.join(cmd), flush=True)
    if not dry_run:
      status = subprocess.run(cmd, check=False).returncode
      if status:
        sys.exit(status)            # the run's (or gcloud's) exit status


if __name__ == "__main__":
  main()
