"""The contrastive task: vision pretraining (docs/paper.md §5), its loss and its setup.

    setup = tasks.make_train_setup(config, mesh)          # config.task == "contrastive"
    state, metrics = setup.step(state, {}, {stream: batch})

The same TrainSetup as Flamingo's (train_step.py), so the trainer, checkpoints, preemption,
metrics, multi-host input and `aot_compile` run it unchanged: every parameter trains
(nothing is frozen); the batches are the image-text streams of the batch schema (the text
tower reads `input_ids` where `loss_mask` is set: `<image>`, the caption, `<EOC>`).

Loss: the two-way softmax over **global** in-batch negatives — each device's embeddings
are all-gathered over 'data' and its rows of the [N, N] similarity matrix are computed
against all N — with label smoothing; ALIGN and LTIP (every stream of the config) each give
one gradient computation, summed with the streams' weights into one Adam update.
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flamingo_jax.data import schema
from flamingo_jax.models import contrastive as contrastive_model
from flamingo_jax.training import flops
from flamingo_jax.training import optimizer as optimizer_lib
from flamingo_jax.training import precision
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, inverse_temperature: jax.Array,
                     label_smoothing: float = 0.0,
                     logits_sharding: NamedSharding | None = None) -> tuple[jax.Array, dict]:
  """docs/paper.md §5: −(1/N) Σ_i Σ_j y_ij log softmax_j(β L_iᵀV_j), plus the same with images
  and texts swapped; y = (1 − s)·I + s/N (label smoothing s). Embeddings [N, E] (normalised).
  -> (loss, {"image_to_text", "text_to_image": each direction's term, "accuracy": share of
  images whose own text scores highest}). `logits_sharding`: where the [N, N] similarities
  live (training: rows over 'data', so no device holds all N² of them)."""
  logits = inverse_temperature * jnp.einsum("ie,je->ij", image_emb.astype(jnp.float32),
                                            text_emb.astype(jnp.float32))     # [N images, N texts]
  if logits_sharding is not None:
    logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
  n = logits.shape[0]
  targets = (1.0 - label_smoothing) * jnp.eye(n, dtype=jnp.float32) + label_smoothing / n
  image_to_text = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1))
  text_to_image = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=0), axis=0))
  accuracy = jnp.mean((jnp.argmax(logits, axis=1) == jnp.arange(n)).astype(jnp.float32))
  return image_to_text + text_to_image, {"image_to_text": image_to_text,
                                         "text_to_image": text_to_image, "accuracy": accuracy}


def check_model_fits_mesh(model_config: Any, model_axis: int) -> None:
  t = model_config.text
  split = {"model.vocab_size": model_config.vocab_size, "model.text.num_heads": t.num_heads,
           "model.text.ffw_size": t.ffw_size}
  bad = {k: v for k, v in split.items() if v % model_axis}
  if bad:
    raise ValueError(f"mesh model={model_axis} does not divide " +
                     ", ".join(f"{k}={v}" for k, v in bad.items()))


def _check_config(config: Any) -> None:
  for name, spec in config.data.streams.items():
    if spec.source != "image_text" or spec.max_media != 1 or spec.frames != 1:
      raise ValueError(f"contrastive stream {name!r} must be image_text pairs with max_media=1 "
                       f"and frames=1 (got source={spec.source!r}, max_media={spec.max_media}, "
                       f"frames={spec.frames})")
    if spec.max_tokens > config.model.text.max_length:
      raise ValueError(f"stream {name!r} has max_tokens={spec.max_tokens} > "
                       f"model.text.max_length={config.model.text.max_length}")
    if int(config.train.microbatches.get(name, 1)) != 1:
      raise ValueError(f"stream {name!r}: microbatches are not supported by the contrastive "
                       f"loss (its negatives span the whole batch); use a smaller batch per "
                       f"step or more devices")
  if config.model.vision.get("init_checkpoint"):
    raise ValueError("config.model.vision.init_checkpoint is set, but contrastive pretraining "
                     "trains its NFNet from scratch (docs/paper.md §5); continue a contrastive run "
                     "by its --workdir instead")
  if config.train.mixing != "accumulate":
    raise ValueError(f"train.mixing={config.train.mixing!r}; the contrastive stage accumulates "
                     f"its streams' gradients (docs/paper.md §5)")


NAME = "contrastive"


def make_model(model_config: Any, **kwargs) -> hk.Transformed:
  """`models.contrastive.make_contrastive` (compute_dtype, vision_batching)."""
  return contrastive_model.make_contrastive(model_config, **kwargs)


def init_args(model_config: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inputs that shape every parameter: a caption of max_length tokens and one image."""
  size, length = model_config.image_size, model_config.text.max_length
  return (jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.float32),
          jnp.zeros((1, 1, 1, size, size, 3), jnp.uint8))


def split(params: hk.Params, model_config: Any) -> tuple[hk.Params, hk.Params]:
  """Everything trains (the vision tower from scratch, the text tower): nothing frozen."""
  del model_config
  return params, {}


def stream_flops(model_config: Any, spec: Any) -> dict[str, float]:
  return flops.contrastive_stream_flops(model_config, spec.batch_size, spec.max_tokens)


def make_setup(config: Any, mesh: Mesh | None = None, rules=None) -> train_step.TrainSetup:
  """Model, optimizer, shardings and the jitted init and step of the contrastive stage."""
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.model)
  data_axis, model_axis = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
  streams = list(config.data.streams.keys())
  _check_config(config)
  check_model_fits_mesh(config.model, model_axis)
  sharding.check_batches_fit_mesh(config.data.streams, data_axis, {})
  rules = sharding.PARTITION_RULES if rules is None else rules

  model = make_model(config.model, compute_dtype=precision.dtype(config.precision.compute),
                     vision_batching=train_step.spread_vision_batch(mesh))
  tx = optimizer_lib.make_contrastive_optimizer(config.optim)

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, *init_args(config.model))
    state = train_step.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                  rng=state_rng)
    return state, {}

  abstract_state, abstract_frozen = jax.eval_shape(init, jax.random.key(0))
  shardings = train_step.state_shardings_for(
      mesh, abstract_state, abstract_frozen, rules,
      zero1_axis=data_axis if config.train.zero1 else 1)
  abstract_batches = schema.batch_shapes(config)
  compute = precision.dtype(config.precision.compute)
  smoothing = float(config.train.label_smoothing)
  weights = {name: float(config.data.streams[name].weight) for name in streams}
  rows = NamedSharding(mesh, P(sharding.DATA, None))

  def stream_loss(params, batch, rng):
    image_emb, text_emb, beta = model.apply(precision.cast(params, compute), rng,
                                            batch["input_ids"], batch["loss_mask"],
                                            batch["media"], is_training=True)
    # Global negatives: each data shard's rows of the similarities span the whole batch
    # (the other shards' embeddings are all-gathered; the text->image softmax over images
    # reduces across shards).
    loss, parts = contrastive_loss(image_emb, text_emb, beta, smoothing, logits_sharding=rows)
    return loss, dict(parts, inverse_temperature=beta)

  grad_fn = jax.value_and_grad(stream_loss, has_aux=True)

  def gradients(params, frozen, batches, rng, step):
    del frozen, step
    total, losses, parts = None, {}, {}
    for index, name in enumerate(streams):
      (loss, aux), grads = grad_fn(params, batches[name], jax.random.fold_in(rng, index))
      grads = jax.tree.map(lambda g, w=weights[name]: w * g, grads)
      total = grads if total is None else jax.tree.map(jnp.add, total, grads)
      losses[name], parts[name] = loss, aux
    loss = sum(weights[name] * losses[name] for name in streams)
    return loss, losses, parts, total

  update = train_step.make_update(config.optim, tx, shardings)

  def step_fn(state, frozen, batches):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, losses, parts, grads = gradients(state.params, frozen, batches, rng, state.step)
    new_state, metrics = update(state, loss, grads)
    for name in streams:
      metrics[f"loss/{name}"] = losses[name]
      metrics[f"accuracy/{name}"] = parts[name]["accuracy"]
    metrics["inverse_temperature"] = parts[streams[0]]["inverse_temperature"]
    return new_state, metrics

  return train_step.jit_setup(config, mesh, model, tx, shardings, abstract_state,
                              abstract_frozen, abstract_batches, init, step_fn, gradients)


def export_vision(params: hk.Params) -> hk.Params:
  """The NFNet of a contrastive model's parameters under Flamingo's paths
  (`contrastive/vision_encoder/...` -> `flamingo/vision_encoder/...`): what a Flamingo
  run's `vision.init_checkpoint` loads."""
  prefix = contrastive_model.MODULE + "/vision_encoder"
  out = {"flamingo/vision_encoder" + module[len(prefix):]: dict(leaves)
         for module, leaves in params.items() if module.startswith(prefix)}
  if not out:
    raise ValueError("these parameters hold no contrastive vision encoder "
                     f"({contrastive_model.MODULE}/vision_encoder/...)")
  return out
