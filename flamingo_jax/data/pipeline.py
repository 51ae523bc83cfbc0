"""The multi-stream, multi-host input pipeline: prepared TFDS datasets -> per-process batches.

    shards = sharding.assign_data_shards(sharding.process_grid(mesh))[jax.process_index()]
    pipe = pipeline.InputPipeline(config, shards=shards, num_shards=mesh.shape["data"])
    batches = next(pipe)          # {stream: batch (docs/design.md §4)}: the rows of `shards`
    state = pipe.state()          # JSON-able; pipe.restore(state) resumes exactly

Order. Stream s reads its split in epochs; epoch e visits the examples in the permutation
seeded by (seed, s, e) (grain's index_shuffle: computed per position, never materialised);
positions 0, 1, 2, ... run through epoch 0, then epoch 1, ... with no seam. The global batch
is split into `num_shards` data shards (the mesh's 'data' axis); shard d of D takes positions d, d + D, d + 2D, ... (its k-th example is position kD + d),
so the shards read disjoint examples that together cover the split. A process produces the
rows of the shards its devices hold, in shard order; processes holding the same shard (a
model group spanning hosts) produce the same rows with no communication, and the batch does
not depend on how many processes there are. Every random choice for an example (window,
p_next, leading space, frames, augmentation) comes from a generator seeded by
(seed, s, position), so an example does not depend on threads, on skips before it, or on
restarts. An example that fails here (e.g. an fps out of range in an older build) is counted and
the shard moves to its next position.

State. Per stream and data shard: the shard's cursor k and its skip counts. `restore` takes
the state of any set of shards that includes this pipeline's (the trainer's checkpoint holds
one file per data shard), so a run may resume with another process count but not another
number of data shards.

Loader. grain runs the work: `data.workers` worker processes (or, with 0, threads of this
process) read, decode, resize and tokenise examples in a fixed round-robin order (`_Work`), so
the batches are the same with any number of workers. A background thread assembles batches
from their output into a queue of `prefetch` batches. Video datasets keep the frames at the
stream's frame_rate when they are built (builders.py), so reading a clip decodes only the
frames it can use.
"""

import collections
import copy
import os
import queue
import threading
from typing import Any, Iterator

from absl import flags
from absl import logging
import grain
import numpy as np

from flamingo_jax.data import builders
from flamingo_jax.data import prepare
from flamingo_jax.data import preprocessing
from flamingo_jax.data import sources
from flamingo_jax.data import tokenizer as tok

# workers=-1 caps here: each worker process holds its own readers and tokenizer (~0.2 GB), and
# a TPU host's 240 vCPUs would otherwise mean 240 of them.
MAX_AUTO_WORKERS = 16


class _Stream:
  """One stream of one process: where its examples come from and how each is made. Pickled
  into the loader's worker processes, which reopen the dataset and the tokenizer."""

  def __init__(self, config: Any, name: str, tokenizer: tok.Tokenizer, num_shards: int):
    self.name, self.spec = name, config.data.streams[name]
    self.index = list(config.data.streams).index(name)
    self.data = config.data
    self.seed, self.size = int(config.seed), int(config.model.image_size)
    self.tokenizer = tokenizer
    self.num_shards = num_shards
    if self.spec.batch_size % num_shards:
      raise ValueError(f"stream {name}: batch_size {self.spec.batch_size} is not divisible "
                       f"by the {num_shards} data shards (mesh data axis)")
    self.shard_batch = self.spec.batch_size // num_shards
    builder = prepare.prepare_stream(config, name)
    self.dataset_dir = os.path.join(config.data.data_dir, name)
    self.source = builder.as_data_source(split="train")
    self.build_skipped = dict(builder.info.metadata.get("skipped", {}))
    self.num_examples = len(self.source)
    if self.spec.source == "video_text":
      prepare.check_stored_frame_rate(builder, self.spec, name)
    self._epoch_seeds = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["source"], state["tokenizer"] = None, self.tokenizer.path
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.source = builders.make_builder(self.spec.source, self.dataset_dir).as_data_source(
        split="train")
    self.tokenizer = tok.load(state["tokenizer"])

  def position(self, shard: int, k: int) -> int:
    return k * self.num_shards + shard

  def example_index(self, shard: int, k: int) -> int:
    """Epoch e visits the examples in a permutation seeded by (seed, stream, e), computed
    per position (no array of the split's size, which for billions of examples would not
    fit a worker)."""
    epoch, i = divmod(self.position(shard, k), self.num_examples)
    if self.num_examples == 1:
      return 0
    seed = self._epoch_seeds.get(epoch)
    if seed is None:              # once per epoch, not per example (threads may race: same value)
      seed = int(np.random.default_rng([self.seed, self.index, epoch]).integers(1 << 31))
      self._epoch_seeds[epoch] = seed
    return int(grain.experimental.index_shuffle(i, max_index=self.num_examples - 1, seed=seed,
                                                rounds=4))

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


class _Work:
  """The loader's endless work list; item i -> (stream, shard, k, row or skip reason).
  Pickled into the worker processes.

  Items come in rounds: each round holds the next `shard_batch` positions of every (stream,
  shard), from the cursors the loader started at. Item i is therefore a fixed example, whichever
  worker makes it. A shard that skips an example reads on into the next round; the items of the
  others wait in `_Loader` until their batch is made."""

  def __init__(self, streams: dict[str, _Stream], shards: tuple[int, ...],
               cursors: dict[tuple[str, int], int]):
    self.streams, self.cursors = streams, cursors
    self.slots = [(name, d, j) for name, stream in streams.items() for d in shards
                  for j in range(stream.shard_batch)]

  def __call__(self, i: int):
    r, j = divmod(i, len(self.slots))
    name, d, offset = self.slots[j]
    k = self.cursors[(name, d)] + r * self.streams[name].shard_batch + offset
    try:
      return name, d, k, self.streams[name].example(d, k)
    except sources.Skip as skip:          # a reason string: a Skip does not unpickle
      return name, d, k, skip.reason


class _Loader:
  """Runs `_Work` with grain: in `workers` processes, or in threads of this one (workers=0);
  hands out each (stream, shard)'s items in order."""

  _ENDLESS = 1 << 62

  def __init__(self, work: _Work, workers: int):
    if not flags.FLAGS.is_parsed():       # grain reads its absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()        # (tests, notebooks) their defaults stand
    dataset = grain.MapDataset.range(0, self._ENDLESS).map(work)
    ahead = 2 * len(work.slots)           # two rounds ahead: the next batch of every stream
    if workers > 0:
      # One thread per worker: grain's default of 16 reading threads in every worker made
      # 2 workers on 2 cores 3-5x slower than threads of one process (contention).
      per_worker = max(1, -(-ahead // workers))
      dataset = dataset.to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=per_worker)).mp_prefetch(
              grain.MultiprocessingOptions(num_workers=workers,
                                           per_worker_buffer_size=per_worker))
    else:
      dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=os.cpu_count() or 1,
                                                          prefetch_buffer_size=ahead))
    self._iterator = iter(dataset)
    self._waiting = collections.defaultdict(collections.deque)

  def next_item(self, name: str, shard: int):
    waiting = self._waiting[(name, shard)]
    while not waiting:
      item = next(self._iterator)
      self._waiting[item[:2]].append(item)
    return waiting.popleft()

  def close(self) -> None:
    try:
      self._iterator.close()
    except Exception as e:  # pylint: disable=broad-except
      # A worker that died (its error is what the pipeline reports) cannot be joined.
      logging.warning("closing the input workers: %s", e)


class InputPipeline(Iterator[dict]):
  """{stream: batch} of the rows of this process's data shards, prefetched, deterministic and
  resumable. By default one shard: the whole global batch.

  `workers`: grain worker processes that read, decode, resize and tokenise (default
  config.data.workers; 0: threads of this process, -1: one per CPU, at most
  MAX_AUTO_WORKERS). The batches do not depend
  on it. The loader starts with the first batch or `start()`, so that a `restore` before it
  costs nothing."""

  def __init__(self, config: Any, shards: tuple[int, ...] = (0,), num_shards: int = 1,
               prefetch: int | None = None, workers: int | None = None):
    shards = tuple(sorted(set(int(d) for d in shards)))
    if not shards or not all(0 <= d < num_shards for d in shards):
      raise ValueError(f"data shards {shards} are not a non-empty subset of 0..{num_shards - 1}")
    self.config, self.shards, self.num_shards = config, shards, int(num_shards)
    prepare.check_stream_sources(config)             # every stream's input, before any is built
    tokenizer = load_tokenizer(config)
    self.streams = {name: _Stream(config, name, tokenizer, self.num_shards)
                    for name in config.data.streams}
    self._prefetch = int(prefetch if prefetch is not None else config.data.prefetch)
    workers = int(workers if workers is not None else config.data.workers)
    self._workers = min(os.cpu_count() or 1, MAX_AUTO_WORKERS) if workers < 0 else workers
    self._state = {"num_shards": self.num_shards,
                   "streams": {name: {str(d): {"cursor": 0, "skipped": {}} for d in shards}
                               for name in self.streams}}
    self._thread = None

  # -- producer ---------------------------------------------------------------------------

  def _batch(self, stream: _Stream, state: dict, loader: _Loader) -> dict:
    """The rows of `stream`'s shards, in shard order; advances `state` ({shard: cursor...})."""
    ordered = []
    for d in self.shards:
      start = cursor = state[str(d)]["cursor"]
      skipped = collections.Counter(state[str(d)]["skipped"])
      rows = []
      while len(rows) < stream.shard_batch:
        _, _, k, result = loader.next_item(stream.name, d)
        assert k == cursor, (stream.name, d, k, cursor)
        cursor = k + 1
        if isinstance(result, str):
          skipped[result] += 1
          if cursor - start > 100 * stream.shard_batch and not rows:
            raise ValueError(f"stream {stream.name}: {cursor - start} examples in a row were "
                             f"skipped ({dict(skipped)}); check max_tokens and the source")
        else:
          rows.append(result)
      state[str(d)] = {"cursor": cursor, "skipped": dict(skipped)}
      ordered += rows
    return {key: np.stack([r[key] for r in ordered]) for key in ordered[0]}

  def _produce(self, state: dict, out: queue.Queue, stop: threading.Event) -> None:
    loader = None
    try:
      cursors = {(name, int(d)): shard["cursor"] for name, shards in state["streams"].items()
                 for d, shard in shards.items()}
      loader = _Loader(_Work(self.streams, self.shards, cursors), self._workers)
      while not stop.is_set():
        batches = {name: self._batch(stream, state["streams"][name], loader)
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
    finally:
      if loader is not None:
        loader.close()

  def start(self) -> None:
    """Starts the loader (and its worker processes) now rather than at the first batch."""
    if self._thread is not None:
      return
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
    self.start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._halt()
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
    running = self._thread is not None
    self._halt()
    self._state = {"num_shards": self.num_shards, "streams": mine}
    if running:
      self.start()

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

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

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


def log_skipped(pipe: InputPipeline) -> None:
  for name, counts in pipe.skipped().items():
    if counts:
      logging.info("stream %s: skipped %s", name, counts)
