r"""Generation benchmark: the on-device decode loop (inference/decoding.py) against an uncached
loop (a full forward of the whole sequence for every new token), greedy, random weights.

  python -m flamingo_jax.tools.bench_generate --config=experiments/configs/bench.py:100m \
      [--batch=1,8,32 --uncached_batches=1,8 --prompt_tokens=256 --images=3 --new_tokens=64
       --dtype=float32] [--json]

Per batch size: encode and prefill ms, decode ms per token (the loop's wall time over its
steps), tokens/s of the whole generation (encode and prefill included), the decode step's own
ms (one jitted `Engine.step`, timed alone) and the loop's per-token overhead over it, and,
for --uncached_batches, the uncached loop's tokens/s, `speedup` and how many of the cached
tokens equal the uncached ones (in bfloat16 the two differ where rounding reorders two
close logits). Compiles are excluded (one warm-up run each). One JSON line per batch size
with --json, each with the host it ran on.
"""

import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import cli
from flamingo_jax import host
from flamingo_jax import inference
from flamingo_jax import models
from flamingo_jax.training import tasks

_CONFIG = cli.define_config()
_PROMPT = flags.DEFINE_integer("prompt_tokens", 256, "Prompt length.")
_IMAGES = flags.DEFINE_integer("images", 3, "Images in the prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated.")
_BATCH = flags.DEFINE_list("batch", ["1", "8", "32"], "Batch sizes (prompts decoded together).")
_UNCACHED = flags.DEFINE_list("uncached_batches", ["1", "8"], "Batch sizes that also run the "
                              "uncached loop (slow: a full forward per token).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_JSON = cli.define_json("One JSON object per batch size.")


def make_inputs(config, batch: int, prompt_tokens: int, images: int, seed: int = 0):
  cfg = config.model
  rng = np.random.default_rng(seed)
  special = {cfg.image_token_id, cfg.eoc_token_id}
  vocab = cfg.lm.get("valid_vocab_size", 0) or cfg.vocab_size
  ids = rng.integers(0, vocab, (batch, prompt_tokens))
  ids = np.where(np.isin(ids, list(special)), 7, ids)
  step = max(1, prompt_tokens // max(images, 1))
  ids[:, np.arange(images) * step] = cfg.image_token_id
  media = rng.integers(0, 256, (batch, max(images, 1), 1, cfg.image_size, cfg.image_size, 3),
                       dtype=np.uint8)
  return [row.tolist() for row in ids], (media if images else None)


def step_ms(engine, prompts, media, new_tokens: int, repeats: int = 20) -> float:
  """The median wall time of one jitted decode step alone (blocked), on a prefilled cache."""
  ids, lengths, media, _ = inference.decoding.prepare(engine, prompts, media, new_tokens)
  prompt = engine.prefill(ids, lengths, engine.encode(media))
  tokens, cache = prompt.last_token, prompt.cache
  positions, phi = prompt.positions, prompt.phi
  _, cache = engine.step(tokens, positions, phi, cache)           # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    logits, cache = engine.step(tokens, positions, phi, cache)
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def uncached_tokens(engine, config, prompts, media, new_tokens: int, dtype: str):
  """(tokens [B, new_tokens] of the full-forward greedy loop, seconds)."""
  stages = models.make_flamingo_stages(config.model, compute_dtype=jnp.dtype(dtype))
  batch, prompt_tokens = len(prompts), len(prompts[0])
  total = prompt_tokens + new_tokens
  forward = jax.jit(lambda p, ids, visual, t: jax.lax.dynamic_index_in_dim(
      stages.apply.decode(p, None, ids, visual), t, axis=1, keepdims=False))

  def run():
    visual = engine.encode(media)
    ids = np.zeros((batch, total), np.int32)
    ids[:, :prompt_tokens] = np.asarray(prompts)
    for t in range(prompt_tokens - 1, total - 1):
      logits = forward(engine.params, jnp.asarray(ids), visual, t)
      ids[:, t + 1] = np.asarray(jnp.argmax(logits, axis=-1))
    return ids[:, prompt_tokens:]

  run()                                                     # compile
  start = time.perf_counter()
  tokens = run()
  return tokens, time.perf_counter() - start


def benchmark(config, *, prompt_tokens: int, images: int, new_tokens: int, batch: int,
              dtype: str, uncached: bool, params=None) -> dict:
  params = tasks.initial_params(config) if params is None else params
  slots = inference.bucket(prompt_tokens + new_tokens)
  engine = inference.Engine(config.model, params, max_slots=slots, compute_dtype=dtype)
  prompts, media = make_inputs(config, batch, prompt_tokens, images)
  inference.generate(engine, prompts, media, max_new_tokens=new_tokens)       # compile
  timings = {}
  start = time.perf_counter()
  result = inference.generate(engine, prompts, media, max_new_tokens=new_tokens,
                              timings=timings)
  seconds = time.perf_counter() - start
  decode_ms = 1000 * timings["decode_seconds"] / timings["steps"]
  one_step = step_ms(engine, prompts, media, new_tokens)
  tokens = batch * new_tokens
  report = {
      "device": jax.devices()[0].device_kind, "dtype": dtype, "batch": batch,
      "prompt_tokens": prompt_tokens, "images": images, "new_tokens": new_tokens,
      "encode_ms": round(1000 * timings["encode_seconds"], 3),
      "prefill_ms": round(1000 * timings["prefill_seconds"], 3),
      "decode_ms_per_token": round(decode_ms, 3),
      "step_ms": round(one_step, 3),
      "overhead_ratio": round(decode_ms / one_step, 3),
      "seconds": round(seconds, 4),
      "tokens_per_sec": round(tokens / seconds, 2),
      "decode_tokens_per_sec": round(batch * 1000 / decode_ms, 2),
  }
  if uncached:
    reference, uncached_seconds = uncached_tokens(engine, config, prompts, media, new_tokens,
                                                  dtype)
    agree = [int(np.argmax(np.r_[np.asarray(result[i][0].tokens) != reference[i], True]))
             for i in range(batch)]                         # equal tokens before the first difference
    report |= {"uncached_tokens_per_sec": round(tokens / uncached_seconds, 2),
               "speedup": round(uncached_seconds / seconds, 2),
               "same_tokens": all(a == new_tokens for a in agree),
               "rows_identical": sum(a == new_tokens for a in agree),
               "tokens_before_first_difference": agree}
  return report | {"host": host.describe()}


def main(argv):
  del argv
  params = tasks.initial_params(_CONFIG.value)
  uncached = {int(b) for b in _UNCACHED.value}
  for batch in (int(b) for b in _BATCH.value):
    report = benchmark(_CONFIG.value, prompt_tokens=_PROMPT.value, images=_IMAGES.value,
                       new_tokens=_NEW.value, batch=batch, dtype=_DTYPE.value,
                       uncached=batch in uncached, params=params)
    if _JSON.value:
      print(json.dumps(report), flush=True)
      continue
    line = (f"batch {batch:3d}: {report['tokens_per_sec']:9.2f} tokens/s (encode "
            f"{report['encode_ms']:.1f} ms, prefill {report['prefill_ms']:.1f} ms, decode "
            f"{report['decode_ms_per_token']:.2f} ms/token = {report['overhead_ratio']:.2f}x one "
            f"step's {report['step_ms']:.2f} ms)")
    if "speedup" in report:
      line += (f"; uncached {report['uncached_tokens_per_sec']:.2f} tokens/s, speedup "
               f"{report['speedup']}x, rows with the same tokens {report['rows_identical']}/{batch}")
    print(line, flush=True)


if __name__ == "__main__":
  cli.run(main)
