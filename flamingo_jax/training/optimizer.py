"""AdamW as in PAPER.md §4: global-norm clipping 1.0, linear warm-up 0 -> 1e-4 over 5000 steps
then constant, weight decay 0.1 except on the Perceiver Resampler (0). Every number from
`config.optim`. Decay applies to weight matrices and embeddings (`w`, `embeddings`), never to
gates, norms, latents or temporal embeddings (the paper does not say; PAPER.md §9.8).
"""

from typing import Any

import haiku as hk
import optax

from flamingo_jax import models

_DECAYED_NAMES = ("w", "embeddings")


def learning_rate_schedule(optim: Any) -> optax.Schedule:
  """0 at step 0, rising linearly to `learning_rate` at `warmup_steps`; constant when 0."""
  if optim.warmup_steps <= 0:
    return optax.constant_schedule(optim.learning_rate)
  return optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)


def _decay_mask(params: hk.Params, *, resampler: bool) -> hk.Params:
  def decayed(module, name, value):
    del value
    in_resampler = models.component_of(module) == "resampler"
    return name in _DECAYED_NAMES and in_resampler == resampler
  return hk.data_structures.map(decayed, params)


def make_optimizer(optim: Any) -> optax.GradientTransformation:
  """clip -> Adam moments -> decoupled weight decay (two groups) -> -lr."""
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_global_norm),
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.add_decayed_weights(optim.weight_decay,
                                mask=lambda p: _decay_mask(p, resampler=False)),
      optax.add_decayed_weights(optim.resampler_weight_decay,
                                mask=lambda p: _decay_mask(p, resampler=True)),
      optax.scale_by_learning_rate(learning_rate_schedule(optim)),
  )
