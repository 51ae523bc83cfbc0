"""What every command line shares: misuse is one line on stderr (exit 2), not a traceback.

    if __name__ == "__main__":
      cli.run(main)            # instead of absl's app.run(main)

Covers what absl leaves as tracebacks: a `--config` file that does not load, and an
override of a key the config does not have (`--config.train.stepz=3`, with ml_collections'
"did you mean" suggestion). Flag values of the wrong type are absl's own one-line error.
"""

import sys
import time

from absl import app
from absl import flags


def _innermost_message(error: BaseException) -> str:
  """ml_collections wraps KeyError('key\\nDid you mean …') in AttributeError(KeyError(…))."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _without_traceback(message: str) -> str:
  """ml_collections puts the config file's whole traceback into its flag error: keep the flag
  and the exception's own last line ("flag --config=tiny.py:bogus: unknown config variant …")."""
  if "Traceback (most recent call last)" not in message:
    return message
  flag = message.splitlines()[0].split(": Error whilst parsing", 1)[0].rstrip(":")
  last = [line.strip() for line in message.splitlines() if line.strip()][-1]
  kind, _, text = last.partition(": ")
  return f"{flag}: {text if kind.isidentifier() and text else last}"


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_flag_names() -> list[str]:
  all_flags = flags.FLAGS._flags()         # pylint: disable=protected-access
  # Only flags given on the command line: an absent config flag raises on config_filename.
  return [name for name, flag in all_flags.items()
          if flag.present and hasattr(flag, "config_filename")]


def _override(argv: list[str], key: str) -> str:
  """The --config.… argument that names `key` (as a path component)."""
  for arg in argv:
    if arg.startswith("--") and "." in arg:
      path = arg[2:].split("=", 1)[0].split(".")
      if key in path[1:]:
        return arg
  return "--config.…"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, then each config flag's file loaded now, with one-line errors."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_without_traceback(str(e)))
  except (KeyError, AttributeError) as e:
    message = _innermost_message(e)
    key = message.split()[0].strip("'\"") if message else "?"
    suggestion = message[len(message.split()[0]):].strip() if message else ""
    _fail(f"{_override(argv, key)}: the config has no key {key!r}"
          f"{f' ({suggestion})' if suggestion else ''}")
  for name in _config_flag_names():
    flag = flags.FLAGS[name]
    if flag.value is None:
      continue
    try:
      flag.value.keys()                     # the config file is loaded lazily: load it here
    except Exception as e:  # pylint: disable=broad-except
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      _fail(f"--{name}={flag.config_filename}: {lines[-1] if lines else type(e).__name__}")
  return rest


def init_processes(coordinator: str, num_processes: int, process_id: int) -> None:
  """Several processes without a TPU (CPU: gloo collectives): jax.distributed before any
  computation. No-op without a coordinator."""
  if not coordinator:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def run(main) -> None:
  app.run(main, flags_parser=parse_flags)


class Progress:
  """`[label] done/total unit, rate, ETA` on stderr, one terminal line updated in place
  (long batch commands: generate, evaluate)."""

  def __init__(self, total: int, label: str, *, unit: str = "items", enabled: bool = True):
    self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
    self.done, self.start = 0, time.time()

  def update(self, count: int) -> None:
    self.done += count
    if not self.enabled:
      return
    rate = self.done / max(time.time() - self.start, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    end = "\n" if self.done >= self.total else ""
    print(f"\r[{self.label}] {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
          f"eta {eta:.0f}s", end=end, file=sys.stderr, flush=True)
