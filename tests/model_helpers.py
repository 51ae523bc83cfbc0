"""Small builders shared by the model tests."""

import haiku as hk
import jax.numpy as jnp
import numpy as np


def random_media(seed: int, shape) -> jnp.ndarray:
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, shape), jnp.uint8)


def token_row(length: int, image_positions, image_id: int, seed: int = 0,
              vocab: int = 512) -> np.ndarray:
  """Random ordinary tokens (ids >= 6) with `<image>` at the given positions."""
  row = np.random.RandomState(seed).randint(6, vocab, length)
  row[list(image_positions)] = image_id
  return row


def set_gates(params, value: float):
  """Sets every tanh-gate scalar (`alpha_*`) to `value` (init leaves them at 0)."""
  def fill(module, name, x):
    return jnp.full_like(x, value) if name.startswith("alpha") else x
  return hk.data_structures.map(fill, params)
