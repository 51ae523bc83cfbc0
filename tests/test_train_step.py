"""The distributed train step (docs/design.md §8): mesh equivalence, accumulation, freezing, ZeRO-1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flamingo_jax.data import schema
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training.tasks import flamingo as flamingo_task
from flamingo_jax.training import train_step
from train_helpers import global_relative_error, leaves_by_path, max_leaf_relative_error, relative_error, run, two_stream, with_overrides


@pytest.fixture(scope="module")
def reference(tiny_config):
  """Tiny config (m3w images + vtp video), float32 compute, one device, 3 steps."""
  return run(two_stream(tiny_config), 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("data,model", [(4, 2), (2, 4)])
def test_sharded_runs_match_one_device_float32(tiny_config, reference, data, model):
  ref_metrics, ref_state, *_ = reference
  metrics, state, _, _, setup = run(two_stream(tiny_config), data, model)
  for ref, got in zip(ref_metrics, metrics):
    for key in ("loss", "grad_norm", "loss/m3w", "loss/vtp"):
      assert relative_error(got[key], ref[key]) < 1e-5, (key, got[key], ref[key])
  assert global_relative_error(state.params, ref_state.params) < 1e-5
  # Zero-initialised leaves (norm offsets, ~6e-5 after 3 steps) are pure Adam steps, whose
  # g/sqrt(v) amplifies reduction-order noise: each leaf within 5e-5.
  assert max_leaf_relative_error(state.params, ref_state.params) < 5e-5
  # The Megatron split really happened: FFW-in column-parallel, ZeRO-1 on Adam's moments.
  ffw_in = "flamingo/language_model/groups/xattn/ffw"
  state_sh = setup.state_shardings
  assert state_sh.params[f"{ffw_in}/ffw_in"]["w"].spec == jax.sharding.PartitionSpec(None, None, "model")
  mu = state_sh.opt_state[1].mu[f"{ffw_in}/ffw_in"]["w"]
  assert "data" in mu.spec and "model" in mu.spec


@pytest.mark.slow
def test_sharded_bfloat16_run_tracks_one_device_float32(tiny_config, reference):
  """bf16 activations and frozen towers on a 4x2 mesh against the float32 one-device run:
  loss and gradient norm within 2e-2 (measured: loss 1e-4, gradient norm 1.3e-3)."""
  config = with_overrides(two_stream(tiny_config), **{"precision.compute": "bfloat16",
                                                       "precision.frozen_params": "bfloat16"})
  ref_metrics, ref_state, *_ = reference
  metrics, state, _, frozen, _ = run(config, 4, 2)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {np.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
  for ref, got in zip(ref_metrics, metrics):
    assert relative_error(got["loss"], ref["loss"]) < 2e-2, (got["loss"], ref["loss"])
    assert relative_error(got["grad_norm"], ref["grad_norm"]) < 2e-2, (got, ref)
  # Whole parameter vector: zero-initialised leaves are pure Adam steps (see float32 test).
  assert global_relative_error(state.params, ref_state.params) < 2e-2


def test_frozen_parameters_stay_bit_identical_and_trainable_ones_move(tiny_config, reference):
  _, state, frozen_before, frozen_after, setup = reference
  first = jax.device_get(setup.init(jax.random.key(tiny_config.seed))[0].params)
  frozen_paths = set(leaves_by_path(frozen_before))
  assert any("vision_encoder" in p for p in frozen_paths)
  assert any("groups/blocks/block" in p for p in frozen_paths)
  assert not any("vision_encoder" in p or "/blocks/" in p for p in leaves_by_path(state.params))
  for path, value in leaves_by_path(frozen_before).items():
    np.testing.assert_array_equal(leaves_by_path(frozen_after)[path], value, err_msg=path)
  before, after = leaves_by_path(first), leaves_by_path(state.params)
  unmoved = [p for p in before if np.array_equal(before[p], after[p])]
  assert not unmoved, unmoved
  # Optimizer state exists only for trainable parameters.
  mu = state.opt_state[1].mu
  assert set(leaves_by_path(mu)) == set(before)



@pytest.mark.slow
def test_update_is_sum_of_weighted_stream_gradients(tiny_config):
  # No warm-up: the learning rate at step 0 is then not 0, so the update is not trivially 0.
  config = with_overrides(two_stream(tiny_config), **{"optim.warmup_steps": 0})
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  setup = tasks.make_train_setup(config, mesh)
  state, frozen = setup.init(jax.random.key(0))
  params0, opt0 = jax.device_get(state.params), jax.device_get(state.opt_state)
  batches = schema.random_batches(config, seed=7)
  sharded = train_step.put_batches(setup, batches)
  rng = jax.random.fold_in(state.rng, 0)       # the step's rng at step 0

  # Reference: each stream alone, its own jit, weighted and summed here.
  loss_and_grads = jax.jit(flamingo_task.make_loss_and_grads(config, setup.model), static_argnums=4)
  stream_grads = {}
  for index, name in enumerate(config.data.streams):
    _, _, stream_grads[name] = loss_and_grads(params0, frozen, batches[name],
                                              jax.random.fold_in(rng, index), 1)
  weights = {name: config.data.streams[name].weight for name in config.data.streams}
  assert len(set(weights.values())) > 1        # λ differ, so a wrong weighting shows
  expected_grads = jax.tree.map(lambda *g: sum(weights[n] * x for n, x in zip(weights, g)),
                                *stream_grads.values())

  # The step applies one AdamW update with those gradients. (Updates are ~1e-4 of the
  # parameters, so compare parameters to float32 rounding rather than differences.)
  updates, _ = setup.optimizer.update(expected_grads, opt0, params0)
  new_state, metrics = setup.step(state, frozen, sharded)
  assert relative_error(metrics["grad_norm"], optax.global_norm(expected_grads)) < 1e-5
  assert max_leaf_relative_error(jax.device_get(new_state.params),
                                 optax.apply_updates(params0, updates)) < 1e-6

  # The accumulated gradients, split into microbatches (2 for m3w, 4 for vtp) on a 2-way data
  # mesh, are the weighted sum: microbatching and the mesh change nothing.
  micro = with_overrides(config, **{"train.microbatches.m3w": 2, "train.microbatches.vtp": 4})
  micro_setup = tasks.make_train_setup(micro, sharding.make_mesh(2, 1, jax.devices()[:2]))
  micro_loss, _, micro_counts, micro_grads = micro_setup.gradients(
      params0, jax.device_get(frozen), train_step.put_batches(micro_setup, batches), rng, 0)
  assert relative_error(micro_loss, metrics["loss"]) < 1e-5
  assert float(micro_counts["vtp"]) == float(metrics["tokens/vtp"])
  assert max_leaf_relative_error(jax.device_get(micro_grads), expected_grads) < 1e-5

  # Round-robin: step s trains on stream s mod M alone, unweighted.
  rr = with_overrides(config, **{"train.mixing": "round_robin"})
  rr_setup = tasks.make_train_setup(rr, mesh)
  names = list(config.data.streams)
  for step in (0, 1, 2):
    name = names[step % len(names)]
    _, _, counts, rr_grads = rr_setup.gradients(params0, frozen, sharded, rng, step)
    rr_grads = jax.device_get(rr_grads)
    assert max_leaf_relative_error(rr_grads, stream_grads[name]) < 1e-5, step
    assert global_relative_error(rr_grads, expected_grads) > 1e-2
    assert all((float(counts[n]) > 0) == (n == name) for n in names), (step, counts)


@pytest.mark.slow
def test_accumulating_in_place_gives_the_same_gradients(tiny_config):
  """train.accumulate_in_place (one running sum, each microbatch's gradient scaled by
  λ / tokens as it arrives) computes the per-stream sums' losses, counts and gradients."""
  config = with_overrides(two_stream(tiny_config), **{"train.microbatches.m3w": 2})
  batches = schema.random_batches(config, seed=3)
  results = []
  for in_place in (False, True):
    mode = with_overrides(config, **{"train.accumulate_in_place": in_place})
    setup = tasks.make_train_setup(mode, sharding.make_mesh(1, 1, jax.devices()[:1]))
    state, frozen = setup.init(jax.random.key(0))
    results.append(jax.device_get(setup.gradients(
        state.params, frozen, train_step.put_batches(setup, batches), jax.random.key(5), 0)))
  (loss, per_loss, counts, grads), (loss2, per_loss2, counts2, grads2) = results
  assert relative_error(loss2, loss) < 1e-6
  assert counts2 == counts and all(relative_error(per_loss2[n], per_loss[n]) < 1e-6
                                   for n in per_loss)
  assert max_leaf_relative_error(grads2, grads) < 1e-5
  assert global_relative_error(grads2, grads) < 1e-6


@pytest.mark.slow
def test_zero1_shards_optimizer_state_eightfold(tiny_config):
  """Compiled argument bytes with and without ZeRO-1 on 8 devices (data=8)."""
  def argument_bytes(zero1):
    config = with_overrides(two_stream(tiny_config), **{"train.zero1": zero1})
    setup = tasks.make_train_setup(config, sharding.make_mesh(8, 1))
    compiled = setup.step.lower(setup.abstract_state, setup.abstract_frozen,
                                setup.abstract_batches).compile()
    return compiled.memory_analysis().argument_size_in_bytes, setup

  replicated, setup = argument_bytes(False)
  sharded, _ = argument_bytes(True)
  opt_full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state.opt_state))
  opt_per_device = opt_full - (replicated - sharded)
  assert abs(opt_per_device - opt_full / 8) <= 0.15 * opt_full / 8, (opt_per_device, opt_full)
