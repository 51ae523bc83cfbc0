"""Optimizers from `config.optim`.

Flamingo (docs/paper.md §4): AdamW, global-norm clipping 1.0, linear warm-up 0 -> 1e-4 over 5000
steps then constant, weight decay 0.1 except on the Perceiver Resampler (0). Decay applies
to weight matrices and embeddings (`w`, `embeddings`), never to gates, norms, latents or
temporal embeddings (the paper does not say; docs/paper.md §9.8). With `vision.trainable`
(fine-tuning, docs/paper.md §8) the vision encoder has its own learning rate and weight decay
(`optim.vision_learning_rate`, `optim.vision_weight_decay`; unset: the others').

Contrastive pretraining (docs/paper.md §5): Adam, learning rate decayed linearly to 0, adaptive
gradient clipping (AGC, Brock et al. 2021) on the NFNet, global-norm clipping on the text
tower (`make_contrastive_optimizer`).

`optim.schedule`: "warmup_constant" (default) | "linear_to_zero" (warm-up, then linearly
to 0 at `optim.decay_steps`) | "exponential" (warm-up, then x`decay_rate` every
`decay_steps`, continuously).
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from flamingo_jax import models
from flamingo_jax.models import contrastive
from flamingo_jax.models.vision import nfnet

_DECAYED_NAMES = ("w", "embeddings")
SCHEDULES = ("warmup_constant", "linear_to_zero", "exponential")


def learning_rate_schedule(optim: Any) -> optax.Schedule:
  """`optim.schedule` from `optim.learning_rate`; 0 at step 0 when there is a warm-up."""
  kind = optim.get("schedule", "warmup_constant")
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r}; expected one of {SCHEDULES}")
  peak, warmup = optim.learning_rate, max(0, int(optim.warmup_steps))
  if kind == "warmup_constant":
    return (optax.linear_schedule(0.0, peak, warmup) if warmup
            else optax.constant_schedule(peak))
  if kind == "linear_to_zero":
    if optim.decay_steps <= warmup:
      raise ValueError(f"optim.decay_steps={optim.decay_steps} must exceed warmup_steps={warmup}")
    after = optax.linear_schedule(peak, 0.0, optim.decay_steps - warmup)
  else:
    after = optax.exponential_decay(peak, optim.decay_steps, optim.decay_rate)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params: hk.Params, *, group: str, vision_apart: bool) -> hk.Params:
  def group_of(module):
    component = models.component_of(module)
    if component == "resampler" or (component == "vision" and vision_apart):
      return component
    return "rest"
  return hk.data_structures.map(
      lambda module, name, value: name in _DECAYED_NAMES and group_of(module) == group, params)


def make_optimizer(optim: Any) -> optax.GradientTransformation:
  """clip -> Adam moments -> decoupled weight decay (per group) -> -lr. The vision encoder
  (when it trains) gets its own decay / learning rate only when `optim.vision_weight_decay`
  (>= 0) / `optim.vision_learning_rate` (> 0) are set: otherwise the state's structure is
  the one every earlier checkpoint has."""
  vision_lr = optim.get("vision_learning_rate", 0.0)
  vision_decay = optim.get("vision_weight_decay", -1.0)
  apart = vision_decay >= 0
  mask = lambda group: lambda p: _decay_mask(p, group=group, vision_apart=apart)
  chain = [
      optax.clip_by_global_norm(optim.clip_global_norm),
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.add_decayed_weights(optim.weight_decay, mask=mask("rest")),
      optax.add_decayed_weights(optim.resampler_weight_decay, mask=mask("resampler")),
  ]
  if apart:
    chain.append(optax.add_decayed_weights(vision_decay, mask=mask("vision")))
  if not vision_lr:
    return optax.chain(*chain, optax.scale_by_learning_rate(learning_rate_schedule(optim)))
  vision_optim = optim.copy_and_resolve_references()
  vision_optim.learning_rate = vision_lr
  labels = lambda p: hk.data_structures.map(
      lambda module, name, value: "vision" if models.component_of(module) == "vision" else "rest",
      p)
  return optax.chain(*chain, optax.multi_transform(
      {"vision": optax.scale_by_learning_rate(learning_rate_schedule(vision_optim)),
       "rest": optax.scale_by_learning_rate(learning_rate_schedule(optim))}, labels))


def unitwise_norm(x: jax.Array, stacked: int = 0) -> jax.Array:
  """Norm of each unit (output channel: the last axis) of a weight, over its other axes
  (conv [H, W, I, O]: over H, W, I); gains, biases and scalars: each element its own unit.
  The first `stacked` axes (scanned layers) are kept apart. Broadcasts against `x`."""
  if x.ndim - stacked <= 1:
    return jnp.abs(x)
  axes = tuple(range(stacked, x.ndim - 1))
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))


def adaptive_gradient_clipping(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
  """AGC (Brock et al. 2021): each unit's gradient is scaled down to at most `clipping` x
  max(its parameter's norm, eps). Knows the NFNet's scanned stages (nfnet.STACKED_MODULE)."""

  def update(updates, state, params):
    if params is None:
      raise ValueError("adaptive gradient clipping needs the parameters")

    def clip(module, name, grad):
      if isinstance(grad, optax.MaskedNode):      # another group's (optax.multi_transform)
        return grad
      stacked = 1 if nfnet.STACKED_MODULE.search(module) else 0
      param = params[module][name]
      max_norm = jnp.maximum(unitwise_norm(param, stacked), eps) * clipping
      grad_norm = unitwise_norm(grad, stacked)
      scale = jnp.minimum(1.0, max_norm / jnp.maximum(grad_norm, 1e-6))
      return (grad * scale).astype(grad.dtype)
    return hk.data_structures.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_contrastive_optimizer(optim: Any) -> optax.GradientTransformation:
  """docs/paper.md §5: AGC `optim.agc_clipping` on the NFNet, global-norm clipping
  `optim.text_clip_global_norm` on the text tower (encoder + projection); the image projection
  and the temperature are not clipped (AGC spares the final linear layer, as in NFNets);
  then Adam and `optim.schedule`."""
  labels = lambda p: hk.data_structures.map(
      lambda module, name, value: contrastive.contrastive_component_of(module), p)
  return optax.chain(
      optax.multi_transform({"vision": adaptive_gradient_clipping(optim.agc_clipping),
                             "text": optax.clip_by_global_norm(optim.text_clip_global_norm),
                             "head": optax.identity()}, labels),
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.scale_by_learning_rate(learning_rate_schedule(optim)),
  )
