"""One run per workdir, one builder per dataset (flamingo_jax/lease.py): a live holder refuses
the next start in one line, a dead or silent one does not block it for longer than its lease,
and a holder whose lease was taken over stops. Tested with leases in this process, with real
trainer processes (start, refuse, SIGSTOP until it expires, start, SIGKILL, start) and with a
dataset build that a second process waits for."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, config_path
from flamingo_jax.data import builders
from flamingo_jax.data import prepare
from flamingo_jax import lease as lease_lib
from train_helpers import env, losses, stream_subset_config_file, train_command


def test_a_live_holder_refuses_the_next_start_and_release_frees_it(tmp_path):
  first = lease_lib.Lease(tmp_path / "run" / "lease.json", what="training run", ttl=30)
  first.acquire()
  record = json.loads((tmp_path / "run" / "lease.json").read_text())
  assert record["pid"] == os.getpid() and record["ttl"] == 30 and record["what"] == "training run"
  second = lease_lib.Lease(tmp_path / "run" / "lease.json", what="training run")
  with pytest.raises(lease_lib.LeaseHeldError,
                     match=rf"run is held by another training run: host \S+, pid {os.getpid()}, "
                           r"started .* UTC \(renewed 0 s ago, expires after 30 s"):
    second.acquire()
  first.release()
  assert not (tmp_path / "run" / "lease.json").exists()
  second.acquire()
  second.release()


def _foreign_record(ttl: float) -> dict:
  now = time.time()
  return {"what": "training run", "host": "another-host", "boot_id": "x", "pid": 1,
          "started": now - 100, "renewed": now, "ttl": ttl, "token": "theirs"}


def test_a_silent_holder_on_another_host_blocks_until_its_lease_expires(tmp_path):
  path = tmp_path / "lease.json"
  path.write_text(json.dumps(_foreign_record(ttl=1.5)))
  lease = lease_lib.Lease(path, what="training run")
  with pytest.raises(lease_lib.LeaseHeldError, match="host another-host, pid 1"):
    lease.acquire()
  time.sleep(1.6)
  lease.acquire()                                     # expired: taken over
  assert json.loads(path.read_text())["token"] == lease.token
  lease.release()


def test_a_dead_holder_on_this_machine_does_not_block_at_all(tmp_path):
  sleeper = subprocess.Popen(["sleep", "60"])
  path = tmp_path / "lease.json"
  holder = lease_lib.Lease(path, what="training run", ttl=3600)
  # Its record as the sleeping process would have written it.
  record = dict(holder.record, pid=sleeper.pid, pid_start=lease_lib._process_start(sleeper.pid),  # pylint: disable=protected-access
                token="sleeper")
  path.write_text(json.dumps(record))
  with pytest.raises(lease_lib.LeaseHeldError, match=f"pid {sleeper.pid}"):
    holder.acquire()
  sleeper.kill()
  sleeper.wait()
  holder.acquire()                                    # no waiting for the hour-long ttl
  holder.release()
  # A reused pid (same number, another start time) is not the holder either.
  path.write_text(json.dumps(dict(record, pid=os.getpid(), pid_start="1")))
  assert lease_lib.expired(json.loads(path.read_text()))


def test_a_holder_whose_lease_was_taken_over_knows_it(tmp_path):
  path = tmp_path / "lease.json"
  lease = lease_lib.Lease(path, what="training run", ttl=0.4)
  lease.acquire()
  lease.renew()                                       # still ours
  path.write_text(json.dumps(_foreign_record(ttl=60)))
  deadline = time.time() + 5
  while not lease.lost and time.time() < deadline:     # the renewal thread notices
    time.sleep(0.05)
  assert lease.lost
  with pytest.raises(lease_lib.LeaseLostError, match="taken over"):
    lease.check()
  lease.release()
  assert json.loads(path.read_text())["token"] == "theirs"   # not removed: not ours


def test_remote_starters_at_the_same_moment_leave_one_holder(tmp_path):
  """Without a shared lock (gs://): write, settle, read back; the last writer wins."""
  path = tmp_path / "lease.json"
  leases = [lease_lib.Lease(path, what="training run", settle=0.3) for _ in range(4)]
  for lease in leases:
    lease.local = False                               # the remote protocol, on this disk
  outcome = {}

  def start(i):
    try:
      leases[i].acquire()
      outcome[i] = "held"
    except lease_lib.LeaseHeldError:
      outcome[i] = "refused"
  threads = [threading.Thread(target=start, args=(i,)) for i in range(len(leases))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(outcome.values()) == ["held"] + ["refused"] * (len(leases) - 1)
  winner = next(i for i, v in outcome.items() if v == "held")
  assert json.loads(path.read_text())["token"] == leases[winner].token
  leases[winner].release()


def _start(command):
  return subprocess.Popen(command, env=env(1), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_rows(workdir, rows, proc, timeout=600):
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= rows:
      return
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.1)
  raise AssertionError("the run logged too few steps")


def _refused(command, holder_pid):
  result = subprocess.run(command, env=env(1), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 1, result.stderr[-3000:]
  assert len(lines) == 1 and "is held by another training run: host" in lines[0], lines
  assert f"pid {holder_pid}," in lines[0], lines


@pytest.mark.slow
def test_trainers_on_one_workdir_start_refuse_expire_and_resume(tmp_path):
  """Real trainers (lease 10 s): A runs; B is refused naming A. A is stopped (SIGSTOP: alive
  but silent, as a lost host): B is refused until A's lease expires, then starts. A, woken,
  finds its lease taken and stops without saving. B is killed (SIGKILL); C starts at once
  (its holder is dead on this machine) and finishes the run, each step logged once."""
  config = stream_subset_config_file(tmp_path, keep=("m3w",))
  workdir, data = str(tmp_path / "run"), str(tmp_path / "data")
  ttl = 10.0
  command = train_command(workdir, data, 400, f"--config.train.lease_seconds={ttl}",
                          "--config.train.checkpoint_every=2", config=config)
  a = _start(command)
  _wait_for_rows(workdir, 2, a)
  _refused(command, a.pid)
  a.send_signal(signal.SIGSTOP)
  stopped = time.time()
  _refused(command, a.pid)                            # silent, not yet expired
  time.sleep(max(0.0, stopped + ttl + 0.5 - time.time()))
  b = _start(command)
  lease_file = os.path.join(workdir, "lease.json")
  deadline = time.time() + 300
  while time.time() < deadline and json.loads(open(lease_file).read())["pid"] != b.pid:
    assert b.poll() is None, b.communicate()
    time.sleep(0.1)
  assert json.loads(open(lease_file).read())["pid"] == b.pid
  a.send_signal(signal.SIGCONT)
  _, a_err = a.communicate(timeout=300)
  assert a.returncode == 1
  assert "was taken over by another training run" in a_err and "without saving" in a_err
  b.kill()                                            # SIGKILL: no release
  b.wait()
  end = max(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) + 3
  short = [arg for arg in command if not arg.startswith("--config.train.steps")]
  c = subprocess.run(short + [f"--config.train.steps={end}"], env=env(1), cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert c.returncode == 0, c.stderr[-3000:]
  assert sorted(losses(workdir)) == list(range(1, end + 1))   # each step once
  assert not os.path.exists(os.path.join(workdir, "lease.json"))


_BUILD = """
import sys
from flamingo_jax import config_base
from flamingo_jax.data import prepare
config = config_base.load_config(sys.argv[1])
config.data.data_dir = sys.argv[2]
config.data.synthetic_examples = 16
builder = prepare.prepare_stream(config, "align")
print("examples", len(builder.as_data_source(split="train")), flush=True)
"""


def test_a_second_builder_waits_for_the_first_and_uses_its_dataset(tmp_path, tiny_config):
  """While one process holds a dataset's build lease, another waits (one line saying for
  whom), then reads the finished dataset without building it; a build says what it builds
  and never that it downloads."""
  data = str(tmp_path / "data")
  config = tiny_config.copy_and_resolve_references()
  config.data.data_dir, config.data.synthetic_examples = data, 16
  build = lease_lib.Lease(os.path.join(data, "align", "build.lease.json"), what="dataset build")
  build.acquire()
  waiter = subprocess.Popen([sys.executable, "-c", _BUILD, config_path("tiny"), data],
                            env=env(1), cwd=REPO, stdout=subprocess.PIPE, text=True)
  first_line = waiter.stdout.readline()
  assert first_line.startswith("waiting for the dataset of stream align: ") and \
      "held by another dataset build: host" in first_line and f"pid {os.getpid()}," in first_line
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):         # the first builder's work, while it holds
      raw = prepare.synthetic_raw_dir(config, "align")
      prepare.write_synthetic("image_text", raw, 16, seed=1,
                                spec=config.data.streams.align, data=config.data)
      builders.prepare("image_text", raw, os.path.join(data, "align"))
  finally:
    build.release()
  rest = waiter.communicate(timeout=300)[0]
  assert waiter.returncode == 0
  assert rest.splitlines() == ["examples 16"]          # read, not built again
  printed = out.getvalue()
  assert f"building the image_text dataset {os.path.join(data, 'align')}" in printed
  assert "Downloading" not in printed and "downloaded" not in printed
  assert not [p for p in os.listdir(os.path.join(data, "raw")) if ".tmp" in p]
