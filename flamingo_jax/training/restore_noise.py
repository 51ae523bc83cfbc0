"""Quiet after a failed orbax restore: only the one-line warning that says what failed.

A failed restore (a damaged checkpoint) leaves orbax's other reads running; each later
reports its error on its own (one traceback per array, hundreds of lines): through asyncio's
logger, sys.unraisablehook, or a "coroutine ... was never awaited" warning. `install()` drops
exactly those echoes; checkpointing.py adds each damaged directory to `damaged_directories`.
"""

import logging as logging_lib
import sys
import warnings

_installed = False
# Directories a restore failed on: echoes of reads from them are dropped (below).
damaged_directories: set[str] = set()
# orbax's read coroutines, abandoned when another read of the same restore fails.
_ORBAX_READS = ("_read_shard", "_read_array_index_and_device_put", "_read_and_create_array",
                "async_deserialize")


def _mentions_failed_read(text: str) -> bool:
  return "orbax" in text or any(d in text for d in damaged_directories)


def _is_read_failure_echo(error: BaseException | None, source: object = None) -> bool:
  """An echo of a failed orbax read: the closed event loop its late TensorStore callbacks
  hit, or an exception left in one of orbax's coroutines or on a damaged directory."""
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  code = getattr(source, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  return error is not None and damaged_directories and _mentions_failed_read(str(error))


def _orbax_in_traceback(error: BaseException | None) -> bool:
  while error is not None:
    tb = error.__traceback__
    while tb is not None:
      if "orbax" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    error = error.__cause__ or error.__context__
  return False


class _DropReadFailureTasks(logging_lib.Filter):
  """asyncio's "<Task | _GatheringFuture | Future> exception was never retrieved" for the reads
  of a failed restore: an orbax coroutine or traceback, or a TensorStore error that names a
  damaged directory."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    message = record.getMessage()
    if "exception was never retrieved" not in message.split("\n", 1)[0]:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (_mentions_failed_read(message) or _orbax_in_traceback(error)
                or _is_read_failure_echo(error))


def install() -> None:
  """Drops the echoes (once per process)."""
  global _installed
  if _installed:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_read_failure_echo(unraisable.exc_value, unraisable.object):
      previous(unraisable)
  sys.unraisablehook = hook
  logging_lib.getLogger("asyncio").addFilter(_DropReadFailureTasks())
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message=rf"coroutine '({'|'.join(_ORBAX_READS)})' was never awaited")
  _installed = True
