r"""Runs our forward pass in float32 and compares its logits with a reference (or saves them).

  python -m flamingo_jax.tools.check_logits --config=FILE --params=DIR \
      [--input_ids=ids.npy] [--media=media.npy] (--reference=logits.npy [--atol=1e-4] | --output=O.npy)

--params: an import_weights output folder (or its params/), or a run's workdir. Parameters
it does not hold (the Flamingo modules around an LM-only import) are initialised from the
config's seed and listed. Without --media the pass is text-only (the LM alone). input_ids
default to a fixed random int32 [2, 16] batch of ordinary tokens. A reference may have fewer
vocabulary columns than our (padded) table: the first V columns are compared. Exit status 1
when max |diff| exceeds --atol; the worst position is printed.
"""

import json
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from flamingo_jax.tools import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_PARAMS = flags.DEFINE_string("params", None, "Import folder, its params/, or a run workdir.")
_INPUT_IDS = flags.DEFINE_string("input_ids", "", "int [B, L] .npy (default: random tokens).")
_MEDIA = flags.DEFINE_string("media", "", "uint8 [B, N, T, H, W, 3] .npy (default: text only).")
_REFERENCE = flags.DEFINE_string("reference", "", "float [B, L, V] .npy to compare with.")
_ATOL = flags.DEFINE_float("atol", 1e-4, "Largest allowed absolute difference.")
_OUTPUT = flags.DEFINE_string("output", "", "Write our float32 logits [B, L, V] here.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


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
    diff = np.abs(logits[..., :v] - reference)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    report |= {"max_abs_diff": float(diff.max()), "worst_position": [int(i) for i in worst],
               "atol": atol, "ok": bool(diff.max() <= atol),
               "argmax_agreement": float(np.mean(logits[..., :v].argmax(-1) ==
                                                 reference.argmax(-1)))}
  return report, logits


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if bool(_REFERENCE.value) == bool(_OUTPUT.value):
    print("error: give exactly one of --reference and --output", file=sys.stderr)
    sys.exit(2)
  try:
    load = lambda p: np.load(p) if p else None
    report, logits = check(_CONFIG.value, _PARAMS.value, load(_INPUT_IDS.value),
                           load(_MEDIA.value), load(_REFERENCE.value), _ATOL.value)
  except (weights.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _OUTPUT.value:
    np.save(_OUTPUT.value, logits)
  if _JSON.value:
    print(json.dumps(report))
  else:
    if report["initialised_from_seed"]:
      print(f"initialised from the config's seed ({len(report['initialised_from_seed'])}): "
            + ", ".join(report["initialised_from_seed"][:8])
            + (" ..." if len(report["initialised_from_seed"]) > 8 else ""))
    if _OUTPUT.value:
      print(f"wrote {_OUTPUT.value}: logits {tuple(report['shape'])}")
    else:
      print(f"max |diff| {report['max_abs_diff']:.3e} at [batch, position, token] "
            f"{report['worst_position']} (atol {report['atol']:g}); argmax agreement "
            f"{report['argmax_agreement']:.4f}: {'OK' if report['ok'] else 'FAIL'}")
  if _REFERENCE.value and not report["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "params"])
  cli.run(main)
