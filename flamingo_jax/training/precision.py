"""Mixed precision (docs/paper.md §4, docs/design.md §8).

Trainable parameters and optimizer state: float32. Frozen towers: stored in
`config.precision.frozen_params` (bfloat16 by default). Compute: every parameter is cast
to `config.precision.compute` at use, so activations and gradients flow in that dtype and
gradients arrive back in float32 at the cast. Norms, softmax and the loss run in float32
inside the model and the loss.
"""

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def dtype(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise ValueError(f"unknown precision {name!r}; expected one of {sorted(DTYPES)}")
  return jnp.dtype(DTYPES[name])


def cast(tree: Any, to: jnp.dtype) -> Any:
  """Casts floating leaves of `tree` to `to` (integers untouched)."""
  return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
