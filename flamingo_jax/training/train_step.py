"""One train state, one step function (DESIGN.md §8; PAPER.md §3.2.3, §4).

    state = TrainState(step, params (trainable, f32), opt_state, rng)     # donated
    frozen = frozen params (LM, NFNet), stored in bf16 by default          # read-only
    state, metrics = step(state, frozen, {stream: batch})

Per-dataset accumulation: each stream m gives g_m = ∇ mean-NLL_m (over microbatches under
`lax.scan` when asked), the update uses Σ λ_m g_m (one AdamW step). `train.mixing =
"round_robin"` instead takes stream (step mod M) alone each step (the paper's ablation,
unweighted: Adam's normalisation would undo λ anyway). A non-finite loss or gradient
(`finite_loss` = 0), or an update whose new parameters or optimizer state are not finite, is
skipped (state unchanged but the step counter) with `skipped` = 1 in the metrics.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flamingo_jax import models
from flamingo_jax.data import schema
from flamingo_jax.training import losses
from flamingo_jax.training import optimizer as optimizer_lib
from flamingo_jax.training import precision
from flamingo_jax.training import sharding


class TrainState(NamedTuple):
  step: jax.Array            # int32 []
  params: hk.Params          # trainable parameters, float32
  opt_state: optax.OptState  # float32, ZeRO-1 sharded over 'data'
  rng: jax.Array             # PRNG key


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the loop (or the AOT compiler) needs, built once per config and mesh."""
  config: Any
  mesh: Mesh
  model: hk.Transformed
  optimizer: optax.GradientTransformation
  param_specs: hk.Params                # every parameter (trainable and frozen)
  state_shardings: TrainState
  frozen_shardings: hk.Params
  batch_shardings: dict
  abstract_state: TrainState
  abstract_frozen: hk.Params
  abstract_batches: dict
  init: Callable[[jax.Array], tuple[TrainState, hk.Params]]   # jitted, sharded outputs
  step: Callable[..., tuple[TrainState, dict]]                  # jitted, state donated
  # (params, frozen, batches, rng, step) -> (loss, {stream: loss}, {stream: tokens}, grads):
  # the gradient the step's update uses (jitted; for tests and debugging).
  gradients: Callable[..., tuple]


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


def spread_vision_batch(mesh: Mesh) -> models.VisionBatching:
  """The frozen NFNet is replicated over 'model' (partition rules), so left alone every model
  shard would encode the same images (16x the vision FLOPs on the 80B mesh). Instead each
  data shard's images are padded to a multiple of the model axis and split over it; the
  features are gathered back to the 'data' layout the resampler expects."""
  data, model = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
  both = NamedSharding(mesh, P((sharding.DATA, sharding.MODEL)))
  by_data = NamedSharding(mesh, P(sharding.DATA))

  def batching(encode, frames):
    total = frames.shape[0]
    if model == 1 or total % data:
      return encode(frames)
    per_shard = total // data
    padded = -(-per_shard // model) * model
    x = frames.reshape(data, per_shard, *frames.shape[1:])                     # [D, n, H, W, 3]
    x = jnp.pad(x, [(0, 0), (0, padded - per_shard)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(data * padded, *frames.shape[1:])                            # [D*n', H, W, 3]
    grid = encode(jax.lax.with_sharding_constraint(x, both))
    grid = jax.lax.with_sharding_constraint(grid, both)       # computed spread out, then
    grid = jax.lax.with_sharding_constraint(grid, by_data)    # gathered over 'model'
    grid = grid.reshape(data, padded, *grid.shape[1:])[:, :per_shard]         # [D, n, h, w, C]
    return grid.reshape(total, *grid.shape[2:])
  return batching


def make_train_setup(config: Any, mesh: Mesh | None = None, rules=None) -> TrainSetup:
  """Builds model, optimizer, shardings and the jitted init and step for `config` on `mesh`
  (`config.task = "contrastive"`: the vision pretraining stage's, training/contrastive.py)."""
  if config.get("task", "flamingo") == "contrastive":
    # Imported here: the contrastive stage is built from this module's pieces.
    from flamingo_jax.training import contrastive  # pylint: disable=g-import-not-at-top
    return contrastive.make_train_setup(config, mesh, rules)
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.model)
  data_axis, model_axis = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
  streams = list(config.data.streams.keys())
  microbatches = {name: int(config.train.microbatches.get(name, 1)) for name in streams}
  sharding.check_model_fits_mesh(config.model, model_axis)
  rules = sharding.rules_for(config.model, model_axis) if rules is None else rules
  sharding.check_batches_fit_mesh(config.data.streams, data_axis, microbatches)
  if config.train.mixing not in ("accumulate", "round_robin"):
    raise ValueError(f"train.mixing={config.train.mixing!r}; expected 'accumulate' or 'round_robin'")

  model = models.make_flamingo(config.model, compute_dtype=precision.dtype(config.precision.compute),
                               vision_batching=spread_vision_batch(mesh))
  tx = optimizer_lib.make_optimizer(config.optim)
  frozen_dtype = precision.dtype(config.precision.frozen_params)
  size = config.model.image_size

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, 8), jnp.int32),
                        jnp.zeros((1, 1, 1, size, size, 3), jnp.uint8))
    trainable, frozen = models.split_trainable(params, config.model)
    state = TrainState(step=jnp.int32(0), params=trainable, opt_state=tx.init(trainable),
                       rng=state_rng)
    return state, precision.cast(frozen, frozen_dtype)

  abstract_state, abstract_frozen = jax.eval_shape(init, jax.random.key(0))
  shardings = state_shardings_for(mesh, abstract_state, abstract_frozen, rules,
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

  update = make_update(config.optim, tx, shardings)

  def step_fn(state: TrainState, frozen: hk.Params, batches: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, per_loss, per_count, grads = gradients(state.params, frozen, batches, rng, state.step)
    new_state, metrics = update(state, loss, grads)
    for name in streams:
      metrics[f"loss/{name}"] = per_loss[name]
      metrics[f"tokens/{name}"] = per_count[name]
    return new_state, metrics

  return jit_setup(config, mesh, model, tx, shardings, abstract_state, abstract_frozen,
                   abstract_batches, init, step_fn, gradients)


class Shardings(NamedTuple):
  """Where a setup's parameters, state and batches live (`state_shardings_for`)."""
  specs: hk.Params                 # PartitionSpec of every parameter (trainable and frozen)
  params: hk.Params                # the trainable parameters, as the model uses them
  zero1: hk.Params                 # the same, also split over 'data' (ZeRO-1 update layout)
  state: TrainState
  frozen: hk.Params


def state_shardings_for(mesh: Mesh, abstract_state: TrainState, abstract_frozen: hk.Params,
                        rules, zero1_axis: int) -> Shardings:
  """Parameters by the partition rules; optimizer state also over 'data' (ZeRO-1, when
  `zero1_axis` > 1); step and rng replicated."""
  specs = sharding.param_specs(hk.data_structures.merge(abstract_state.params, abstract_frozen),
                               rules)
  param_sh = sharding.named(mesh, sharding.state_specs(abstract_state.params, specs))
  zero_sh = sharding.named(mesh, sharding.state_specs(abstract_state.params, specs,
                                                      zero1_data_axis=zero1_axis))
  state = TrainState(
      step=NamedSharding(mesh, P()), params=param_sh,
      opt_state=sharding.named(mesh, sharding.state_specs(abstract_state.opt_state, specs,
                                                          zero1_data_axis=zero1_axis)),
      rng=NamedSharding(mesh, P()))
  frozen = sharding.named(mesh, sharding.state_specs(abstract_frozen, specs))
  return Shardings(specs=specs, params=param_sh, zero1=zero_sh, state=state, frozen=frozen)


def make_update(optim: Any, tx: optax.GradientTransformation, shardings: Shardings) -> Callable:
  """(state, loss, grads) -> (next state, {loss, grad_norm, learning_rate, finite_loss,
  skipped}): one optimizer update in the ZeRO-1 layout, skipped when the loss or the
  gradients are not finite, or when it would make the state non-finite."""
  wsc = jax.lax.with_sharding_constraint
  schedule = optimizer_lib.learning_rate_schedule(optim)

  def update(state: TrainState, loss: jax.Array, grads: hk.Params):
    grad_norm = optax.global_norm(grads)
    # ZeRO-1: reduce-scatter the gradients, update the optimizer-state shards, all-gather.
    grads = wsc(grads, shardings.zero1)
    params_shard = wsc(state.params, shardings.zero1)
    updates, opt_state = tx.update(grads, state.opt_state, params_shard)
    params = wsc(optax.apply_updates(params_shard, updates), shardings.params)
    # The incoming parameters are judged by their loss; the update by the state it makes
    # (an update that overflows to Inf with a finite loss is rejected as well).
    finite_loss = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite_loss & all_finite((params, opt_state))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=state.rng)
    return new_state, {"loss": loss, "grad_norm": grad_norm,
                       "learning_rate": schedule(state.step),
                       "finite_loss": finite_loss.astype(jnp.int32),
                       "skipped": 1 - apply.astype(jnp.int32)}
  return update


def jit_setup(config: Any, mesh: Mesh, model: Any, tx: optax.GradientTransformation,
              shardings: Shardings, abstract_state: TrainState, abstract_frozen: hk.Params,
              abstract_batches: dict, init: Callable, step_fn: Callable,
              gradients: Callable) -> TrainSetup:
  """The TrainSetup of a model's init, step and gradient functions: jitted into their
  shardings, the state donated to the step."""
  batch_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P(sharding.DATA)), abstract_batches)
  replicated = NamedSharding(mesh, P())
  # Init runs once and is nearly all PRNG code, which XLA:CPU's optimiser spends ~20 s on for
  # the tiny config; unoptimised it compiles in half that. (Truncated-normal values may then
  # differ from an optimised compile in the last bit; every CPU init uses this setting.)
  init_options = ({"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu"
                  else None)
  jit_init = jax.jit(init, out_shardings=(shardings.state, shardings.frozen),
                     compiler_options=init_options)
  jit_step = jax.jit(step_fn, in_shardings=(shardings.state, shardings.frozen, batch_shardings),
                     out_shardings=(shardings.state, replicated), donate_argnums=(0,))
  return TrainSetup(config=config, mesh=mesh, model=model, optimizer=tx,
                    param_specs=shardings.specs, state_shardings=shardings.state,
                    frozen_shardings=shardings.frozen, batch_shardings=batch_shardings,
                    abstract_state=abstract_state, abstract_frozen=abstract_frozen,
                    abstract_batches=abstract_batches, init=jit_init, step=jit_step,
                    gradients=jax.jit(gradients))


def all_finite(tree) -> jax.Array:
  """True when every floating-point value of `tree` is finite (one fused reduction).

  The verdict leaves through a `lax.cond`: XLA otherwise fuses every leaf's reduction into
  each consumer of the verdict (the per-leaf selects of the update), which made the step of
  a model with ~130 trainable leaves take 80 s instead of 12 s to compile on CPU."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  verdict = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return jax.lax.cond(verdict, lambda: jnp.bool_(True), lambda: jnp.bool_(False))


def put_batches(setup: TrainSetup, batches: dict) -> dict:
  """Host numpy batches (the whole global batch, single process) -> sharded global arrays."""
  return jax.device_put(batches, setup.batch_shardings)
