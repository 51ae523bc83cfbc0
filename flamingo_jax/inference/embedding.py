"""A contrastive model's two towers as batched, jitted embedders (retrieval, zero-shot).

    embed = Embedder(config.model, params)
    image_emb = embed.images(uint8 [N, H, W, 3])            # float32 [N, E], L2-normalised
    text_emb = embed.texts(input_ids [N, L], text_mask [N, L])

Inputs are cut into batches of `batch_size` rows, the last one padded, so each tower
compiles once.
"""

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import contrastive


def _batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
  n = len(arrays[0])
  out = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    rows = len(chunk[0])
    padded = [np.concatenate([c, np.zeros((batch_size - rows,) + c.shape[1:], c.dtype)])
              for c in chunk]
    out.append(np.asarray(fn(*padded))[:rows])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class Embedder:
  """Image and text embeddings of a contrastive model (models/contrastive.py)."""

  def __init__(self, model_config: Any, params: hk.Params, *, batch_size: int = 64,
               compute_dtype: Any = jnp.float32):
    stages = contrastive.make_contrastive_stages(model_config, compute_dtype=compute_dtype)
    self.config = model_config
    self.batch_size = batch_size
    self._images = jax.jit(lambda images: stages.apply.embed_images(params, None, images))
    self._texts = jax.jit(lambda ids, mask: stages.apply.embed_texts(params, None, ids, mask))

  def images(self, images: np.ndarray) -> np.ndarray:
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images must be uint8 [N, {size}, {size}, 3], got {images.shape}")
    return _batched(self._images, (images,), self.batch_size)

  def texts(self, input_ids: np.ndarray, text_mask: np.ndarray) -> np.ndarray:
    return _batched(self._texts, (input_ids, text_mask), self.batch_size)
