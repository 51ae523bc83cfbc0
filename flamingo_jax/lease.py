"""One holder at a time for a directory: a lease file that its holder renews while it lives.

    lease = Lease(epath.Path(workdir) / "lease.json", what="training run", ttl=60.0)
    lease.acquire()      # LeaseHeldError at once, naming the holder, if a live one holds it
    ...                  # a daemon thread renews it every ttl / 4 seconds
    lease.check()        # LeaseLostError if another starter took it over (we stalled > ttl)
    lease.release()

The trainer holds one on its workdir (process 0), and dataset builds one on each dataset they
build (data/pipeline.py), so that two trainers never share a workdir and nobody reads a
half-built dataset. Readers (generate, evaluate, probes) take none.

Who is alive. The record names the holder's host, pid and start time, and when it was last
renewed. A lease not renewed for `ttl` seconds has expired: a holder that died (SIGKILL, a lost
host) blocks the next start for at most `ttl` seconds after its last renewal. A holder on this
same machine (same host name and boot id) whose process is gone is dead at once. Expiry compares
the holder's clock with the reader's: hosts sharing a workdir keep their clocks in step (NTP).

How it is taken. Local disk: the read-and-write is one critical section under `flock` on a
folder, so two starters cannot both win. Elsewhere (gs://, through etils epath): the
starter writes its record, waits `settle` seconds and reads it back; the last writer wins and
the other is refused (writes of a record take well under `settle`).
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging
from etils import epath

DEFAULT_TTL = 60.0          # seconds without renewal after which a lease has expired
REMOTE_SETTLE = 2.0         # seconds a remote starter waits before reading its record back


class LeaseHeldError(RuntimeError):
  """A live holder has the lease; the message names it."""


class LeaseLostError(RuntimeError):
  """Our lease was taken over (we were not renewing it for longer than its ttl)."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _process_start(pid: int) -> str:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive_here(record: dict) -> bool | None:
  """Whether the holder's process is alive, when it runs on this machine; else None."""
  if record.get("host") != socket.gethostname() or record.get("boot_id") != _boot_id():
    return None
  pid = int(record.get("pid", -1))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass                                   # alive, owned by someone else
  started = record.get("pid_start")
  return not started or started == _process_start(pid)


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M:%S UTC")


def describe(record: dict, now: float | None = None) -> str:
  """'host H, pid P, started T (renewed Ns ago)': who holds a lease, for messages."""
  now = time.time() if now is None else now
  return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started "
          f"{_utc(float(record.get('started', 0)))} (renewed {now - float(record.get('renewed', 0)):.0f} s "
          f"ago, expires after {float(record.get('ttl', 0)):.0f} s without renewal)")


def expired(record: dict, now: float | None = None) -> bool:
  now = time.time() if now is None else now
  if _alive_here(record) is False:
    return True
  return now - float(record.get("renewed", 0)) > float(record.get("ttl", 0))


class Lease:
  """A lease on `path` (a file; its folder is made). `what` names the holder's kind in
  messages ("training run", "dataset build")."""

  def __init__(self, path, *, what: str, ttl: float = DEFAULT_TTL, settle: float | None = None):
    if ttl <= 0:
      raise ValueError(f"lease ttl is {ttl}; expected seconds > 0")
    self.path = epath.Path(path)
    self.what, self.ttl = what, float(ttl)
    self.local = "://" not in os.fspath(path)
    self.settle = (0.0 if self.local else REMOTE_SETTLE) if settle is None else float(settle)
    self.token = uuid.uuid4().hex
    now = time.time()
    self.record = {"what": what, "host": socket.gethostname(), "boot_id": _boot_id(),
                   "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                   "started": now, "renewed": now, "ttl": self.ttl, "token": self.token,
                   "command": " ".join(sys.argv)[:500]}
    self.held = False
    self.lost = False
    self._stop = threading.Event()
    self._thread = None

  # -- storage -------------------------------------------------------------------------------

  @contextlib.contextmanager
  def _critical(self):
    """The read-and-write of the record, exclusive among this disk's processes (local)."""
    if not self.local:
      yield
      return
    folder = os.open(os.fspath(self.path.parent), os.O_RDONLY)   # flock on the folder itself
    try:
      fcntl.flock(folder, fcntl.LOCK_EX)
      yield
    finally:
      os.close(folder)                                            # closing releases the lock

  def read(self) -> dict | None:
    """The stored record, or None (no lease, or an unreadable one: a torn write)."""
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return None

  def _write(self) -> None:
    tmp = self.path.parent / f"{self.path.name}.{self.token}.tmp"
    tmp.write_text(json.dumps(self.record, indent=1))
    tmp.replace(self.path)

  # -- holding -------------------------------------------------------------------------------

  def acquire(self) -> None:
    """Takes the lease, or raises LeaseHeldError naming its live holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self._critical():
      current = self.read()
      if current is not None and current.get("token") != self.token and not expired(current):
        raise LeaseHeldError(f"{self.path.parent} is held by another {current.get('what', 'holder')}: "
                             f"{describe(current)}")
      if current is not None and current.get("token") != self.token:
        logging.warning("taking over the expired lease of %s", describe(current))
      self.record["renewed"] = time.time()
      self._write()
    if self.settle:
      time.sleep(self.settle)
      current = self.read()
      if current is None or current.get("token") != self.token:
        raise LeaseHeldError(f"{self.path.parent} was taken at the same moment by another "
                             f"{(current or {}).get('what', 'holder')}: "
                             f"{describe(current or {})}")
    self.held = True
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
    self._thread.start()

  def _renew_loop(self) -> None:
    while not self._stop.wait(self.ttl / 4):
      try:
        self.renew()
      except LeaseLostError as e:
        logging.error("%s", e)
        return
      except OSError as e:                 # a storage hiccup: try again at the next beat
        logging.warning("could not renew the lease on %s: %s", self.path, e)

  def renew(self) -> None:
    with self._critical():
      current = self.read()
      if current is not None and current.get("token") != self.token:
        self.lost = True
        raise LeaseLostError(f"the lease on {self.path.parent} was taken over by "
                             f"{describe(current)}")
      self.record["renewed"] = time.time()
      self._write()

  def verify(self) -> bool:
    """Reads the record now: whether it is still ours (sets `lost` when it is not). The
    holder calls it before it writes, since the renewal thread looks only every ttl / 4."""
    if self.held and not self.lost:
      current = self.read()
      self.lost = current is not None and current.get("token") != self.token
    return not self.lost

  def check(self) -> None:
    """Raises LeaseLostError once another starter has taken the lease over."""
    if not self.verify():
      raise LeaseLostError(f"the lease on {self.path.parent} was taken over by another "
                           f"{self.what} (this one stalled for more than {self.ttl:.0f} s); "
                           f"stopping without writing more")

  def release(self) -> None:
    """Stops renewing and removes the record if it is still ours."""
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self.held = False
    with self._critical():
      current = self.read()
      if current is not None and current.get("token") == self.token:
        self.path.unlink()

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
