"""Few-shot evaluation of one task at one number of shots (docs/paper.md §6), resumable.

    harness = Harness(task, split, settings, tokenizer, make_engine, store)
    harness.run(shots=4, progress=bar.update)        # rows appended to the store
    result = harness.result(shots=4)                  # {"metric", "value", "queries", ...}

Queries: the evaluation split, or a fixed random subset of `limit` of them (the same subset
whatever the seed); the support set likewise (`support_size`, docs/paper.md: 2048). Query q's
shots are drawn from (seed, q) or by RICES (`rices_shots` on the frozen encoder's pooled
features), so a query's prompt does not depend on the batch, the device or the process that
evaluates it. Zero-shot: open-ended tasks get two text-only support examples (drawn the
same way), close-ended ones none.

Open-ended tasks generate with beam search (3) up to `max_new_tokens`, stopping at `<EOC>`,
cut where a new prompt starts. Close-ended tasks score every candidate after the prompt: the
log-likelihood of its tokens (`length_normalize`: per token), averaged over `ensemble`
orders of the shots (the first is the drawn order, the others seeded permutations), and
predict the best; HatefulMemes' score is the probability of the first candidate ("yes")
among the candidates.

The `Store` holds one JSON line per evaluated (shots, query): what was asked, answered and
expected; `run` skips the queries it already holds, so an interrupted evaluation resumes
without redoing or duplicating any. Queries whose media do not load are stored as skipped
(counted, never retried). Batches go to the engine whole: on a mesh their rows split over
'data' (and, with several processes, each process runs the same batches on its devices).
"""

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from flamingo_jax.data import preprocessing
from flamingo_jax.data import sources
from flamingo_jax.data import tokenizer as tok
from flamingo_jax.evaluation import features as features_lib
from flamingo_jax.evaluation import metrics
from flamingo_jax.evaluation import prompts
from flamingo_jax.evaluation import shots as shots_lib
from flamingo_jax.evaluation import tasks as tasks_lib
from flamingo_jax import inference

SUBSET_SEED = 0            # the query / support subsets: fixed, whatever --seed
ZERO_SHOT_EXAMPLES = 2     # text-only examples of a zero-shot open-ended prompt (docs/paper.md §6)
STORED_SCORES = 10         # a close-ended row keeps its best candidates' scores


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a result depends on besides the parameters and the shots."""
  task: str
  seed: int = 0
  rices: bool = False
  ensemble: int = 1            # close-ended: orders of the shots whose scores are averaged
  limit: int = 0               # queries (0: all)
  support_size: int = 2048     # support examples shots come from (0: all)
  beam: int = 3
  max_new_tokens: int = 20
  frames: int = 30             # per video (docs/paper.md §3.3: evaluation clips of 30 frames)
  length_normalize: bool = False
  batch_size: int = 8


class Store:
  """predictions.jsonl: one row per evaluated (shots, query id). Appends are flushed line by
  line; a torn last line (a kill mid-write) is dropped when the file is read again."""

  def __init__(self, path: str, writer: bool = True):
    self.path, self.writer = path, writer
    self.rows: dict[tuple[int, str], dict] = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
      good = []
      for line in lines:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue                      # the torn tail of an interrupted append
        self.rows[(int(row["shots"]), str(row["id"]))] = row
        good.append(line)
      if writer and len(good) != len([line for line in lines if line]):
        _write_atomic(path, "".join(line + "\n" for line in good))

  def has(self, shots: int, query_id: str) -> bool:
    return (shots, query_id) in self.rows

  def add(self, rows: Sequence[dict]) -> None:
    for row in rows:
      self.rows[(int(row["shots"]), str(row["id"]))] = row
    if self.writer and rows:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())

  def of(self, shots: int) -> list[dict]:
    return [row for (s, _), row in self.rows.items() if s == shots]


def _write_atomic(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _subset(items: list, size: int) -> list:
  if not size or size >= len(items):
    return list(items)
  keep = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(items), size, replace=False))
  return [items[i] for i in keep]


class Harness:
  """One task's split under one Settings; `run(shots)` evaluates the queries not yet stored."""

  def __init__(self, task: tasks_lib.Task, split: tasks_lib.Split, settings: Settings,
               tokenizer: Any, make_engine: Callable[[int], Any], store: Store, *,
               image_size: int, feature_cache: str = "", feature_key: str = ""):
    if settings.ensemble < 1:
      raise ValueError(f"ensemble={settings.ensemble} must be >= 1")
    if settings.ensemble > 1 and task.mode != "score":
      raise ValueError(f"ensembling averages candidate scores: task {task.name} is open-ended")
    if not split.queries:
      raise ValueError(f"task {task.name} has no queries to evaluate (skipped: "
                       f"{dict(split.skipped) or 'none'})")
    self.task, self.settings, self.tokenizer, self.store = task, settings, tokenizer, store
    self.throughput = {}          # shots -> queries/s of the queries this run evaluated
    self.make_engine, self.size = make_engine, int(image_size)
    self.queries = _subset(split.queries, settings.limit)
    self.support = _subset(split.support, settings.support_size)
    self.candidates = list(split.candidates)
    self.skipped_at_load = dict(split.skipped)
    self._engine_slots, self._engine_now = 0, None      # one compiled engine at a time
    self._continuations: dict[str, list[list[int]]] = {}
    self._media: collections.OrderedDict = collections.OrderedDict()
    self._features = None
    self.feature_cache, self.feature_key = feature_cache, feature_key

  # -- media --------------------------------------------------------------------------------

  def _load(self, item: Any) -> np.ndarray:
    """A media item (an image path, a clip path) -> uint8 [T, H, W, 3], cached (shots recur)."""
    key = str(item)
    if key not in self._media:
      if self.task.modality == "video":
        self._media[key] = preprocessing.load_video(item, self.size, self.settings.frames)
      else:
        self._media[key] = preprocessing.load_image(item, self.size)[None]
      if len(self._media) > 4096:
        self._media.popitem(last=False)
    self._media.move_to_end(key)
    return self._media[key]

  def _still(self, item: Any) -> np.ndarray:
    """The frame RICES compares: an image, or a clip's middle frame."""
    frames = self._load(item)
    return frames[len(frames) // 2]

  # -- shots --------------------------------------------------------------------------------

  def _rices_features(self):
    if self._features is None:
      extract = features_lib.FeatureExtractor(self._engine(64), load=self._still)
      support = features_lib.cached_features(
          os.path.join(self.feature_cache, "support_features.npy") if self.feature_cache else "",
          [e.media for e in self.support], extract, key=self.feature_key)
      query = features_lib.cached_features(
          os.path.join(self.feature_cache, "query_features.npy") if self.feature_cache else "",
          [e.media for e in self.queries], extract, key=self.feature_key)
      self._features = (query, support)
    return self._features

  def shots_of(self, index: int, shots: int) -> list[int]:
    """Support indices of query `index`'s shots, in prompt order."""
    s = self.settings
    if shots == 0:
      return []
    if s.rices:
      query, support = self._rices_features()
      return shots_lib.rices_shots(query[index:index + 1], support, shots)[0].tolist()
    return shots_lib.random_shots(s.seed, index, len(self.support), shots).tolist()

  def prompt_of(self, index: int, shots: int, order: Optional[Sequence[int]] = None):
    picks = self.shots_of(index, shots)
    if order is not None:
      picks = [picks[i] for i in order]
    zero_shot = []
    if shots == 0 and self.task.mode == "generate":
      count = min(ZERO_SHOT_EXAMPLES, len(self.support))
      zero_shot = [self.support[i] for i in
                   shots_lib.random_shots(self.settings.seed, index, len(self.support), count)]
    return prompts.build(self.task.fmt, [self.support[i] for i in picks], self.queries[index],
                         zero_shot)

  def _orders(self, index: int, shots: int) -> list[Optional[np.ndarray]]:
    orders = [None]
    for p in range(1, self.settings.ensemble if shots > 1 else 1):
      orders.append(np.random.default_rng([self.settings.seed, index, p]).permutation(shots))
    return orders

  # -- running ------------------------------------------------------------------------------

  def _engine(self, slots: int):
    slots = -(-slots // 64) * 64
    if slots != self._engine_slots:
      self._engine_slots, self._engine_now = slots, self.make_engine(slots)
    return self._engine_now

  def pending(self, shots: int) -> list[int]:
    return [i for i, q in enumerate(self.queries) if not self.store.has(shots, q.id)]

  def run(self, shots: int, progress: Callable[[int], None] = lambda n: None) -> None:
    if shots > len(self.support):
      raise ValueError(f"{shots} shots asked for but the support set holds "
                       f"{len(self.support)} examples")
    todo = self.pending(shots)
    begin = time.perf_counter()
    for start in range(0, len(todo), self.settings.batch_size):
      batch = todo[start:start + self.settings.batch_size]
      rows = self._run_batch(batch, shots)
      self.store.add(rows)
      progress(len(batch))
    if todo:         # this run's throughput (compiles included), reported with the result
      self.throughput[shots] = len(todo) / max(time.perf_counter() - begin, 1e-9)

  def _prepared(self, index: int, shots: int, order) -> tuple:
    prompt = self.prompt_of(index, shots, order)
    ids = tok.encode_with_markers(prompt.text, self.tokenizer)
    media = np.stack([self._load(item) for item in prompt.media])           # [N, T, H, W, 3]
    return prompt, ids, media

  def _run_batch(self, batch: Sequence[int], shots: int) -> list[dict]:
    rows, jobs = [], []          # jobs: (query index, [(prompt, ids, media) per order])
    for index in batch:
      query = self.queries[index]
      try:
        jobs.append((index, [self._prepared(index, shots, order)
                             for order in self._orders(index, shots)]))
      except sources.Skip as e:
        rows.append({"id": query.id, "shots": shots, "skipped": e.reason, "detail": str(e)})
    if jobs:
      run = self._generate if self.task.mode == "generate" else self._score
      rows += run(jobs, shots)
    return rows

  def _generate(self, jobs, shots: int) -> list[dict]:
    s = self.settings
    prepared = [p[0] for _, p in jobs]
    longest = max(len(ids) for _, ids, _ in prepared)
    engine = self._engine(inference.bucket(longest) + s.max_new_tokens)
    stop = (self.tokenizer.special.eoc, self.tokenizer.special.eos)
    method = dict(method="beam", beam_width=s.beam) if s.beam > 1 else dict(method="greedy")
    results = inference.generate(engine, [ids for _, ids, _ in prepared],
                                 np.stack([m for _, _, m in prepared]),
                                 max_new_tokens=s.max_new_tokens, stop_ids=stop, **method)
    rows = []
    for (index, _), (prompt, _, _), result in zip(jobs, prepared, results):
      query = self.queries[index]
      text = tok.decode_until_stop(result[0].tokens, self.tokenizer)
      rows.append({"id": query.id, "shots": shots, "prompt": prompt.text,
                   "output": prompts.cut_generation(text, self.task.fmt),
                   "reference": list(query.references)})
    return rows

  def candidate_tokens(self, prompt_text: str) -> list[list[int]]:
    """Each candidate's tokens as they continue `prompt_text` after a space: the tokens of
    prompt + candidate past the prompt's own (so a tokenizer that merges across the
    boundary, or marks word starts, tokenises the candidate as it would in running text).
    Text is encoded piece by piece between markers, so only the last piece matters: computed
    once per distinct last piece (the template's head, e.g. "Output:"), not per query."""
    tail = tok.split_markers(prompt_text)[-1]
    if tail not in self._continuations:
      head = self.tokenizer.encode(tail) if tail else []
      out = []
      for candidate in self.candidates:
        full = self.tokenizer.encode(tail + " " + candidate)
        if full[:len(head)] == head and len(full) > len(head):
          out.append(full[len(head):])
        else:
          out.append(self.tokenizer.encode(" " + candidate))
      self._continuations[tail] = out
    return self._continuations[tail]

  def _score(self, jobs, shots: int) -> list[dict]:
    s = self.settings
    flat = [(index, prepared) for index, per_order in jobs for prepared in per_order]
    tokens = [self.candidate_tokens(prompt.text) for _, (prompt, _, _) in flat]
    longest = max(len(ids) for _, (_, ids, _) in flat)
    longest_candidate = max(len(c) for cands in tokens for c in cands)
    engine = self._engine(inference.bucket(longest) + inference.bucket(longest_candidate))
    scores = inference.score(engine, [ids for _, (_, ids, _) in flat],
                             np.stack([m for _, (_, _, m) in flat]), tokens)
    pick = 1 if s.length_normalize else 0
    rows, k = [], 0
    for index, per_order in jobs:
      query = self.queries[index]
      # [orders, candidates] log-likelihoods, averaged over the orders of the shots.
      mean = np.mean([[c[pick] for c in scores[k + o]] for o in range(len(per_order))], axis=0)
      k += len(per_order)
      best = np.argsort(-mean, kind="stable")
      probs = np.exp(mean - mean.max())
      probs /= probs.sum()
      rows.append({"id": query.id, "shots": shots, "prompt": per_order[0][0].text,
                   "output": self.candidates[best[0]],
                   "positive_probability": float(probs[0]),
                   "scores": {self.candidates[i]: round(float(mean[i]), 6)
                              for i in best[:STORED_SCORES]},
                   "reference": list(query.references)})
    return rows

  # -- the metric ---------------------------------------------------------------------------

  def result(self, shots: int) -> dict:
    """The task's metric over the stored rows of `shots` (those of this run's queries)."""
    ids = {q.id for q in self.queries}
    rows = [r for r in self.store.of(shots) if r["id"] in ids]
    done = [r for r in rows if "skipped" not in r]
    skipped = collections.Counter(r["skipped"] for r in rows if "skipped" in r)
    skipped.update(self.skipped_at_load)
    value = score_rows(self.task, done, self.candidates) if done else float("nan")
    return {"task": self.task.name, "shots": shots, "metric": self.task.metric,
            "value": value, "queries": len(done), "skipped": dict(skipped),
            "complete": len(rows) == len(self.queries),
            "settings": dataclasses.asdict(self.settings) | (
                {"queries_per_second": round(self.throughput[shots], 3)}
                if shots in self.throughput else {})}


def score_rows(task: tasks_lib.Task, rows: Sequence[dict], candidates: Sequence[str]) -> float:
  """The task's metric over stored rows (in percent, as the paper reports)."""
  if task.metric == "cider":
    # As pycocoevalcap's COCOEvalCap: the references in one tokenizer call, the outputs in
    # another.
    references = metrics.ptb_tokenize_sets({r["id"]: r["reference"] for r in rows})
    outputs = metrics.ptb_tokenize_sets({r["id"]: [r["output"]] for r in rows})
    return 100.0 * metrics.cider_d(references, {k: v[0] for k, v in outputs.items()})[0]
  if task.metric == "vqa":
    return 100.0 * float(np.mean([metrics.vqa_accuracy(r["output"], r["reference"])
                                  for r in rows]))
  if task.metric == "roc_auc":
    positive = candidates[0]
    return 100.0 * metrics.roc_auc([r["positive_probability"] for r in rows],
                                   [int(r["reference"][0] == positive) for r in rows])
  if task.metric == "top1":
    if task.mode == "score":
      return 100.0 * metrics.top1_accuracy([r["output"] for r in rows],
                                           [r["reference"][0] for r in rows])
    return 100.0 * metrics.top1_accuracy(
        [metrics.normalize_short_answer(r["output"]) for r in rows],
        [metrics.normalize_short_answer(r["reference"][0]) for r in rows])
  raise ValueError(f"task {task.name}: unknown metric {task.metric!r}")


def markdown_table(results: Sequence[dict]) -> str:
  """| task | shots | metric | value | queries | skipped | as markdown."""
  lines = ["| task | shots | metric | value | queries | skipped |", "|---|---|---|---|---|---|"]
  for r in sorted(results, key=lambda r: (r["task"], r["shots"])):
    value = "n/a" if math.isnan(r["value"]) else f"{r['value']:.2f}"
    skipped = sum(r["skipped"].values())
    lines.append(f"| {r['task']} | {r['shots']} | {r['metric']} | {value} | {r['queries']} "
                 f"| {skipped} |")
  return "\n".join(lines) + "\n"
