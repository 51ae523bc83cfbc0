r"""Benchmark the input pipeline: examples/s per stream (a benchmark, not a test).

Each stream runs alone through the whole path (TFDS ArrayRecord read, JPEG decode, resize and
pad, tokenisation, batching) on synthetic sources written at --source_image_size pixels.
"busy_cores" is the CPU time of this process and its worker processes over the wall time.

  python -m flamingo_jax.tools.bench_input --config=experiments/configs/tiny.py \
      --image_size=320 --source_image_size=480 --batches=10 --workers=2
"""

import json
import os
import shutil
import tempfile
import time

from absl import flags
from absl import logging

from flamingo_jax import cli
from flamingo_jax.data import pipeline
from flamingo_jax.data import prepare
from flamingo_jax import host

_CONFIG = cli.define_config()
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 320, "Model input size (the paper: 320).")
_SOURCE_SIZE = flags.DEFINE_integer("source_image_size", 480, "Pixels of the synthetic images.")
_BATCHES = flags.DEFINE_integer("batches", 10, "Timed batches per stream (after one warm-up).")
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Synthetic examples per stream.")
_WORKERS = flags.DEFINE_integer("workers", -1, "grain worker processes (0: threads of this "
                                "process; -1: one per CPU, at most 16).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where to build the data (default: a temp dir).")


def _cpu_seconds(root: int) -> float:
  """User + system CPU seconds of process `root` and its live descendants (Linux /proc)."""
  parent, ticks = {}, {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()      # after "pid (comm)"
    except OSError:                                      # exited meanwhile
      continue
    parent[int(entry)] = int(fields[1])
    ticks[int(entry)] = int(fields[11]) + int(fields[12])     # utime, stime
  def in_tree(pid):
    while pid > 1:
      if pid == root:
        return True
      pid = parent.get(pid, 0)
    return False
  return sum(t for pid, t in ticks.items() if in_tree(pid)) / os.sysconf("SC_CLK_TCK")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # TFDS logs every file it writes at INFO
  config = _CONFIG.value
  config.model.image_size = _IMAGE_SIZE.value
  config.data.synthetic_image_size = _SOURCE_SIZE.value
  config.data.synthetic_examples = _EXAMPLES.value
  config.data.workers = _WORKERS.value
  config.data.data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="bench_input_")
  for spec in config.data.streams.values():
    spec.manual_dir = "synthetic"
  try:
    report = _measure(config)
  finally:
    if not _DATA_DIR.value:             # the sources of large images run to gigabytes
      shutil.rmtree(config.data.data_dir, ignore_errors=True)
  print(json.dumps(report))


def _measure(config) -> dict:
  report = {"image_size": _IMAGE_SIZE.value, "source_image_size": _SOURCE_SIZE.value,
            "cpus": os.cpu_count(), "workers": _WORKERS.value, "host": host.describe(),
            "streams": {}}
  for name in list(config.data.streams):
    single = config.copy_and_resolve_references()
    single.data.streams = {name: config.data.streams[name].to_dict()}
    prepare.prepare_stream(single, name)
    pipe = pipeline.InputPipeline(single, prefetch=1)
    next(pipe)                                              # warm-up (starts the workers)
    start, cpu_start = time.perf_counter(), _cpu_seconds(os.getpid())
    for _ in range(_BATCHES.value):
      next(pipe)
    seconds = time.perf_counter() - start
    busy = (_cpu_seconds(os.getpid()) - cpu_start) / seconds
    pipe.close()
    spec = config.data.streams[name]
    examples = _BATCHES.value * spec.batch_size
    frames = spec.max_media * spec.frames           # frame slots per example (some padding)
    report["streams"][name] = {
        "examples_per_sec": round(examples / seconds, 1),
        "frame_slots_per_sec": round(examples * frames / seconds, 1),
        "busy_cores": round(busy, 2),
        "batch_size": spec.batch_size, "frame_slots_per_example": frames}
    print(f"{name:6s} {examples / seconds:8.1f} examples/s  {examples * frames / seconds:8.1f} "
          f"frame slots/s  {busy:4.2f} busy cores  (batch {spec.batch_size}, {spec.max_media} "
          f"x {spec.frames} frames of {_IMAGE_SIZE.value} px)", flush=True)
  return report


if __name__ == "__main__":
  cli.run(main)
