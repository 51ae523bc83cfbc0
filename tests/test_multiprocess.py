"""Several processes (gloo on CPU) train like one: model groups spanning processes, the
input placement from the mesh, preemption of every process and the resume (docs/design.md §3, §7).

In a file of their own so that the test runner gives them a worker while the other files
run: each 4-process launch saturates both cores for a few minutes."""

import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import REPO
from flamingo_jax.training import checkpointing
from train_helpers import env, losses, stream_subset_config_file, train, train_command


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, data, config, steps, processes, devices, mesh):
  port = _free_port()
  return [subprocess.Popen(
      train_command(workdir, data, steps, f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={processes}", f"--process_id={i}", *mesh, config=config),
      env=env(devices), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(processes)]


def _finish(procs):
  outputs = [p.communicate(timeout=900)[0].decode(errors="replace") for p in procs]
  assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-2000:] for o in outputs)


def _pipeline_state(workdir, step):
  ckpt = checkpointing.Checkpointer(workdir, keep=100)
  try:
    return ckpt.input_state(step)
  finally:
    ckpt.close()


def _compare(one, four, steps):
  for key in ("loss", "grad_norm"):
    expected, got = losses(one, key), losses(four, key)
    assert sorted(got) == list(range(1, steps + 1))
    for step in expected:
      assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (key, step, got,
                                                                             expected)


@pytest.mark.slow
def test_four_processes_match_one_process_and_resume_after_sigterm(tmp_path):
  """4 processes x 2 devices (gloo) vs 1 process x 8 devices. With data 2 x model 4 every
  model group spans two processes, which must feed it the same rows (and each shard's input
  state is merged from two processes); that run is stopped by SIGTERM on every process, as a
  pod preemption does, and resumed. Data 4 x model 2 runs straight through. Losses and
  gradient norms of every step equal the 1-process run's within 1e-5, and the stored input
  positions equal exactly.

  One 1-process reference serves both meshes: without skipped examples, step s of any data
  axis reads positions [s·B, (s+1)·B) (shard d of D takes d, d + D, …), only in another row
  order. (Each 4-process launch compiles the step in 3 processes without the persistent
  cache, which only process 0 writes: the launches are kept to three.)"""
  steps, data = 5, str(tmp_path / "data")
  config = stream_subset_config_file(tmp_path, keep=("m3w",))
  spanning = ("--config.mesh.data=2", "--config.mesh.model=4")
  one = str(tmp_path / "one")
  train(train_command(one, data, steps, *spanning, config=config), devices=8)

  four = str(tmp_path / "four_2x4")
  procs = _launch(four, data, config, steps, 4, 2, spanning)
  metrics = os.path.join(four, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
      for p in procs:
        p.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _finish(procs)                                   # SIGTERM: every process saves and exits 0
  stopped_at = max(losses(four))
  assert 2 <= stopped_at < steps, stopped_at
  assert os.listdir(os.path.join(four, "checkpoints")) == [str(stopped_at)]
  _finish(_launch(four, data, config, steps, 4, 2, spanning))
  _compare(one, four, steps)
  # Every data shard's position, merged from the 4 processes, is the 1-process run's.
  assert _pipeline_state(four, steps) == _pipeline_state(one, steps)

  four = str(tmp_path / "four_4x2")
  _finish(_launch(four, data, config, steps, 4, 2,
                  ("--config.mesh.data=4", "--config.mesh.model=2")))
  _compare(one, four, steps)
  state = _pipeline_state(four, steps)
  assert state["num_shards"] == 4
  assert {shard["cursor"] for shard in state["streams"]["m3w"].values()} == {steps * 8 // 4}
