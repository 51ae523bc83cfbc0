"""The comparisons behind tools/check_logits (no flags here, so tests and other tools can
call them): our float32 logits, or an imported vision tower's grid, against a reference."""


def check(config, params_path: str, input_ids=None, media=None, reference=None,
          atol: float = 1e-4) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flamingo_jax import models  # pylint: disable=g-import-not-at-top
  from flamingo_jax.tools import model_params  # pylint: disable=g-import-not-at-top
  model = models.make_flamingo(config.model)
  if input_ids is None:
    special = {config.model.image_token_id, config.model.eoc_token_id}
    valid = config.model.lm.get("valid_vocab_size", 0) or config.model.vocab_size
    ids = np.random.default_rng(0).integers(0, valid, (2, 16))
    input_ids = np.where(np.isin(ids, list(special)), 0, ids)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
  media = None if media is None else jnp.asarray(media, jnp.uint8)
  params, missing = model_params.load(config, params_path)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  logits = np.asarray(jax.jit(model.apply)(params, None, input_ids, media))
  report = {"shape": list(logits.shape), "initialised_from_seed": missing}
  if reference is not None:
    reference = np.asarray(reference, np.float32)
    v = reference.shape[-1]
    if reference.shape[:2] != logits.shape[:2] or v > logits.shape[-1]:
      raise ValueError(f"reference logits {reference.shape} do not match ours {logits.shape}")
    compared = ~np.isnan(reference).any(-1)                            # [B, L]
    if not compared.any():
      raise ValueError("the reference logits are NaN everywhere")
    diff = np.where(compared[..., None], np.abs(logits[..., :v] - reference), 0.0)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    agree = logits[..., :v].argmax(-1) == np.nan_to_num(reference, nan=-np.inf).argmax(-1)
    report |= {"max_abs_diff": float(diff.max()), "worst_position": [int(i) for i in worst],
               "atol": atol, "ok": bool(diff.max() <= atol),
               "positions": int(compared.sum()),
               "argmax_agreement": float(agree[compared].mean())}
  return report, logits


def check_vision(config, params_path: str, pixels, reference=None,
                 rtol: float = 1e-4) -> tuple[dict, "np.ndarray"]:
  """Our encoder's final grid for normalised `pixels`, and its relative L2 error against a
  reference grid."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flamingo_jax import models  # pylint: disable=g-import-not-at-top
  from flamingo_jax.tools import model_params  # pylint: disable=g-import-not-at-top
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim != 4 or pixels.shape[-1] != 3:
    raise ValueError(f"--pixels must be float [B, H, W, 3], got shape {pixels.shape}")
  params, missing = model_params.load(config, params_path)
  vision = [m for m in missing if models.component_of(m.rsplit("/", 1)[0]) == "vision"]
  if vision:
    raise ValueError(f"{params_path} holds no vision tower ({vision[0]} ...)")
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  stages = models.make_flamingo_stages(config.model)
  grid = np.asarray(jax.jit(stages.apply.encoder_grid)(params, None, jnp.asarray(pixels)))
  report = {"shape": list(grid.shape)}
  if reference is not None:
    reference = np.asarray(reference, np.float32)
    if reference.shape != grid.shape:
      raise ValueError(f"reference features {reference.shape} do not match ours {grid.shape}")
    error = float(np.linalg.norm(grid - reference) / np.linalg.norm(reference))
    report |= {"relative_l2": error, "max_abs_diff": float(np.abs(grid - reference).max()),
               "rtol": rtol, "ok": error <= rtol}
  return report, grid
