"""The multi-stream, multi-host input pipeline: prepared TFDS datasets -> per-process batches.

    shards = sharding.assign_data_shards(sharding.process_grid(mesh))[jax.process_index()]
    pipe = pipeline.InputPipeline(config, shards=shards, num_shards=mesh.shape["data"])
    batches = next(pipe)          # {stream: batch (DESIGN.md §4)}: the rows of `shards`
    state = pipe.state()          # JSON-able; pipe.restore(state) resumes exactly

Order. Stream s reads its split in epochs; epoch e visits the examples in the permutation
drawn from (seed, s, e); positions 0, 1, 2, ... run through epoch 0, then epoch 1, ... with
no seam. The global batch is split into `num_shards` data shards (the mesh's 'data' axis);
shard d of D takes positions d, d + D, d + 2D, ... (its k-th example is position kD + d),
so the shards read disjoint examples that together cover the split. A process produces the
rows of the shards its devices hold, in shard order; processes holding the same shard (a
model group spanning hosts) produce the same rows with no communication, and the batch does
not depend on how many processes there are. Every random choice for an example (window,
p_next, leading space, frames, augmentation) comes from a generator seeded by
(seed, s, position), so an example does not depend on threads, on skips before it, or on
restarts. An example that fails here (e.g. an fps out of range in an older build) is counted and
the shard moves to its next position.

State. Per stream and data shard: the shard's cursor k and its skip counts. `restore` takes
the state of any set of shards that includes this pipeline's (the trainer stores the union
over processes), so a run may resume with another process count but not another number of
data shards.

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
                     data: Any) -> None:
  if os.path.exists(os.path.join(directory, "_COMPLETE")):
    return
  size = int(data.synthetic_image_size)
  if kind == "interleaved":
    synthetic.write_interleaved(directory, count, seed, size=size,
                                in_context=float(data.synthetic_in_context),
                                pairs=tuple(data.synthetic_pairs),
                                naming=str(data.synthetic_naming))
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
                     seed=1000 * config.seed + index, spec=spec, data=config.data)
  elif not manual_dir:
    raise ValueError(f"config.data.streams.{name}.manual_dir is empty: the folder of raw "
                     f"{spec.source} files (sources.py), or {SYNTHETIC!r}")
  return builders.prepare(spec.source, manual_dir, os.path.join(config.data.data_dir, name))


class _Stream:
  """One stream of one process: reads, preprocesses and batches the rows of its shards."""

  def __init__(self, config: Any, name: str, tokenizer: tok.Tokenizer, shards: tuple[int, ...],
               num_shards: int):
    self.name, self.spec = name, config.data.streams[name]
    self.index = list(config.data.streams).index(name)
    self.data = config.data
    self.seed, self.size = int(config.seed), int(config.model.image_size)
    self.tokenizer = tokenizer
    self.shards, self.num_shards = shards, num_shards
    if self.spec.batch_size % num_shards:
      raise ValueError(f"stream {name}: batch_size {self.spec.batch_size} is not divisible "
                       f"by the {num_shards} data shards (mesh data axis)")
    self.shard_batch = self.spec.batch_size // num_shards
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

  def position(self, shard: int, k: int) -> int:
    return k * self.num_shards + shard

  def example_index(self, shard: int, k: int) -> int:
    epoch, i = divmod(self.position(shard, k), self.num_examples)
    return int(self.permutation(epoch)[i])

  def example(self, shard: int, k: int) -> dict:
    """Shard `shard`'s k-th example, preprocessed; raises sources.Skip."""
    raw = self.source[self.example_index(shard, k)]
    rng = np.random.default_rng([self.seed, self.index, self.position(shard, k)])
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
    images = [[sources.decode_image(raw["images"][i], fit=size)] for i in kept]
  else:
    leading = rng.random() < float(data.leading_space_prob)
    tokens = preprocessing.pair_tokens(_text(raw["text"]), tokenizer.encode, leading,
                                       tokenizer.special, max_tokens=length)
    if kind == "image_text":
      images = [[sources.decode_image(raw["image"], fit=size)]]
    else:
      all_frames, fps = raw["frames"], float(raw["fps"])
      if not 0 < fps <= sources.MAX_FPS:      # NaN too (datasets built before the check)
        raise sources.Skip("invalid_field", f"fps {fps}")
      idx = preprocessing.frame_indices(len(all_frames), fps, t,
                                        float(spec.get("frame_rate", 1.0)), rng)
      images = [[sources.decode_image(all_frames[i], fit=size) for i in idx]]
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
  """{stream: batch} of the rows of this process's data shards, prefetched, deterministic and
  resumable. By default one shard: the whole global batch."""

  def __init__(self, config: Any, shards: tuple[int, ...] = (0,), num_shards: int = 1,
               prefetch: int | None = None, workers: int | None = None):
    shards = tuple(sorted(set(int(d) for d in shards)))
    if not shards or not all(0 <= d < num_shards for d in shards):
      raise ValueError(f"data shards {shards} are not a non-empty subset of 0..{num_shards - 1}")
    self.config, self.shards, self.num_shards = config, shards, int(num_shards)
    tokenizer = load_tokenizer(config)
    self.streams = {name: _Stream(config, name, tokenizer, shards, self.num_shards)
                    for name in config.data.streams}
    self._prefetch = int(prefetch if prefetch is not None else config.data.prefetch)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        workers or int(config.data.workers) or os.cpu_count() or 1)
    self._state = {"num_shards": self.num_shards,
                   "streams": {name: {str(d): {"cursor": 0, "skipped": {}} for d in shards}
                               for name in self.streams}}
    self._thread = None
    self._start()

  # -- producer ---------------------------------------------------------------------------

  def _batch(self, stream: _Stream, state: dict) -> dict:
    """The rows of `stream`'s shards, in shard order; advances `state` ({shard: cursor...})."""
    rows = {d: [] for d in stream.shards}
    start = {d: state[str(d)]["cursor"] for d in stream.shards}
    cursor = dict(start)
    skipped = {d: collections.Counter(state[str(d)]["skipped"]) for d in stream.shards}
    while True:
      work = [(d, k) for d in stream.shards
              for k in range(cursor[d], cursor[d] + stream.shard_batch - len(rows[d]))]
      if not work:
        break
      for (d, k), result in zip(work, self._pool.map(_try(stream.example), work)):
        if isinstance(result, sources.Skip):
          skipped[d][result.reason] += 1
        else:
          rows[d].append(result)
        cursor[d] = k + 1
      for d in stream.shards:
        if cursor[d] > 100 * stream.shard_batch + start[d] and not rows[d]:
          raise ValueError(f"stream {stream.name}: {cursor[d] - start[d]} examples in a row "
                           f"were skipped ({dict(skipped[d])}); check max_tokens and the source")
    for d in stream.shards:
      state[str(d)] = {"cursor": cursor[d], "skipped": dict(skipped[d])}
    ordered = [row for d in stream.shards for row in rows[d]]
    return {key: np.stack([r[key] for r in ordered]) for key in ordered[0]}

  def _produce(self, state: dict, out: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        batches = {name: self._batch(stream, state["streams"][name])
                   for name, stream in self.streams.items()}
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
    """Where the next batch of each of this pipeline's shards starts (JSON-able)."""
    return copy.deepcopy(self._state)

  def restore(self, state: dict) -> None:
    """Resumes from `state` of any set of shards that includes this pipeline's."""
    if "streams" not in state:
      raise ValueError("iterator state has no per-shard streams (written by an older version "
                       "of the pipeline)")
    if state["num_shards"] != self.num_shards:
      raise ValueError(f"iterator state is for {state['num_shards']} data shards, this pipeline "
                       f"has {self.num_shards} (the data order is per data shard: keep the mesh's "
                       f"data axis when resuming)")
    if set(state["streams"]) != set(self.streams):
      raise ValueError(f"iterator state has streams {sorted(state['streams'])}, config "
                       f"{sorted(self.streams)}")
    mine = {}
    for name, shards in state["streams"].items():
      missing = [d for d in self.shards if str(d) not in shards]
      if missing:
        raise ValueError(f"iterator state of stream {name} lacks data shards {missing}")
      mine[name] = {str(d): copy.deepcopy(shards[str(d)]) for d in self.shards}
    self._halt()
    self._state = {"num_shards": self.num_shards, "streams": mine}
    self._start()

  def skipped(self) -> dict[str, dict[str, int]]:
    """Per stream: examples skipped when building (whole source) and here (this pipeline's
    shards)."""
    out = {}
    for name, stream in self.streams.items():
      counts = collections.Counter(stream.build_skipped)
      for shard in self._state["streams"][name].values():
        counts.update(shard["skipped"])
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


def merge_states(states: list[dict]) -> dict:
  """The states of several pipelines (one per process) -> one state of all their shards.
  Pipelines feeding the same shard must agree (their rows are the same by construction)."""
  merged = {"num_shards": states[0]["num_shards"], "streams": {}}
  for state in states:
    if state["num_shards"] != merged["num_shards"]:
      raise ValueError(f"pipelines split the batch into {merged['num_shards']} and "
                       f"{state['num_shards']} data shards")
    for name, shards in state["streams"].items():
      into = merged["streams"].setdefault(name, {})
      for shard, value in shards.items():
        if into.setdefault(shard, value) != value:
          raise RuntimeError(f"stream {name}, data shard {shard}: processes disagree on the "
                             f"input position ({into[shard]} vs {value}); their inputs differ")
  return merged


def _try(fn):
  def call(args):
    try:
      return fn(*args)
    except sources.Skip as skip:
      return skip
  return call


def log_skipped(pipe: InputPipeline) -> None:
  for name, counts in pipe.skipped().items():
    if counts:
      logging.info("stream %s: skipped %s", name, counts)
