r"""CPU smoke check: build a config's model, print its parameter table, run one forward and
backward pass on random tokens and media, print the loss and gradient norm.

  python -m flamingo_jax.tools.smoke --config=experiments/configs/tiny.py
"""

import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flamingo_jax import cli
from flamingo_jax import models
from flamingo_jax.training import tasks

_CONFIG = cli.define_config()


def random_batch(config, stream: str, seed: int = 0):
  """Random input_ids with `<image>` tokens at the start of each media slot's span."""
  spec, model = config.data.streams[stream], config.model
  rng = np.random.RandomState(seed)
  ids = rng.randint(6, model.vocab_size, (spec.batch_size, spec.max_tokens + 1))
  ids[:, 1:spec.max_tokens:max(1, spec.max_tokens // spec.max_media)][:, :spec.max_media] = (
      model.image_token_id)
  media = rng.randint(0, 256, (spec.batch_size, spec.max_media, spec.frames,
                               model.image_size, model.image_size, 3))
  return jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32), jnp.asarray(media, jnp.uint8)


def main(argv):
  del argv
  config = _CONFIG.value
  if tasks.task_of(config).name != "flamingo":
    sys.exit(f"error: smoke checks Flamingo configs; this one is task={config.task!r}: try "
             f"tools/param_count or tools/bench_step (one compiled train step)")
  counts = models.count_params(config.model)
  print(f"{'component':>10}  {'parameters':>14}")
  for key, value in counts.items():
    print(f"{key:>10}  {value:>14,}")
  stream = "m3w" if "m3w" in config.data.streams else next(iter(config.data.streams))
  input_ids, targets, media = random_batch(config, stream)
  model = models.make_flamingo(config.model)
  start = time.perf_counter()
  params = jax.jit(model.init)(jax.random.key(config.seed), input_ids, media)
  trainable, frozen = models.split_trainable(params, config.model)
  print(f"init: {time.perf_counter() - start:.1f}s")

  def loss_fn(trainable):
    logits = model.apply(hk.data_structures.merge(trainable, frozen), None, input_ids, media)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  start = time.perf_counter()
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
  print(f"forward+backward on stream {stream!r} {tuple(input_ids.shape)}: "
        f"{time.perf_counter() - start:.1f}s (compile included)")
  print(f"loss {float(loss):.4f} (log vocab {np.log(config.model.vocab_size):.4f}), "
        f"grad norm {float(optax.global_norm(grads)):.4g}")


if __name__ == "__main__":
  cli.run(main)
