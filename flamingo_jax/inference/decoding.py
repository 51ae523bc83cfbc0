"""Generation: greedy, sampling (temperature, top-k, top-p; seeded) and beam search.

    results = generate(engine, prompts, media, max_new_tokens=32, method="beam", beam_width=3)
    results[i][0].tokens       # best continuation of prompt i (ends with its stop token, if any)

Rows are prompts of any lengths (lists of ids; `<image>` tokens in them refer to media slots
in order) with any number of media items (`media` uint8 [B, N, T, H, W, 3], zero-padded
slots); each row stops at its first stop token (`<EOC>`, EOS) while the others go on. The
prompt is prefilled in one call, then one jitted step per new token (engine.py).

Beam search keeps `beam_width` live hypotheses and `beam_width` finished ones per prompt;
a hypothesis' score is its log-likelihood (the sum of its tokens' log-probabilities, the
stop token included) divided by length ** length_penalty (0: the log-likelihood itself).
It stops early once no live hypothesis can beat the worst finished one.
"""

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.inference import engine as engine_lib

METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass
class Hypothesis:
  tokens: list[int]      # new tokens, up to and including the stop token
  log_prob: float        # sum of their log-probabilities
  score: float           # log_prob / len ** length_penalty (beam), = log_prob otherwise


def prepare(engine: engine_lib.Engine, prompts: Sequence[Sequence[int]],
            media: Optional[np.ndarray], max_new_tokens: int):
  """Checks prompts against media and the cache; -> (ids [B', L], lengths [B'], media, B)
  right-padded to a length bucket, rows padded (copies of row 0) to a multiple of the
  'data' axis."""
  if not prompts:
    raise ValueError("no prompts")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError(f"prompt {int(np.argmin(lengths))} is empty")
  slots = engine.max_slots
  too_long = np.flatnonzero(lengths + max_new_tokens > slots)
  if too_long.size:
    i = int(too_long[0])
    raise ValueError(f"prompt {i} has {lengths[i]} tokens; with max_new_tokens="
                     f"{max_new_tokens} it needs {lengths[i] + max_new_tokens} positions but "
                     f"the maximum length is {slots}")
  slots_media = 0 if media is None else media.shape[1]
  for i, p in enumerate(prompts):
    images = sum(1 for t in p if t == engine.image_id)
    if images > slots_media:
      raise ValueError(f"prompt {i} has {images} <image> tokens but only {slots_media} "
                       f"media item(s) were given")
  if media is not None and media.shape[0] != len(prompts):
    raise ValueError(f"media has {media.shape[0]} rows for {len(prompts)} prompts")
  count = len(prompts)
  multiple = engine.data_parallelism
  padded_rows = -(-count // multiple) * multiple
  width = min(engine_lib.bucket(lengths.max()), slots)
  ids = np.zeros((padded_rows, width), np.int32)
  all_lengths = np.concatenate([lengths, np.full(padded_rows - count, lengths[0])])
  for i in range(padded_rows):
    p = prompts[i] if i < count else prompts[0]
    ids[i, :len(p)] = p
  if media is not None and padded_rows > count:
    media = np.concatenate([media, np.repeat(media[:1], padded_rows - count, axis=0)])
  return ids, all_lengths.astype(np.int32), media, count


@functools.partial(jax.jit, static_argnames=("method", "top_k"))
def _select(logits, seed, step, temperature, top_p, *, method: str, top_k: int):
  """Next token and its log-probability (under the model, not the sampling distribution);
  the sampling key is fold_in(key(seed), step)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if method == "greedy":
    token = jnp.argmax(logits, axis=-1)
  else:
    scaled = logits.astype(jnp.float32) / temperature
    if top_k:
      kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
      scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches top_p (the first token always).
    keep = cumulative - jax.nn.softmax(sorted_logits, axis=-1) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    key = jax.random.fold_in(jax.random.key(seed), step)
    token = jax.random.categorical(key, scaled, axis=-1)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def generate(engine: engine_lib.Engine, prompts: Sequence[Sequence[int]],
             media: Optional[np.ndarray] = None, *, max_new_tokens: int = 32,
             method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, beam_width: int = 3,
             length_penalty: float = 0.0, stop_ids: Sequence[int] = (),
             num_return: int = 1) -> list[list[Hypothesis]]:
  """Continuations of each prompt: a list (best first; `num_return` for beam) per prompt."""
  if method not in METHODS:
    raise ValueError(f"method {method!r}; expected one of {METHODS}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if method == "sample" and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
    raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got "
                     f"{temperature}, {top_p}, {top_k}")
  if method == "beam":
    return _beam_search(engine, prompts, media, max_new_tokens, beam_width, length_penalty,
                        stop_ids, num_return)
  ids, lengths, media, count = prepare(engine, prompts, media, max_new_tokens)
  prompt = engine.prefill(ids, lengths, engine.encode(media))
  logits, cache, positions, phi = prompt.logits, prompt.cache, prompt.positions, prompt.phi
  previous = prompt.last_token
  rows = ids.shape[0]
  done = np.zeros(rows, bool)
  tokens_out = np.zeros((rows, max_new_tokens), np.int32)
  log_prob = np.zeros(rows, np.float64)
  steps = 0
  for t in range(max_new_tokens):
    token, token_logp = _select(logits, np.uint32(seed), np.int32(t), np.float32(temperature),
                                np.float32(top_p), method=method, top_k=int(top_k))
    token_np, logp_np = engine.to_host((token, token_logp))
    live = ~done
    tokens_out[live, t] = token_np[live]
    log_prob[live] += logp_np[live]
    steps = t + 1
    done |= np.isin(token_np, list(stop_ids))
    if done[:count].all() or t == max_new_tokens - 1:
      break
    phi = engine.next_phi(phi, previous, token)
    previous = token
    logits, cache = engine.step(token, positions, phi, cache)
    positions = positions + 1
  results = []
  for i in range(count):
    row = tokens_out[i, :steps].tolist()
    for j, t in enumerate(row):
      if t in stop_ids:
        row = row[:j + 1]
        break
    results.append([Hypothesis(row, float(log_prob[i]), float(log_prob[i]))])
  return results


# --- beam search ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("width",))
def _beam_update(state, logits, t, stop, penalty, *, width: int):
  """One expansion; state: dict of alive/finished tokens [B, W, M], log-probs, scores."""
  b = state["alive_logp"].shape[0]
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, width, vocab)
  candidates = (state["alive_logp"][:, :, None] + log_probs).reshape(b, width * vocab)
  values, index = jax.lax.top_k(candidates, 2 * width)                   # [B, 2W]
  beam, token = index // vocab, (index % vocab).astype(jnp.int32)
  seqs = jnp.take_along_axis(state["alive_tokens"], beam[:, :, None], axis=1)   # [B, 2W, M]
  seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], t, axis=2)
  is_stop = jnp.isin(token, stop)
  length = (t + 1).astype(jnp.float32)
  # Finished: the old finished set plus the candidates that just stopped, best W kept.
  new_scores = jnp.where(is_stop, values / length ** penalty, -jnp.inf)
  all_scores = jnp.concatenate([state["fin_score"], new_scores], axis=1)  # [B, 3W]
  all_tokens = jnp.concatenate([state["fin_tokens"], seqs], axis=1)
  all_logp = jnp.concatenate([state["fin_logp"], values], axis=1)
  all_len = jnp.concatenate([state["fin_len"], jnp.full_like(values, t + 1, jnp.int32)], axis=1)
  fin_score, keep = jax.lax.top_k(all_scores, width)
  take = lambda x: jnp.take_along_axis(x, keep if x.ndim == 2 else keep[:, :, None], axis=1)
  # Alive: the best W candidates that did not stop.
  alive_values = jnp.where(is_stop, -jnp.inf, values)
  alive_logp, chosen = jax.lax.top_k(alive_values, width)
  parents = jnp.take_along_axis(beam, chosen, axis=1)                    # [B, W]
  new = {"alive_tokens": jnp.take_along_axis(seqs, chosen[:, :, None], axis=1),
         "alive_logp": alive_logp, "fin_score": fin_score, "fin_tokens": take(all_tokens),
         "fin_logp": take(all_logp), "fin_len": take(all_len)}
  # Done when W hypotheses finished and none alive can still beat the worst of them (the
  # best an alive one can do: no more log-probability lost, the longest length).
  max_len = state["alive_tokens"].shape[2]
  bound = jnp.where(penalty > 0, alive_logp[:, 0] / max_len ** penalty,
                    alive_logp[:, 0] / length ** penalty)
  done = fin_score[:, -1] > bound
  rows = (jnp.arange(b)[:, None] * width + parents).reshape(-1)
  return new, rows, token.astype(jnp.int32), jnp.take_along_axis(token, chosen, axis=1), done


def _beam_search(engine, prompts, media, max_new_tokens, width, penalty, stop_ids,
                 num_return) -> list[list[Hypothesis]]:
  if width < 1 or not 1 <= num_return <= width:
    raise ValueError(f"beam_width={width} must be >= 1 and num_return={num_return} in "
                     f"[1, beam_width]")
  ids, lengths, media, count = prepare(engine, prompts, media, max_new_tokens)
  b = ids.shape[0]
  visual = engine.encode(media)
  # One prefill per prompt, then every prompt's cache row copied to its W beams.
  prompt = engine.prefill(ids, lengths, visual)
  beam_rows = np.repeat(np.arange(b), width)
  cache = engine.tile(prompt.cache, beam_rows)
  logits = jnp.take(prompt.logits, beam_rows, axis=0)
  positions = jnp.take(prompt.positions, beam_rows)
  phi = jnp.take(prompt.phi, beam_rows)
  previous = jnp.take(prompt.last_token, beam_rows)
  # Host (numpy) inputs: every process passes the same values (multi-process runs).
  state = {
      "alive_tokens": np.zeros((b, width, max_new_tokens), np.int32),
      "alive_logp": np.tile(np.asarray([0.0] + [-np.inf] * (width - 1), np.float32), (b, 1)),
      "fin_tokens": np.zeros((b, width, max_new_tokens), np.int32),
      "fin_logp": np.full((b, width), -np.inf, np.float32),
      "fin_score": np.full((b, width), -np.inf, np.float32),
      "fin_len": np.zeros((b, width), np.int32),
  }
  stop = np.asarray(list(stop_ids) or [-1], np.int32)
  penalty_arr = np.float32(penalty)
  steps = 0
  for t in range(max_new_tokens):
    state, rows, _, next_tokens, done = _beam_update(state, logits, np.int32(t), stop,
                                                     penalty_arr, width=width)
    steps = t + 1
    if bool(engine.to_host(done)[:count].all()) or t == max_new_tokens - 1:
      break
    cache = engine.reorder(cache, rows)
    phi, previous = jnp.take(phi, rows), jnp.take(previous, rows)
    tokens = next_tokens.reshape(-1)
    phi = engine.next_phi(phi, previous, tokens)
    previous = tokens
    logits, cache = engine.step(tokens, positions, phi, cache)
    positions = positions + 1
  state = engine.to_host(state)
  results = []
  for i in range(count):
    hyps = []
    for w in range(width):
      if np.isfinite(state["fin_score"][i, w]):
        n = int(state["fin_len"][i, w])
        hyps.append(Hypothesis(state["fin_tokens"][i, w, :n].tolist(),
                               float(state["fin_logp"][i, w]), float(state["fin_score"][i, w])))
      if np.isfinite(state["alive_logp"][i, w]):     # ran out of new tokens before stopping
        logp = float(state["alive_logp"][i, w])
        hyps.append(Hypothesis(state["alive_tokens"][i, w, :steps].tolist(), logp,
                               logp / steps ** penalty))
    hyps.sort(key=lambda h: -h.score)
    results.append(hyps[:num_return])
  return results
