"""The contrastive dual encoder that pretrains the vision tower (docs/paper.md §5).

    image_emb, text_emb, beta = model.apply(params, rng, input_ids, text_mask, media,
                                            is_training=True)

Image tower: the NFNet (same module and paths as inside Flamingo: `vision_encoder/...`, so
the trained tower loads into a Flamingo run unchanged), its final grid mean-pooled. Text
tower: a BERT-style encoder (text_encoder.py), mean-pooled over `text_mask`. Each pooled
vector is projected linearly to `embed_dim` (1376 in the paper; the projection's form is
unspecified) and L2-normalised. `beta` is the learnable inverse temperature, stored as its
log (started at CLIP's 1/0.07, capped at 100 as in CLIP; the paper gives neither).

Parameters: `contrastive/{vision_encoder, text_encoder, image_projection, text_projection}`
and `contrastive/log_inverse_temperature`; `contrastive_component_of` names their parts.
"""

import re
from typing import Any, Callable, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import attention
from flamingo_jax.models import flamingo
from flamingo_jax.models import text_encoder

MAX_INVERSE_TEMPERATURE = 100.0
INITIAL_INVERSE_TEMPERATURE = 1.0 / 0.07
MODULE = "contrastive"


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))


class ContrastiveModel(hk.Module):
  """NFNet + text encoder, each pooled, projected and normalised."""

  def __init__(self, config: Any, *, compute_dtype: Any = jnp.float32,
               vision_batching: Optional[flamingo.VisionBatching] = None):
    super().__init__(name=MODULE)
    self.config = config
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.vision_batching = vision_batching or (lambda encode, frames: encode(frames))

  def _dtype(self):
    # Parameters are created in float32 whatever the compute dtype (as in Flamingo).
    return jnp.float32 if hk.running_init() else self.compute_dtype

  @hk.name_like("__call__")
  def embed_images(self, images: jax.Array, *, is_training: bool = False) -> jax.Array:
    """uint8 [N, H, W, 3] -> L2-normalised float32 [N, embed_dim]."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3] uint8, got shape {images.shape}")
    vision = self.config.vision
    if vision.get("kind", "nfnet") != "nfnet":
      raise ValueError(f"contrastive pretraining trains an NFNet; config.model.vision.kind="
                       f"{vision.kind!r}")
    encoder = flamingo.nfnet_encoder(vision)
    pixels = flamingo.normalize_pixels(images, self._dtype(),
                                       vision.get("pixel_stats", "imagenet"))
    grid = self.vision_batching(lambda x: encoder(x, is_training=is_training), pixels)
    pooled = jnp.mean(grid.astype(jnp.float32), axis=(1, 2))                    # [N, C]
    projected = attention.Linear(self.config.embed_dim, name="image_projection")(
        pooled.astype(self._dtype()))
    return l2_normalize(projected)

  @hk.name_like("__call__")
  def embed_texts(self, input_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    """int32 [N, L] and the tokens that count [N, L] -> L2-normalised float32 [N, embed_dim]."""
    t = self.config.text
    features = text_encoder.TextEncoder(
        vocab_size=self.config.vocab_size, num_layers=t.num_layers, dim=t.dim,
        num_heads=t.num_heads, ffw_size=t.ffw_size, max_length=t.max_length,
        attention_impl=self.config.get("attention_impl", "einsum"))(input_ids, text_mask > 0)
    weights = (text_mask > 0).astype(jnp.float32)[..., None]                      # [N, L, 1]
    pooled = (jnp.sum(features.astype(jnp.float32) * weights, axis=1)
              / jnp.maximum(jnp.sum(weights, axis=1), 1.0))                      # [N, D]
    projected = attention.Linear(self.config.embed_dim, name="text_projection")(
        pooled.astype(self._dtype()))
    return l2_normalize(projected)

  @hk.name_like("__call__")
  def inverse_temperature(self) -> jax.Array:
    log_beta = hk.get_parameter("log_inverse_temperature", [], jnp.float32,
                                init=hk.initializers.Constant(np.log(INITIAL_INVERSE_TEMPERATURE)))
    return jnp.minimum(jnp.exp(log_beta.astype(jnp.float32)), MAX_INVERSE_TEMPERATURE)

  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, media: jax.Array, *,
               is_training: bool = False):
    """media uint8 [N, 1, 1, H, W, 3] (one image per pair: the batch schema) ->
    (image embeddings, text embeddings [N, embed_dim], inverse temperature [])."""
    if media.ndim != 6 or media.shape[1:3] != (1, 1):
      raise ValueError(f"contrastive pairs need media [N, 1, 1, H, W, 3] (one image each), "
                       f"got {media.shape}")
    images = self.embed_images(media[:, 0, 0], is_training=is_training)
    return images, self.embed_texts(input_ids, text_mask), self.inverse_temperature()


def make_contrastive(config: Any, *, compute_dtype: Any = jnp.float32,
                     vision_batching: Optional[flamingo.VisionBatching] = None) -> hk.Transformed:
  """init(rng, input_ids, text_mask, media); apply(params, rng, ..., is_training)."""

  def forward(input_ids, text_mask, media, is_training: bool = False):
    return ContrastiveModel(config, compute_dtype=compute_dtype,
                            vision_batching=vision_batching)(input_ids, text_mask, media,
                                                             is_training=is_training)
  return hk.transform(forward)


class ContrastiveStages(NamedTuple):
  embed_images: Callable    # (params, rng, images [N, H, W, 3]) -> [N, E]
  embed_texts: Callable     # (params, rng, input_ids [N, L], text_mask [N, L]) -> [N, E]


def make_contrastive_stages(config: Any, *, compute_dtype: Any = jnp.float32) -> hk.MultiTransformed:
  """Same parameters as `make_contrastive`, each tower on its own (retrieval)."""

  def stages():
    model = ContrastiveModel(config, compute_dtype=compute_dtype)
    def init(input_ids, text_mask, media):
      return model(input_ids, text_mask, media)
    return init, ContrastiveStages(model.embed_images, model.embed_texts)
  return hk.multi_transform(stages)


# The parts that the optimizer treats differently (training/tasks/contrastive.py).
CONTRASTIVE_COMPONENTS = ("vision", "text", "head")
_VISION_PATTERN = re.compile(r"(^|/)vision_encoder(/|$)")
_TEXT_PATTERN = re.compile(r"(^|/)(text_encoder|text_projection)(/|$)")


def contrastive_component_of(module_path: str) -> str:
  """'vision' (the NFNet) | 'text' (text encoder + its projection) | 'head' (the image
  projection and the temperature)."""
  if not module_path.startswith(MODULE):
    raise ValueError(f"parameter path {module_path!r} is not part of the contrastive model")
  if _VISION_PATTERN.search(module_path):
    return "vision"
  return "text" if _TEXT_PATTERN.search(module_path) else "head"


def param_shapes(config: Any) -> hk.Params:
  size = config.image_size
  length = config.text.max_length
  return jax.eval_shape(make_contrastive(config).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, length), jnp.int32),
                        jax.ShapeDtypeStruct((1, length), jnp.float32),
                        jax.ShapeDtypeStruct((1, 1, 1, size, size, 3), jnp.uint8))


def count_params(config: Any) -> dict[str, int]:
  """{"vision", "text", "head", "total", "trainable", "frozen"} from shapes (all trainable)."""
  counts = dict.fromkeys(CONTRASTIVE_COMPONENTS + ("total", "trainable", "frozen"), 0)
  for module, _, value in hk.data_structures.traverse(param_shapes(config)):
    size = int(np.prod(value.shape))
    counts[contrastive_component_of(module)] += size
    counts["total"] += size
    counts["trainable"] += size
  return counts
