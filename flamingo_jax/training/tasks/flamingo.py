"""The Flamingo task (docs/paper.md §4): the model, its gradients and its setup.

Per-dataset accumulation: each stream m gives g_m = ∇ mean-NLL_m (over microbatches under
`lax.scan` when asked), the update uses Σ λ_m g_m (one AdamW step). `train.mixing =
"round_robin"` instead takes stream (step mod M) alone each step (the paper's ablation,
unweighted: Adam's normalisation would undo λ anyway).
"""

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flamingo_jax.data import schema
from flamingo_jax import models
from flamingo_jax.training import flops
from flamingo_jax.training import losses
from flamingo_jax.training import optimizer as optimizer_lib
from flamingo_jax.training import precision
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step

NAME = "flamingo"


def make_model(model_config: Any, **kwargs) -> hk.Transformed:
  """`models.make_flamingo` (compute_dtype, vision_batching)."""
  return models.make_flamingo(model_config, **kwargs)


def init_args(model_config: Any) -> tuple[jax.Array, jax.Array]:
  """Inputs that shape every parameter: 8 tokens and one image."""
  size = model_config.image_size
  return jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 1, 1, size, size, 3), jnp.uint8)


def stream_flops(model_config: Any, spec: Any) -> dict[str, float]:
  return flops.stream_train_flops(model_config, spec.batch_size, spec.max_tokens,
                                  spec.max_media, spec.frames)


def _microbatch(batch: dict, count: int) -> dict:
  """[B, ...] -> [count, B/count, ...], microbatch m = rows m, m+count, ... so that every
  data shard holds an equal part of each microbatch."""
  def split(x):
    b = x.shape[0]
    return x.reshape(b // count, count, *x.shape[1:]).swapaxes(0, 1)  # [M, B/M, ...]
  return jax.tree.map(split, batch)


def make_loss_and_grads(config: Any, model: hk.Transformed) -> Callable:
  """(params, frozen, batch, rng, microbatches, weight=1, into=None) -> (mean NLL, token count,
  weight × mean grads); with `into`, the gradients are added into it as they arrive."""
  compute = precision.dtype(config.precision.compute)

  def nll_sum(params, frozen, batch, rng, scale=1.0):
    merged = hk.data_structures.merge(precision.cast(params, compute),
                                      precision.cast(frozen, compute))
    logits = model.apply(merged, rng, batch["input_ids"], batch["media"], is_training=True)
    total, count = losses.masked_nll_sum(logits, batch["target_ids"], batch["loss_mask"])
    return total * scale, (total, count)

  grad_fn = jax.value_and_grad(nll_sum, has_aux=True)

  def loss_and_grads(params, frozen, batch, rng, microbatches: int, weight=1.0, into=None):
    if into is not None:
      # train.accumulate_in_place: the stream's token count is known from its mask before any
      # backward pass, so each microbatch's gradient arrives scaled (weight / count) and is
      # added straight into the running sum `into`: no per-stream accumulator or scaled copy.
      count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
      scale = weight / jnp.maximum(count, 1.0)
      def body(carry, xs):
        mb, index = xs
        (_, (total, _)), grads = grad_fn(params, frozen, mb, jax.random.fold_in(rng, index),
                                         scale)
        return (carry[0] + total, jax.tree.map(jnp.add, carry[1], grads)), None
      (total, grads), _ = jax.lax.scan(
          body, (jnp.float32(0), into),
          (_microbatch(batch, microbatches), jnp.arange(microbatches)))
      return total / jnp.maximum(count, 1.0), count, grads
    if microbatches == 1:
      (_, (total, count)), grads = grad_fn(params, frozen, batch, rng)
    else:
      def body(carry, xs):
        mb, index = xs
        (_, (total, count)), grads = grad_fn(params, frozen, mb, jax.random.fold_in(rng, index))
        acc_total, acc_count, acc_grads = carry
        return (acc_total + total, acc_count + count,
                jax.tree.map(jnp.add, acc_grads, grads)), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      (total, count, grads), _ = jax.lax.scan(
          body, (jnp.float32(0), jnp.float32(0), zeros),
          (_microbatch(batch, microbatches), jnp.arange(microbatches)))
    denom = jnp.maximum(count, 1.0)
    return total / denom, count, jax.tree.map(lambda g: weight * (g / denom), grads)

  return loss_and_grads


def make_setup(config: Any, mesh: Mesh | None = None, rules=None) -> train_step.TrainSetup:
  """Model, optimizer, shardings and the jitted init and step of a Flamingo `config` on
  `mesh`."""
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.model)
  data_axis, model_axis = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
  streams = list(config.data.streams.keys())
  microbatches = {name: int(config.train.microbatches.get(name, 1)) for name in streams}
  sharding.check_model_fits_mesh(config.model, model_axis)
  rules = sharding.rules_for(config.model, model_axis) if rules is None else rules
  sharding.check_batches_fit_mesh(config.data.streams, data_axis, microbatches)
  if config.train.mixing not in ("accumulate", "round_robin"):
    raise ValueError(f"train.mixing={config.train.mixing!r}; expected 'accumulate' or 'round_robin'")

  model = make_model(config.model, compute_dtype=precision.dtype(config.precision.compute),
                     vision_batching=train_step.spread_vision_batch(mesh))
  tx = optimizer_lib.make_optimizer(config.optim)
  frozen_dtype = precision.dtype(config.precision.frozen_params)

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, *init_args(config.model))
    trainable, frozen = models.split_trainable(params, config.model)
    state = train_step.TrainState(step=jnp.int32(0), params=trainable,
                                  opt_state=tx.init(trainable), rng=state_rng)
    return state, precision.cast(frozen, frozen_dtype)

  abstract_state, abstract_frozen = jax.eval_shape(init, jax.random.key(0))
  shardings = train_step.state_shardings_for(mesh, abstract_state, abstract_frozen, rules,
                                             zero1_axis=data_axis if config.train.zero1 else 1)
  abstract_batches = schema.batch_shapes(config)
  loss_and_grads = make_loss_and_grads(config, model)
  weights = {name: float(config.data.streams[name].weight) for name in streams}
  def accumulate(params, frozen, batches, rng):
    losses_, counts = {}, {}
    in_place = config.train.get("accumulate_in_place", False)
    total = jax.tree.map(jnp.zeros_like, params) if in_place else None
    for index, name in enumerate(streams):
      stream_rng = jax.random.fold_in(rng, index)
      if in_place:
        loss, count, total = loss_and_grads(params, frozen, batches[name], stream_rng,
                                            microbatches[name], weights[name], total)
      else:
        loss, count, grads = loss_and_grads(params, frozen, batches[name], stream_rng,
                                            microbatches[name], weights[name])
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
      losses_[name], counts[name] = loss, count
    loss = sum(weights[name] * losses_[name] for name in streams)
    return loss, losses_, counts, total

  def round_robin(params, frozen, batches, rng, step):
    def branch(index):
      name = streams[index]
      def run():
        loss, count, grads = loss_and_grads(params, frozen, batches[name],
                                            jax.random.fold_in(rng, index), microbatches[name])
        zero = jnp.float32(0)
        per_loss = {n: loss if n == name else zero for n in streams}
        per_count = {n: count if n == name else zero for n in streams}
        return loss, per_loss, per_count, grads
      return run
    return jax.lax.switch(step % len(streams), [branch(i) for i in range(len(streams))])

  def gradients(params, frozen, batches, rng, step):
    if config.train.mixing == "accumulate":
      return accumulate(params, frozen, batches, rng)
    return round_robin(params, frozen, batches, rng, step)

  update = train_step.make_update(config.optim, tx, shardings)

  def step_fn(state: train_step.TrainState, frozen: hk.Params, batches: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, per_loss, per_count, grads = gradients(state.params, frozen, batches, rng, state.step)
    new_state, metrics = update(state, loss, grads)
    for name in streams:
      metrics[f"loss/{name}"] = per_loss[name]
      metrics[f"tokens/{name}"] = per_count[name]
    return new_state, metrics

  return train_step.jit_setup(config, mesh, model, tx, shardings, abstract_state,
                              abstract_frozen, abstract_batches, init, step_fn, gradients)
