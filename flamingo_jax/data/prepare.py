"""Each stream's prepared TFDS dataset: checked, built once (synthetic raw files first when
`manual_dir` is "synthetic"), shared safely between runs.

    DATA_DIR/<stream>/                 the stream's TFDS dataset (builders.py)
    DATA_DIR/<stream>/build.lease.json held while one run builds it; others wait
    DATA_DIR/raw/<stream>/             a synthetic stream's raw files (synthetic.py)
"""

import os
import shutil
import time
from typing import Any

from flamingo_jax import lease as lease_lib
from flamingo_jax.data import builders
from flamingo_jax.data import sources
from flamingo_jax.data import synthetic

SYNTHETIC = "synthetic"       # stream.manual_dir value: generate the raw files (synthetic.py)


def synthetic_raw_dir(config: Any, name: str) -> str:
  return os.path.join(config.data.data_dir, "raw", name)


def write_synthetic(kind: str, directory: str, count: int, seed: int, spec: Any,
                     data: Any) -> None:
  """The raw files of a synthetic stream, written into a temporary folder and renamed: the
  folder is whole or absent."""
  complete = os.path.join(directory, "_COMPLETE")
  if os.path.exists(complete):
    return
  shutil.rmtree(directory, ignore_errors=True)       # left by a build that died (older code)
  size = int(data.synthetic_image_size)
  partial = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  if kind == "interleaved":
    synthetic.write_interleaved(partial, count, seed, size=size,
                                in_context=float(data.synthetic_in_context),
                                pairs=tuple(data.synthetic_pairs),
                                naming=str(data.synthetic_naming))
  elif kind == "image_text":
    synthetic.write_image_text(partial, count, seed, size=size)
  else:
    synthetic.write_video_text(partial, count, seed, frames=max(8, spec.frames),
                               fps=float(spec.get("frame_rate", 1.0)), size=size)
  open(os.path.join(partial, "_COMPLETE"), "w").close()
  os.rename(partial, directory)


def _max_fps(spec: Any) -> float:
  return float(spec.get("frame_rate", 1.0)) if spec.source == "video_text" else 0.0


def _dataset_dir(config: Any, name: str) -> str:
  return os.path.join(config.data.data_dir, name)


def check_stream_sources(config: Any, names=None) -> None:
  """The streams' raw folders (all of them by default), checked before any dataset is
  built: a stream whose dataset is not built yet needs a manual_dir that exists and holds
  its files (one-line errors)."""
  if not config.data.data_dir:
    raise ValueError("config.data.data_dir is empty: where prepared TFDS datasets live")
  for name in config.data.streams if names is None else names:
    spec = config.data.streams[name]
    if spec.manual_dir == SYNTHETIC:
      continue
    if not spec.manual_dir:
      raise ValueError(f"config.data.streams.{name}.manual_dir is empty: the folder of raw "
                       f"{spec.source} files (sources.py), or {SYNTHETIC!r}")
    if builders.is_prepared(builders.make_builder(spec.source, _dataset_dir(config, name))):
      continue
    try:
      sources.source_files(spec.source, spec.manual_dir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"stream {name}: {e}") from None


def prepare_stream(config: Any, name: str):
  """Builds stream `name`'s TFDS dataset (and its synthetic raw files) unless present.

  Several runs may share a data_dir: the builder holds the dataset's lease while it builds,
  and another one waits for it and then uses its result (a dataset is never read half-built:
  builders.prepare renames it into place whole)."""
  spec = config.data.streams[name]
  check_stream_sources(config, [name])
  dataset_dir = _dataset_dir(config, name)
  builder = builders.make_builder(spec.source, dataset_dir)
  if builders.is_prepared(builder):
    return builders.prepare(spec.source, "", dataset_dir, max_fps=_max_fps(spec))
  build = lease_lib.Lease(os.path.join(dataset_dir, "build.lease.json"), what="dataset build")
  waiting = False
  while True:
    try:
      build.acquire()
      break
    except lease_lib.LeaseHeldError as e:
      if not waiting:
        print(f"waiting for the dataset of stream {name}: {e}", flush=True)
        waiting = True
      time.sleep(1.0)
      if builders.is_prepared(builder):                 # the other builder finished
        return builders.prepare(spec.source, "", dataset_dir, max_fps=_max_fps(spec))
  try:
    manual_dir = spec.manual_dir
    if manual_dir == SYNTHETIC:
      manual_dir = synthetic_raw_dir(config, name)
      index = list(config.data.streams).index(name)
      write_synthetic(spec.source, manual_dir, config.data.synthetic_examples,
                       seed=1000 * config.seed + index, spec=spec, data=config.data)
    return builders.prepare(spec.source, manual_dir, dataset_dir, max_fps=_max_fps(spec))
  finally:
    build.release()


def check_stored_frame_rate(builder, spec: Any, name: str) -> None:
  """A video dataset built for a lower frame rate cannot give this stream's frames."""
  stored = float(builder.info.metadata.get("max_fps", 0.0))
  wanted = float(spec.get("frame_rate", 1.0))
  if stored and wanted > stored + 1e-9:
    raise ValueError(f"stream {name}: its dataset {builder.data_dir} keeps frames at {stored:g} "
                     f"fps, but frame_rate is {wanted:g}: build it again (move that folder "
                     f"away) or use frame_rate <= {stored:g}")
