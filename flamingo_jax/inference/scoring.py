"""Scoring for close-ended tasks: the log-likelihood of candidate continuations.

    scores = score(engine, prompts, media, candidates)   # candidates[i]: token lists for prompt i
    scores[i][j] = (sum of log-probs, mean per token) of candidate j after prompt i

Each prompt is prefilled once; its cache row is then copied to its candidates, which run
as one batch through the cached forward (in chunks of `batch` rows), so 1000 class names
cost one prompt prefill and 1000 short candidate passes, not 1000 prompt passes.
Candidate token j's log-probability comes from the logits at the token before it (for
j = 0: the prompt's last token, from the prefill).
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.inference import decoding
from flamingo_jax.inference import engine as engine_lib


@jax.jit
def _candidate_log_probs(first_logits, logits, targets, mask):
  """first_logits [C, V] (predicts token 0), logits [C, T, V] (at tokens 0..T-1, predicting
  1..T), targets [C, T+1], mask [C, T+1] -> summed log-probs [C]."""
  all_logits = jnp.concatenate([first_logits[:, None], logits], axis=1)   # [C, T+1, V]
  log_probs = jax.nn.log_softmax(all_logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, picked, 0.0), axis=1)


def score(engine: engine_lib.Engine, prompts: Sequence[Sequence[int]],
          media: Optional[np.ndarray], candidates: Sequence[Sequence[Sequence[int]]], *,
          batch: int = 64) -> list[list[tuple[float, float]]]:
  """(sum, per-token mean) log-likelihood of every candidate of every prompt."""
  if len(candidates) != len(prompts):
    raise ValueError(f"{len(candidates)} candidate lists for {len(prompts)} prompts")
  longest = max((len(c) for cands in candidates for c in cands), default=0)
  if any(len(c) == 0 for cands in candidates for c in cands):
    raise ValueError("a candidate has no tokens")
  ids, lengths, media, count = decoding.prepare(engine, prompts, media, max(longest, 1))
  prompt = engine.prefill(ids, lengths, engine.encode(media))
  flat = [(i, list(c)) for i, cands in enumerate(candidates) for c in cands]
  batch = -(-batch // engine.data_parallelism) * engine.data_parallelism
  # Candidate tokens 0..T-1 go through the cache after the prompt: the bucket, within the slots.
  width = min(engine_lib.bucket(longest), engine.max_slots - int(lengths.max()))
  sums = np.zeros(len(flat), np.float64)
  for start in range(0, len(flat), batch):
    chunk = flat[start:start + batch]
    chunk = chunk + [chunk[0]] * (batch - len(chunk))      # fixed shapes: one compile
    rows = np.array([i for i, _ in chunk], np.int32)
    targets = np.zeros((batch, width + 1), np.int32)
    mask = np.zeros((batch, width + 1), bool)
    for r, (_, c) in enumerate(chunk):
      targets[r, :len(c)] = c
      mask[r, :len(c)] = True
    rows_dev = rows                                        # numpy: the same on every process
    cache = engine.tile(prompt.cache, rows_dev)
    logits, _ = engine.extend(engine.put_batch(targets[:, :width]),
                              jnp.take(prompt.positions, rows_dev),
                              jnp.take(prompt.phi, rows_dev),
                              jnp.take(prompt.last_token, rows_dev), cache)
    chunk_sums = _candidate_log_probs(jnp.take(prompt.logits, rows_dev, axis=0), logits,
                                      targets, mask)
    n = min(batch, len(flat) - start)
    sums[start:start + n] = engine.to_host(chunk_sums)[:n]
  out, k = [], 0
  for cands in candidates[:count]:
    row = []
    for c in cands:
      row.append((float(sums[k]), float(sums[k] / len(c))))
      k += 1
    out.append(row)
  return out
