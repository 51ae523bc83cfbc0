"""Parity checks of imported weights: our float32 logits, or an imported vision tower's grid,
against a reference's (tools/check_logits; the import tests). The caller loads the
parameters (training/param_sources.load)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import models


def default_input_ids(model_config: Any) -> np.ndarray:
  """A fixed random int32 [2, 16] batch of ordinary tokens (no <image> / <EOC>)."""
  special = {model_config.image_token_id, model_config.eoc_token_id}
  valid = model_config.lm.get("valid_vocab_size", 0) or model_config.vocab_size
  ids = np.random.default_rng(0).integers(0, valid, (2, 16))
  return np.where(np.isin(ids, list(special)), 0, ids)


def check_logits(model_config: Any, params: Any, input_ids=None, media=None, reference=None,
                 atol: float = 1e-4) -> tuple[dict, np.ndarray]:
  """(report, our logits [B, L, V]): max |diff| over the positions where `reference` [B, L, V']
  (V' <= V: the first V' columns) is not NaN, where it is, and the argmax agreement."""
  input_ids = jnp.asarray(default_input_ids(model_config) if input_ids is None else input_ids,
                          jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
  media = None if media is None else jnp.asarray(media, jnp.uint8)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  logits = np.asarray(jax.jit(models.make_flamingo(model_config).apply)(
      params, None, input_ids, media))
  report = {"shape": list(logits.shape)}
  if reference is None:
    return report, logits
  reference = np.asarray(reference, np.float32)
  v = reference.shape[-1]
  if reference.shape[:2] != logits.shape[:2] or v > logits.shape[-1]:
    raise ValueError(f"reference logits {reference.shape} do not match ours {logits.shape}")
  compared = ~np.isnan(reference).any(-1)                                # [B, L]
  if not compared.any():
    raise ValueError("the reference logits are NaN everywhere")
  diff = np.where(compared[..., None], np.abs(logits[..., :v] - reference), 0.0)
  worst = np.unravel_index(np.argmax(diff), diff.shape)
  agree = logits[..., :v].argmax(-1) == np.nan_to_num(reference, nan=-np.inf).argmax(-1)
  return report | {"max_abs_diff": float(diff.max()), "worst_position": [int(i) for i in worst],
                   "atol": atol, "ok": bool(diff.max() <= atol),
                   "positions": int(compared.sum()),
                   "argmax_agreement": float(agree[compared].mean())}, logits


def check_vision(model_config: Any, params: Any, pixels, reference=None,
                 rtol: float = 1e-4) -> tuple[dict, np.ndarray]:
  """(report, our encoder's final grid) for normalised `pixels` [B, H, W, 3]: the relative
  L2 error against a reference grid."""
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim != 4 or pixels.shape[-1] != 3:
    raise ValueError(f"--pixels must be float [B, H, W, 3], got shape {pixels.shape}")
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  stages = models.make_flamingo_stages(model_config)
  grid = np.asarray(jax.jit(stages.apply.encoder_grid)(params, None, jnp.asarray(pixels)))
  report = {"shape": list(grid.shape)}
  if reference is None:
    return report, grid
  reference = np.asarray(reference, np.float32)
  if reference.shape != grid.shape:
    raise ValueError(f"reference features {reference.shape} do not match ours {grid.shape}")
  error = float(np.linalg.norm(grid - reference) / np.linalg.norm(reference))
  return report | {"relative_l2": error, "max_abs_diff": float(np.abs(grid - reference).max()),
                   "rtol": rtol, "ok": error <= rtol}, grid
