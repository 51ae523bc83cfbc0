"""The multi-stream, multi-host input pipeline: prepared TFDS datasets -> per-process batches.

    pipe = pipeline.InputPipeline(config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    batches = next(pipe)          # {stream: batch (DESIGN.md §4)}, this process's rows only
    state = pipe.state()          # JSON-able; pipe.restore(state) resumes exactly

Order. Stream s reads its split in epochs; epoch e visits the examples in the permutation
drawn from (seed, s, e); positions 0, 1, 2, ... run through epoch 0, then epoch 1, ... with
no seam. Process p of P takes positions p, p + P, p + 2P, ... (its k-th example is position
kP + p), so processes read disjoint examples that together cover the split, and each reads
only its own (by index, from ArrayRecord). Every random choice for an example (window,
p_next, leading space, frames, augmentation) comes from a generator seeded by
(seed, s, position), so an example does not depend on threads, on skips before it, or on
restarts. An example that fails here (e.g. an fps out of range in an older build) is counted and
the process moves to its next position.

State. Per stream: the process's cursor k and its skip counts. `restore` resumes exactly,
mid-epoch or across epochs. The state is per process (a restart must keep the process count).

Prefetch. A background thread fills a queue of `prefetch` batches; a thread pool decodes and
preprocesses the examples of a batch in parallel (PIL and numpy release the GIL).
"""

import collections
import concurrent.futures
import copy
import os
import queue
import threading
from typing import Any, Iterator

from absl import logging
import numpy as np

from flamingo_jax.data import builders
from flamingo_jax.data import preprocessing
from flamingo_jax.data import sources
from flamingo_jax.data import synthetic
from flamingo_jax.data import tokenizer as tok

SYNTHETIC = "synthetic"       # stream.manual_dir value: generate the raw files (synthetic.py)


def synthetic_raw_dir(config: Any, name: str) -> str:
  return os.path.join(config.data.data_dir, "raw", name)


def _write_synthetic(kind: str, directory: str, count: int, seed: int, spec: Any,
                     size: int) -> None:
  if os.path.exists(os.path.join(directory, "_COMPLETE")):
    return
  if kind == "interleaved":
    synthetic.write_interleaved(directory, count, seed, size=size)
  elif kind == "image_text":
    synthetic.write_image_text(directory, count, seed, size=size)
  else:
    synthetic.write_video_text(directory, count, seed, frames=max(8, spec.frames),
                               fps=float(spec.get("frame_rate", 1.0)), size=size)
  open(os.path.join(directory, "_COMPLETE"), "w").close()


def prepare_stream(config: Any, name: str):
  """Builds stream `name`'s TFDS dataset (and its synthetic raw files) unless present."""
  spec = config.data.streams[name]
  if not config.data.data_dir:
    raise ValueError("config.data.data_dir is empty: where prepared TFDS datasets live")
  manual_dir = spec.manual_dir
  if manual_dir == SYNTHETIC:
    manual_dir = synthetic_raw_dir(config, name)
    index = list(config.data.streams).index(name)
    _write_synthetic(spec.source, manual_dir, config.data.synthetic_examples,
                     seed=1000 * config.seed + index, spec=spec,
                     size=int(config.data.synthetic_image_size))
  elif not manual_dir:
    raise ValueError(f"config.data.streams.{name}.manual_dir is empty: the folder of raw "
                     f"{spec.source} files (sources.py), or {SYNTHETIC!r}")
  return builders.prepare(spec.source, manual_dir, os.path.join(config.data.data_dir, name))


class _Stream:
  """One stream of one process: reads, preprocesses and batches its examples."""

  def __init__(self, config: Any, name: str, tokenizer: tok.Tokenizer, process_index: int,
               process_count: int):
    self.name, self.spec = name, config.data.streams[name]
    self.index = list(config.data.streams).index(name)
    self.data = config.data
    self.seed, self.size = int(config.seed), int(config.model.image_size)
    self.tokenizer = tokenizer
    self.process_index, self.process_count = process_index, process_count
    if self.spec.batch_size % process_count:
      raise ValueError(f"stream {name}: batch_size {self.spec.batch_size} is not divisible "
                       f"by the process count {process_count}")
    self.local_batch = self.spec.batch_size // process_count
    builder = prepare_stream(config, name)
    self.source = builder.as_data_source(split="train")
    self.build_skipped = dict(builder.info.metadata.get("skipped", {}))
    self.num_examples = len(self.source)
    self._permutations = {}

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) > 2:
        self._permutations.pop(min(self._permutations))
      rng = np.random.default_rng([self.seed, self.index, epoch])
      self._permutations[epoch] = rng.permutation(self.num_examples)
    return self._permutations[epoch]

  def position(self, k: int) -> int:
    return k * self.process_count + self.process_index

  def example_index(self, k: int) -> int:
    epoch, i = divmod(self.position(k), self.num_examples)
    return int(self.permutation(epoch)[i])

  def example(self, k: int) -> dict:
    """This process's k-th example, preprocessed; raises sources.Skip."""
    raw = self.source[self.example_index(k)]
    rng = np.random.default_rng([self.seed, self.index, self.position(k)])
    return process_example(self.spec.source, raw, self.spec, self.data, self.tokenizer,
                           self.size, rng)


def _media(images: list[np.ndarray], n: int, t: int, size: int, data: Any,
           rng: np.random.Generator) -> np.ndarray:
  """len(images) items of t frames each -> uint8 [n, t, size, size, 3], zero-padded slots."""
  out = np.zeros((n, t, size, size, 3), np.uint8)
  for slot, frames in enumerate(images):
    # One draw per image or clip: the frames of a video flip and change colour together.
    flip = bool(data.augment.flip) and rng.random() < 0.5
    colors = preprocessing.color_factors(float(data.augment.color_jitter), rng)
    for f, frame in enumerate(frames):
      out[slot, f] = preprocessing.resize_and_pad(frame, size, flip=flip, colors=colors)
  return out


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def process_example(kind: str, raw: dict, spec: Any, data: Any, tokenizer: tok.Tokenizer,
                    size: int, rng: np.random.Generator) -> dict:
  """A stored example (builders.py features) -> one row of the batch schema."""
  n, t, length = int(spec.max_media), int(spec.frames), int(spec.max_tokens)
  if kind == "interleaved":
    p_next = rng.random() < float(data.p_next)
    seq = preprocessing.interleaved_tokens([_text(x) for x in raw["texts"]],
                                           [int(i) for i in raw["image_index"]],
                                           tokenizer.encode, p_next, tokenizer.special)
    tokens, kept = preprocessing.window(seq, length, n, rng, tokenizer.special.image)
    images = [[sources.decode_image(raw["images"][i])] for i in kept]
  else:
    leading = rng.random() < float(data.leading_space_prob)
    tokens = preprocessing.pair_tokens(_text(raw["text"]), tokenizer.encode, leading,
                                       tokenizer.special, max_tokens=length)
    if kind == "image_text":
      images = [[sources.decode_image(raw["image"])]]
    else:
      all_frames, fps = raw["frames"], float(raw["fps"])
      if not 0 < fps <= sources.MAX_FPS:      # NaN too (datasets built before the check)
        raise sources.Skip("invalid_field", f"fps {fps}")
      idx = preprocessing.frame_indices(len(all_frames), fps, t,
                                        float(spec.get("frame_rate", 1.0)), rng)
      images = [[sources.decode_image(all_frames[i]) for i in idx]]
  row = preprocessing.to_arrays(tokens, length, tokenizer.special)
  row["media"] = _media(images, n, t, size, data, rng)
  row["media_mask"] = np.arange(n) < len(images)
  return row


def load_tokenizer(config: Any):
  """config.data.tokenizer_path, checked against config.model's vocabulary and special ids."""
  tokenizer = tok.load(config.data.tokenizer_path)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} pieces, more "
                     f"than config.model.vocab_size={config.model.vocab_size}")
  model = config.model
  if (tokenizer.special.image, tokenizer.special.eoc) != (model.image_token_id, model.eoc_token_id):
    raise ValueError(f"tokenizer {tokenizer.path!r} puts <image>/<EOC> at ids "
                     f"{tokenizer.special.image}/{tokenizer.special.eoc} but config.model has "
                     f"image_token_id={model.image_token_id}, eoc_token_id={model.eoc_token_id}")
  return tokenizer


class InputPipeline(Iterator[dict]):
  """{stream: batch} of this process's rows, prefetched, deterministic and resumable."""

  def __init__(self, config: Any, process_index: int = 0, process_count: int = 1,
               prefetch: int | None = None, workers: int | None = None):
    self.config = config
    tokenizer = load_tokenizer(config)
    self.streams = {name: _Stream(config, name, tokenizer, process_index, process_count)
                    for name in config.data.streams}
    self._prefetch = int(prefetch if prefetch is not None else config.data.prefetch)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        workers or int(config.data.workers) or os.cpu_count() or 1)
    self._state = {name: {"cursor": 0, "skipped": {}} for name in self.streams}
    self._thread = None
    self._start()

  # -- producer ---------------------------------------------------------------------------

  def _batch(self, stream: _Stream, state: dict) -> dict:
    rows, k, skipped = [], state["cursor"], collections.Counter(state["skipped"])
    while len(rows) < stream.local_batch:
      want = stream.local_batch - len(rows)
      for result in self._pool.map(_try(stream.example), range(k, k + want)):
        if isinstance(result, sources.Skip):
          skipped[result.reason] += 1
        else:
          rows.append(result)
      k += want
      if k > 100 * stream.local_batch + state["cursor"] and not rows:
        raise ValueError(f"stream {stream.name}: {k - state['cursor']} examples in a row were "
                         f"skipped ({dict(skipped)}); check max_tokens and the source")
    state["cursor"], state["skipped"] = k, dict(skipped)
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

  def _produce(self, state: dict, out: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        batches = {name: self._batch(stream, state[name]) for name, stream in self.streams.items()}
        item = (batches, copy.deepcopy(state))
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
    except BaseException as e:   # surfaces in __next__
      out.put(e)

  def _start(self) -> None:
    self._queue = queue.Queue(maxsize=max(1, self._prefetch))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True, name="input",
                                    args=(copy.deepcopy(self._state), self._queue, self._stop))
    self._thread.start()

  def _halt(self) -> None:
    if self._thread is not None:
      self._stop.set()
      while self._thread.is_alive():
        try:
          self._queue.get(timeout=0.05)
        except queue.Empty:
          pass
      self._thread = None

  # -- consumer ---------------------------------------------------------------------------

  def __next__(self) -> dict:
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batches, self._state = item
    return batches

  def state(self) -> dict:
    """Where the next batch starts (JSON-able)."""
    return copy.deepcopy(self._state)

  def restore(self, state: dict) -> None:
    if set(state) != set(self.streams):
      raise ValueError(f"iterator state has streams {sorted(state)}, config {sorted(self.streams)}")
    self._halt()
    self._state = copy.deepcopy(state)
    self._start()

  def skipped(self) -> dict[str, dict[str, int]]:
    """Per stream: examples skipped when building (whole source) and here (this process)."""
    out = {}
    for name, stream in self.streams.items():
      counts = collections.Counter(stream.build_skipped)
      counts.update(self._state[name]["skipped"])
      out[name] = dict(counts)
    return out

  def close(self) -> None:
    self._halt()
    self._pool.shutdown(wait=False, cancel_futures=True)

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def _try(fn):
  def call(k):
    try:
      return fn(k)
    except sources.Skip as skip:
      return skip
  return call


def log_skipped(pipe: InputPipeline) -> None:
  for name, counts in pipe.skipped().items():
    if counts:
      logging.info("stream %s: skipped %s", name, counts)
