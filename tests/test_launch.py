"""launch/tpu.py and launch/sweep.py: the exact commands their --dry_run prints."""

import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO


def dry_run(script, *args):
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), "--dry_run", *args],
                       capture_output=True, text=True, check=True, cwd=REPO)
  return [shlex.split(line) for line in out.stdout.splitlines()]


POD = ["--name=fl80b", "--zone=us-central2-b", "--project=my-proj"]
ZONE = ["--zone=us-central2-b", "--project=my-proj"]


def test_tpu_create_queued_and_plain():
  assert dry_run("tpu.py", "create", *POD, "--accelerator=v4-3072", "--queued") == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "fl80b", "--node-id=fl80b",
      "--accelerator-type=v4-3072", "--runtime-version=tpu-ubuntu2204-base", *ZONE]]
  assert dry_run("tpu.py", "create", *POD, "--accelerator=v4-32") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "fl80b", "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base", *ZONE]]


def test_tpu_setup_ships_the_code_and_installs_pinned_jax_on_every_worker():
  archive, scp, install = dry_run("tpu.py", "setup", *POD)
  assert archive == ["git", "-C", REPO, "archive", "--format=tar.gz",
                     "--output=/tmp/flamingo_jax.tar.gz", "HEAD"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/flamingo_jax.tar.gz",
                 "fl80b:~/flamingo_jax.tar.gz", "--worker=all", *ZONE]
  assert install[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fl80b", "--worker=all"]
  assert install[7] == (
      "--command=mkdir -p ~/flamingo_jax && tar xzf ~/flamingo_jax.tar.gz -C ~/flamingo_jax "
      "&& cd ~/flamingo_jax && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip "
      "&& .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2' "
      "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html")


def test_tpu_run_logs_ssh_delete():
  (run,) = dry_run("tpu.py", "run", *POD, "--config=experiments/configs/flamingo_80b.py",
                   "--workdir=gs://b/runs/x", "--", "--config.train.steps=10")
  train = (".venv/bin/python -m flamingo_jax.train --config=experiments/configs/flamingo_80b.py "
           "--workdir=gs://b/runs/x --config.train.steps=10")
  # Attached by default: the command ends with the run, with the run's exit status.
  assert run == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fl80b", "--worker=all",
                 "--command=set -o pipefail && mkdir -p $(dirname ~/flamingo_train.log) && "
                 f"cd ~/flamingo_jax && {train} 2>&1 | tee ~/flamingo_train.log", *ZONE]
  (detached,) = dry_run("tpu.py", "run", *POD, "--config=experiments/configs/flamingo_80b.py",
                        "--workdir=gs://b/runs/x", "--detach", "--log=~/logs/x.log", "--",
                        "--config.train.steps=10")
  assert detached[-3] == ("--command=mkdir -p $(dirname ~/logs/x.log) && cd ~/flamingo_jax && "
                          f"nohup {train} > ~/logs/x.log 2>&1 &")
  assert dry_run("tpu.py", "logs", *POD) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "fl80b", "--worker=0",
      "--command=tail -n 100 ~/flamingo_train.log", *ZONE]]
  assert dry_run("tpu.py", "ssh", *POD, "--worker=3") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "fl80b", "--worker=3", *ZONE]]
  assert dry_run("tpu.py", "delete", *POD, "--queued") == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "fl80b", "--force", "--quiet",
      *ZONE]]


def test_tpu_run_needs_a_gcs_workdir():
  with pytest.raises(subprocess.CalledProcessError):
    dry_run("tpu.py", "run", *POD, "--workdir=runs/local")


def test_sweep_2x2_expands_to_4_local_runs():
  cmds = dry_run("sweep.py", "--config=experiments/configs/tiny.py", "--workdir=runs/sweep",
                 "--local", f"--python={sys.executable}")
  expected = []
  for lr in ("0.001", "0.0003"):
    for seed in ("0", "1"):
      name = f"optim.learning_rate={lr},seed={seed}"
      expected.append([sys.executable, "-m", "flamingo_jax.train",
                       "--config=experiments/configs/tiny.py", f"--workdir=runs/sweep/{name}",
                       f"--config.optim.learning_rate={lr}", f"--config.seed={seed}"])
  assert cmds == expected
  assert len({c[4] for c in cmds}) == 4


def test_sweep_on_a_pod_goes_through_tpu_run():
  cmds = dry_run("sweep.py", "--config=experiments/configs/tiny.py", "--workdir=gs://b/sw",
                 "--tpu=pod1", "--zone=z1", "--python=python3")
  assert len(cmds) == 4
  assert cmds[0] == ["python3", "launch/tpu.py", "run", "--name=pod1", "--zone=z1",
                     "--config=experiments/configs/tiny.py",
                     "--workdir=gs://b/sw/optim.learning_rate=0.001,seed=0",
                     "--log=~/flamingo_logs/optim.learning_rate=0.001,seed=0.log", "--",
                     "--config.optim.learning_rate=0.001", "--config.seed=0"]
  # One after another (attached tpu.py runs, none --detach), each with its own log.
  assert not any("--detach" in c for c in cmds)
  assert len({c[7] for c in cmds}) == len({c[6] for c in cmds}) == 4


def test_a_sweep_runs_its_members_in_turn_and_reports_failures(tmp_path):
  """Real local runs of a stand-in trainer: sequential, a failure does not stop the rest."""
  sweep_config = tmp_path / "cfg.py"
  sweep_config.write_text("def get_sweep():\n  return [{'seed': 0}, {'seed': 1}, {'seed': 2}]\n")
  fake = tmp_path / "fake_python"
  # Records each start and end; fails for seed=1.
  order_file = tmp_path / "order"
  fake.write_text(f"#!/bin/sh\necho start $5 >> {order_file}\nsleep 0.2\n"
                  f"echo end $5 >> {order_file}\ncase \"$5\" in *seed=1) exit 3;; esac\n")
  fake.chmod(0o755)
  result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sweep.py"),
                           f"--config={sweep_config}", f"--workdir={tmp_path}/runs", "--local",
                           f"--python={fake}"], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 1
  assert "1 of 3 runs failed" in result.stderr and "run 2/3" in result.stderr
  order = (tmp_path / "order").read_text().split("\n")
  assert [line.split()[0] for line in order if line] == ["start", "end"] * 3
