"""One train state, one step function: what every task's step shares (docs/design.md §8).

    state = TrainState(step, params (trainable, f32), opt_state, rng)     # donated
    frozen = frozen params (LM, NFNet), stored in bf16 by default          # read-only
    state, metrics = setup.step(state, frozen, {stream: batch})          # tasks.make_train_setup

A task (training/tasks/) builds its model, gradients and optimizer; this module gives them
their shardings (`state_shardings_for`: ZeRO-1), the update (`make_update`: one optimizer
step in the ZeRO-1 layout, skipped — state unchanged but the step counter, `skipped` = 1 —
when the loss, the gradients or the new state are not finite) and the jitted init and step
(`jit_setup`), and spreads a frozen vision tower's batch over the mesh.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flamingo_jax import models
from flamingo_jax.models import splash
from flamingo_jax.training import optimizer as optimizer_lib
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
  jit_init = jax.jit(in_mesh(mesh, init), out_shardings=(shardings.state, shardings.frozen),
                     compiler_options=init_options)
  jit_step = jax.jit(in_mesh(mesh, step_fn),
                     in_shardings=(shardings.state, shardings.frozen, batch_shardings),
                     out_shardings=(shardings.state, replicated), donate_argnums=(0,))
  return TrainSetup(config=config, mesh=mesh, model=model, optimizer=tx,
                    param_specs=shardings.specs, state_shardings=shardings.state,
                    frozen_shardings=shardings.frozen, batch_shardings=batch_shardings,
                    abstract_state=abstract_state, abstract_frozen=abstract_frozen,
                    abstract_batches=abstract_batches, init=jit_init, step=jit_step,
                    gradients=jax.jit(in_mesh(mesh, gradients)))


def in_mesh(mesh: Mesh, fn: Callable) -> Callable:
  """`fn` traced for `mesh` (models/splash.traced_on): what splash attention shard_maps its
  kernel over, and whose platform (the target's, under an AOT compile) `attention_impl=auto`
  decides by. Everything else is partitioned by GSPMD as before."""
  @functools.wraps(fn)
  def traced(*args):
    with splash.traced_on(mesh):
      return fn(*args)
  return traced


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
