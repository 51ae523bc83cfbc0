"""Generation on device: greedy, seeded sampling (temperature, top-k, top-p) and beam search.

    results = generate(engine, prompts, media, max_new_tokens=32, method="beam", beam_width=3)
    results[i][0].tokens       # best continuation of prompt i (ends with its stop token, if any)
    for partial in stream(engine, prompts, media, every=8): ...     # tokens so far, per row

Rows are prompts of any lengths (lists of ids; `<image>` tokens in them refer to media slots
in order) with any number of media items (`media` uint8 [B, N, T, H, W, 3], zero-padded
slots). The prompts are prefilled in one call (engine.py); then the whole decode runs in one
jitted `lax.while_loop` on the device: each iteration feeds the last tokens through the
cached model (the cache carried and written in place, never copied back to the host) and
picks the next ones, until every row has met one of its stop tokens or `max_new_tokens`.
Only the tokens and scores come back. `stream` runs the same loop `every` tokens at a time
(the cache donated from call to call) and yields what each row has so far.

Sampling draws with a key per row: `fold_in(key(seed), row seed)` then `fold_in(., t)`, the
row seed a hash of the prompt (or `row_seeds`), so a prompt gets the same sample whatever
else is in the batch and wherever it sits. Scores are the model's log-probabilities of the
chosen tokens (not the sampling distribution's).

Beam search keeps `beam_width` live hypotheses and `beam_width` finished ones per prompt; a
hypothesis' score is its log-likelihood (the sum of its tokens' log-probabilities, the stop
token included) divided by length ** length_penalty (0: the log-likelihood itself). A prompt
is done once no live hypothesis can beat its worst finished one.
"""

import dataclasses
import functools
import time
import zlib
from typing import Iterator, Optional, Sequence

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


def prompt_seed(prompt: Sequence[int]) -> int:
  """A row's sampling seed from its prompt alone (CRC-32 of its ids)."""
  return zlib.crc32(np.asarray(prompt, np.int32).tobytes())


def _select(logits, keys, temperature, top_p, *, method: str, top_k: int):
  """Next token [B] and its log-probability (under the model, not the sampling
  distribution); `keys` [B]: one key per row (this step's)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if method == "greedy":
    token = jnp.argmax(logits, axis=-1)
  else:
    scaled = logits.astype(jnp.float32) / temperature
    if top_k:
      kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
      scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest set whose mass reaches top_p (the first token always).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    token = jax.vmap(jax.random.categorical)(keys, scaled)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def _step_keys(row_keys, t):
  return jax.vmap(lambda key: jax.random.fold_in(key, t))(row_keys)


def _feed(engine, params, state):
  """The last tokens through the cached model: (logits [B, V], the state's cache, φ,
  positions and previous token advanced)."""
  phi = engine.next_phi(state["phi"], state["previous"], state["last"])
  logits, cache = engine.apply_decode(params, state["last"], state["positions"], phi,
                                      state["cache"])
  return logits, dict(state, cache=cache, phi=phi, previous=state["last"],
                      positions=state["positions"] + 1)


# --- greedy and sampling --------------------------------------------------------------------

def _pick(state, logits, temperature, top_p, stop, *, method, top_k):
  """Writes this step's tokens (rows not yet done) into the state."""
  t = state["t"]
  token, logp = _select(logits, _step_keys(state["row_keys"], t), temperature, top_p,
                        method=method, top_k=top_k)
  live = ~state["done"]
  tokens = jax.lax.dynamic_update_slice_in_dim(
      state["tokens"], jnp.where(live, token, 0)[:, None], t, axis=1)
  return dict(state, t=t + 1, tokens=tokens, last=token,
              log_prob=state["log_prob"] + jnp.where(live, logp, 0.0),
              length=state["length"] + live.astype(jnp.int32),
              done=state["done"] | jnp.isin(token, stop))


def _sample_start(engine, method, top_k, prompt, cache, row_keys, temperature, top_p, stop,
                  max_new_tokens):
  """The loop's state after its first token (from the prefill's logits); `cache` (the
  prompt's, donated) becomes the state's."""
  b = prompt.logits.shape[0]
  state = dict(t=jnp.int32(0), tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
               log_prob=jnp.zeros((b,), jnp.float32), length=jnp.zeros((b,), jnp.int32),
               done=jnp.zeros((b,), bool), last=prompt.last_token, previous=prompt.last_token,
               positions=prompt.positions, phi=prompt.phi, cache=cache, row_keys=row_keys)
  # The first token comes from the prefill's logits; `previous` becomes the prompt's last.
  state = _pick(state, prompt.logits, temperature, top_p, stop, method=method, top_k=top_k)
  return dict(state, previous=prompt.last_token)


def _sample_loop(engine, method, top_k, params, state, temperature, top_p, stop, limit):
  """Runs until every row is done or t == limit."""
  def cond(s):
    return (s["t"] < limit) & ~jnp.all(s["done"])

  def body(s):
    logits, s = _feed(engine, params, s)
    return _pick(s, logits, temperature, top_p, stop, method=method, top_k=top_k)
  return jax.lax.while_loop(cond, body, state)


def _sampler(engine: engine_lib.Engine, method: str, top_k: int, max_new_tokens: int):
  """(start, loop): jitted on `engine`, one compile per (method, top_k, length, batch)."""
  key = ("sample", method, top_k, max_new_tokens)
  if key not in engine.loops:
    start = jax.jit(functools.partial(_sample_start, engine, method, top_k),
                    static_argnums=(6,), donate_argnums=(1,))
    loop = jax.jit(functools.partial(_sample_loop, engine, method, top_k),
                   donate_argnums=(1,))
    engine.loops[key] = (start, loop)
  return engine.loops[key]


def _row_keys(engine, prompts, count, rows, seed, row_seeds):
  seeds = [int(s) & 0xFFFFFFFF for s in (row_seeds if row_seeds is not None else
                                          [prompt_seed(p) for p in prompts])]
  if len(seeds) != count:
    raise ValueError(f"{len(seeds)} row_seeds for {count} prompts")
  seeds = np.asarray(seeds + [seeds[0]] * (rows - count), np.uint32)
  base = jax.random.key(np.uint32(seed & 0xFFFFFFFF))
  keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(engine.put_batch(seeds))
  return keys


def _check(method, max_new_tokens, temperature, top_k, top_p):
  if method not in METHODS:
    raise ValueError(f"method {method!r}; expected one of {METHODS}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if method == "sample" and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
    raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got "
                     f"{temperature}, {top_p}, {top_k}")


class _Clock:
  """Wall time of generation's phases (encode, prefill, decode) into `timings`, each phase
  waited for; a no-op (no waiting) without a dict."""

  def __init__(self, timings: Optional[dict]):
    self.timings = timings
    self.last = time.perf_counter()

  def lap(self, name: str, value) -> None:
    if self.timings is None:
      return
    jax.block_until_ready(value)
    now = time.perf_counter()
    self.timings[f"{name}_seconds"] = self.timings.get(f"{name}_seconds", 0.0) + now - self.last
    self.last = now


def _prefilled(engine, prompts, media, max_new_tokens, clock):
  ids, lengths, media, count = prepare(engine, prompts, media, max_new_tokens)
  visual = engine.encode(media)
  clock.lap("encode", visual)
  prompt = engine.prefill(ids, lengths, visual)
  clock.lap("prefill", prompt)
  return ids, prompt, count


def _run_sampler(engine, prompts, media, *, max_new_tokens, method, temperature, top_k, top_p,
                 seed, stop_ids, row_seeds, every, timings=None):
  """Yields the host state every `every` tokens (0: once, at the end)."""
  clock = _Clock(timings)
  ids, prompt, count = _prefilled(engine, prompts, media, max_new_tokens, clock)
  keys = _row_keys(engine, prompts, count, ids.shape[0], seed, row_seeds)
  stop = np.asarray(list(stop_ids) or [-1], np.int32)
  start, loop = _sampler(engine, method, int(top_k), max_new_tokens)
  temperature, top_p = np.float32(temperature), np.float32(top_p)
  state = start(prompt._replace(cache=None), prompt.cache, keys, temperature, top_p, stop,
                max_new_tokens)
  limit = 0
  while True:
    limit = min(max_new_tokens, limit + every) if every else max_new_tokens
    state = loop(engine.params, state, temperature, top_p, stop, np.int32(limit))
    host = engine.to_host({k: state[k] for k in ("t", "tokens", "log_prob", "length", "done")})
    clock.lap("decode", state["t"])
    if timings is not None:
      timings["steps"] = int(host["t"])
    finished = host["done"][:count].all() or int(host["t"]) >= max_new_tokens
    yield host, count, finished
    if finished:
      return


def _sample_results(host, count) -> list[list[Hypothesis]]:
  out = []
  for i in range(count):
    n = int(host["length"][i])
    logp = float(host["log_prob"][i])
    out.append([Hypothesis(host["tokens"][i, :n].tolist(), logp, logp)])
  return out


# --- beam search -----------------------------------------------------------------------------

def _beam_update(state, logits, stop, penalty, *, width: int):
  """One expansion at step state["t"]: the hypotheses' bookkeeping and the rows of their
  parents (into the [B * W] cache) and their new last tokens."""
  t = state["t"]
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
  # Done once W hypotheses finished and none alive can still beat the worst of them (the
  # best an alive one can do: no more log-probability lost, the longest length).
  max_len = state["alive_tokens"].shape[2]
  bound = jnp.where(penalty > 0, alive_logp[:, 0] / max_len ** penalty,
                    alive_logp[:, 0] / length ** penalty)
  rows = (jnp.arange(b)[:, None] * width + parents).reshape(-1)
  new = dict(state, t=t + 1, alive_tokens=jnp.take_along_axis(seqs, chosen[:, :, None], axis=1),
             alive_logp=alive_logp, fin_score=fin_score, fin_tokens=take(all_tokens),
             fin_logp=take(all_logp), fin_len=take(all_len),
             done=state["done"] | (fin_score[:, -1] > bound),
             last=jnp.take_along_axis(token, chosen, axis=1).reshape(-1))
  return new, rows


def _reorder(engine, state, rows):
  """Each hypothesis' cache row, φ and previous token from its parent's."""
  return dict(state, cache=engine_lib.reorder_rows(state["cache"], rows, self_only=True),
              phi=jnp.take(state["phi"], rows), previous=jnp.take(state["previous"], rows),
              positions=jnp.take(state["positions"], rows))


def _beam_start(engine, width, prompt, penalty, stop, max_new_tokens):
  b = prompt.logits.shape[0]
  beam_rows = jnp.repeat(jnp.arange(b), width)
  state = dict(
      t=jnp.int32(0),
      alive_tokens=jnp.zeros((b, width, max_new_tokens), jnp.int32),
      alive_logp=jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (width - 1), jnp.float32), (b, 1)),
      fin_tokens=jnp.zeros((b, width, max_new_tokens), jnp.int32),
      fin_logp=jnp.full((b, width), -jnp.inf, jnp.float32),
      fin_score=jnp.full((b, width), -jnp.inf, jnp.float32),
      fin_len=jnp.zeros((b, width), jnp.int32), done=jnp.zeros((b,), bool),
      # Every prompt's cache row copied to its W beams.
      cache=engine_lib.reorder_rows(prompt.cache, beam_rows, self_only=False),
      positions=jnp.take(prompt.positions, beam_rows), phi=jnp.take(prompt.phi, beam_rows),
      previous=jnp.take(prompt.last_token, beam_rows),
      last=jnp.take(prompt.last_token, beam_rows))
  state, rows = _beam_update(state, jnp.take(prompt.logits, beam_rows, axis=0), stop, penalty,
                             width=width)
  return _reorder(engine, state, rows)


def _beam_loop(engine, width, params, state, penalty, stop, limit):
  def cond(s):
    return (s["t"] < limit) & ~jnp.all(s["done"])

  def body(s):
    logits, s = _feed(engine, params, s)
    s, rows = _beam_update(s, logits, stop, penalty, width=width)
    return _reorder(engine, s, rows)
  return jax.lax.while_loop(cond, body, state)


def _beam_search(engine, prompts, media, max_new_tokens, width, penalty, stop_ids,
                 num_return, timings=None) -> list[list[Hypothesis]]:
  if width < 1 or not 1 <= num_return <= width:
    raise ValueError(f"beam_width={width} must be >= 1 and num_return={num_return} in "
                     f"[1, beam_width]")
  clock = _Clock(timings)
  _, prompt, count = _prefilled(engine, prompts, media, max_new_tokens, clock)
  key = ("beam", width, max_new_tokens)
  if key not in engine.loops:
    engine.loops[key] = (
        jax.jit(functools.partial(_beam_start, engine, width), static_argnums=(3,)),
        jax.jit(functools.partial(_beam_loop, engine, width), donate_argnums=(1,)))
  start, loop = engine.loops[key]
  stop = np.asarray(list(stop_ids) or [-1], np.int32)
  penalty = np.float32(penalty)
  state = start(prompt, penalty, stop, max_new_tokens)
  state = loop(engine.params, state, penalty, stop, np.int32(max_new_tokens))
  state = engine.to_host({k: v for k, v in state.items() if k != "cache"})
  steps = int(state["t"])
  clock.lap("decode", steps)
  if timings is not None:
    timings["steps"] = steps
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
                               logp / steps ** float(penalty)))
    hyps.sort(key=lambda h: -h.score)
    results.append(hyps[:num_return])
  return results


# --- the API ---------------------------------------------------------------------------------

def generate(engine: engine_lib.Engine, prompts: Sequence[Sequence[int]],
             media: Optional[np.ndarray] = None, *, max_new_tokens: int = 32,
             method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, beam_width: int = 3,
             length_penalty: float = 0.0, stop_ids: Sequence[int] = (),
             num_return: int = 1, row_seeds: Optional[Sequence[int]] = None,
             timings: Optional[dict] = None) -> list[list[Hypothesis]]:
  """Continuations of each prompt: a list (best first; `num_return` for beam) per prompt.
  `row_seeds`: sampling seeds per prompt (default: a hash of each prompt). `timings`: a
  dict to fill with the seconds of encode / prefill / decode and the decode steps (each
  phase then waited for: benchmarks)."""
  _check(method, max_new_tokens, temperature, top_k, top_p)
  if method == "beam":
    return _beam_search(engine, prompts, media, max_new_tokens, beam_width, length_penalty,
                        stop_ids, num_return, timings)
  host = count = None
  for host, count, _ in _run_sampler(
      engine, prompts, media, max_new_tokens=max_new_tokens, method=method,
      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids,
      row_seeds=row_seeds, every=0, timings=timings):
    pass
  return _sample_results(host, count)


def stream(engine: engine_lib.Engine, prompts: Sequence[Sequence[int]],
           media: Optional[np.ndarray] = None, *, every: int = 8, max_new_tokens: int = 32,
           method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
           row_seeds: Optional[Sequence[int]] = None) -> Iterator[list[list[int]]]:
  """Greedy or sampled generation that yields each row's tokens so far every `every` new
  tokens (interactive use); the tokens are those `generate` gives."""
  if every < 1:
    raise ValueError(f"every={every} must be >= 1")
  if method == "beam":
    raise ValueError("stream: greedy or sample (beam search ranks whole hypotheses)")
  _check(method, max_new_tokens, temperature, top_k, top_p)
  for host, count, _ in _run_sampler(
      engine, prompts, media, max_new_tokens=max_new_tokens, method=method,
      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids,
      row_seeds=row_seeds, every=every):
    yield [host["tokens"][i, :int(host["length"][i])].tolist() for i in range(count)]
