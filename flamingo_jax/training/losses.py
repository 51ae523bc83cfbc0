"""Per-stream loss (docs/paper.md Eq. 2, §10.5): mean token NLL over `loss_mask`; total Σ λ_m L_m."""

import jax
import jax.numpy as jnp
import optax


def masked_nll_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ mask·NLL, Σ mask) in float32; logits [B, L, V], targets/mask [B, L].

  Sums, not means, so microbatches add up exactly to the whole batch's mean.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)
