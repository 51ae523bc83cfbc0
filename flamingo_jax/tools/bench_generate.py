r"""Generation benchmark: cached decoding (prefill once, one jitted step per token) vs uncached
(a full forward of the whole sequence for every new token), greedy, on random weights.

  python -m flamingo_jax.tools.bench_generate --config=experiments/configs/bench.py:100m [--json]
      [--prompt_tokens=256 --images=3 --new_tokens=64 --batch=1 --dtype=float32]

Both sides have static shapes: the uncached loop runs the full forward at the final length
(prompt + new tokens; the causal mask makes the not-yet-generated positions irrelevant) and
reads the logits of the current position, so it never recompiles. Compiles are excluded
(one warm-up run each). Prints tokens/s and per-token latency for each, and `speedup`
(cached tokens/s over uncached), as JSON with --json.
"""

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from flamingo_jax import inference
from flamingo_jax import models
from flamingo_jax.tools import cli
from flamingo_jax.tools import host
from flamingo_jax.tools import model_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_PROMPT = flags.DEFINE_integer("prompt_tokens", 256, "Prompt length.")
_IMAGES = flags.DEFINE_integer("images", 3, "Images in the prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated.")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts decoded together.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


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


def benchmark(config, *, prompt_tokens: int, images: int, new_tokens: int, batch: int,
              dtype: str) -> dict:
  params = model_params.initial(config)
  slots = inference.bucket(prompt_tokens + new_tokens)
  engine = inference.Engine(config.model, params, max_slots=slots, compute_dtype=dtype)
  prompts, media = make_inputs(config, batch, prompt_tokens, images)

  def cached():
    return inference.generate(engine, prompts, media, max_new_tokens=new_tokens)

  cached()                                                  # compile
  start = time.perf_counter()
  result = cached()
  cached_seconds = time.perf_counter() - start

  stages = models.make_flamingo_stages(config.model, compute_dtype=jnp.dtype(dtype))
  total = prompt_tokens + new_tokens
  forward = jax.jit(lambda p, ids, visual, t: jax.lax.dynamic_index_in_dim(
      stages.apply.decode(p, None, ids, visual), t, axis=1, keepdims=False))

  def uncached():
    visual = engine.encode(media)
    ids = np.zeros((batch, total), np.int32)
    ids[:, :prompt_tokens] = np.asarray(prompts)
    out = []
    for t in range(prompt_tokens - 1, total - 1):
      logits = forward(engine.params, jnp.asarray(ids), visual, t)
      ids[:, t + 1] = np.asarray(jnp.argmax(logits, axis=-1))
      out.append(ids[:, t + 1].copy())
    return out

  uncached()                                                # compile
  start = time.perf_counter()
  reference = uncached()
  uncached_seconds = time.perf_counter() - start
  same = all(result[i][0].tokens == [int(r[i]) for r in reference] for i in range(batch))
  tokens = batch * new_tokens
  return {
      "device": jax.devices()[0].device_kind, "dtype": dtype, "batch": batch,
      "prompt_tokens": prompt_tokens, "images": images, "new_tokens": new_tokens,
      "cached_seconds": round(cached_seconds, 4),
      "cached_tokens_per_sec": round(tokens / cached_seconds, 2),
      "cached_ms_per_token": round(1000 * cached_seconds / new_tokens, 3),
      "uncached_seconds": round(uncached_seconds, 4),
      "uncached_tokens_per_sec": round(tokens / uncached_seconds, 2),
      "uncached_ms_per_token": round(1000 * uncached_seconds / new_tokens, 3),
      "speedup": round(uncached_seconds / cached_seconds, 2),
      "same_tokens": bool(same),
      "host": host.describe(),
  }


def main(argv):
  del argv
  report = benchmark(_CONFIG.value, prompt_tokens=_PROMPT.value, images=_IMAGES.value,
                     new_tokens=_NEW.value, batch=_BATCH.value, dtype=_DTYPE.value)
  if _JSON.value:
    print(json.dumps(report))
    return
  print(f"cached:   {report['cached_tokens_per_sec']:9.2f} tokens/s  "
        f"{report['cached_ms_per_token']:8.2f} ms/token (prefill included)")
  print(f"uncached: {report['uncached_tokens_per_sec']:9.2f} tokens/s  "
        f"{report['uncached_ms_per_token']:8.2f} ms/token")
  print(f"speedup {report['speedup']}x; same tokens: {report['same_tokens']}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main)
