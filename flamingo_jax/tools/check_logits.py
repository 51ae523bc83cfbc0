r"""Runs our forward pass in float32 and compares its logits with a reference (or saves them).

  python -m flamingo_jax.tools.check_logits --config=FILE --params=DIR \
      [--input_ids=ids.npy] [--media=media.npy] (--reference=logits.npy [--atol=1e-4] | --output=O.npy)

--params: an import_weights output folder (or its params/), or a run's workdir. Parameters
it does not hold (the Flamingo modules around an LM-only import) are initialised from the
config's seed and listed. Without --media the pass is text-only (the LM alone). input_ids
default to a fixed random int32 [2, 16] batch of ordinary tokens. A reference may have fewer
vocabulary columns than our (padded) table: the first V columns are compared; positions where
the reference is NaN (padding, which the reference masked) are not. Exit status 1
when max |diff| exceeds --atol; the worst position is printed.

  python -m flamingo_jax.tools.check_logits --part=vision --config=FILE --params=DIR \
      --pixels=images.npy (--reference=features.npy [--rtol=1e-4] | --output=O.npy)

--part=vision checks an imported vision tower alone: --pixels are float [B, H, W, 3] already
normalised as the reference model saw them, the output is the encoder's final grid
[B, h, w, C] (timm's `forward_features`; open_clip's `visual(x)[1]` as a grid), and the check
is the relative L2 error (|ours - ref| / |ref|) against --rtol.
"""

import json
import sys

from absl import flags
from absl import logging
import numpy as np

from flamingo_jax import cli
from flamingo_jax import models
from flamingo_jax import weights
from flamingo_jax.training import param_sources
from flamingo_jax.weights import parity

_CONFIG = cli.define_config(run_flags=("params",))
_PARAMS = cli.define_params()
_INPUT_IDS = flags.DEFINE_string("input_ids", "", "int [B, L] .npy (default: random tokens).")
_MEDIA = flags.DEFINE_string("media", "", "uint8 [B, N, T, H, W, 3] .npy (default: text only).")
_REFERENCE = flags.DEFINE_string("reference", "", "float [B, L, V] .npy to compare with.")
_ATOL = flags.DEFINE_float("atol", 1e-4, "Largest allowed absolute difference.")
_OUTPUT = flags.DEFINE_string("output", "", "Write our float32 logits [B, L, V] here.")
_JSON = cli.define_json()
_PART = flags.DEFINE_enum("part", "model", ["model", "vision"], "model: the logits of the "
                          "whole Flamingo; vision: the vision encoder's grid.")
_PIXELS = flags.DEFINE_string("pixels", "", "--part=vision: float [B, H, W, 3] .npy, "
                              "normalised as the reference saw them.")
_RTOL = flags.DEFINE_float("rtol", 1e-4, "--part=vision: largest relative L2 error.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if bool(_REFERENCE.value) == bool(_OUTPUT.value):
    print("error: give exactly one of --reference and --output", file=sys.stderr)
    sys.exit(2)
  try:
    load = lambda p: np.load(p) if p else None
    config = _CONFIG.value
    if _PART.value == "vision" and not _PIXELS.value:
      raise ValueError("--part=vision needs --pixels=images.npy")
    params, from_seed = param_sources.load(config, _PARAMS.value)
    if _PART.value == "vision":
      vision = [m for m in from_seed if models.component_of(m.rsplit("/", 1)[0]) == "vision"]
      if vision:
        raise ValueError(f"{_PARAMS.value} holds no vision tower ({vision[0]} ...)")
      report, logits = parity.check_vision(config.model, params, load(_PIXELS.value),
                                           load(_REFERENCE.value), _RTOL.value)
    else:
      report, logits = parity.check_logits(config.model, params, load(_INPUT_IDS.value),
                                           load(_MEDIA.value), load(_REFERENCE.value),
                                           _ATOL.value)
    report["initialised_from_seed"] = from_seed
  except (weights.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _OUTPUT.value:
    np.save(_OUTPUT.value, logits)
  if _JSON.value:
    print(json.dumps(report))
  else:
    if report.get("initialised_from_seed"):
      print(f"initialised from the config's seed ({len(report['initialised_from_seed'])}): "
            + ", ".join(report["initialised_from_seed"][:8])
            + (" ..." if len(report["initialised_from_seed"]) > 8 else ""))
    if _OUTPUT.value:
      print(f"wrote {_OUTPUT.value}: {_PART.value} output {tuple(report['shape'])}")
    elif _PART.value == "vision":
      print(f"relative L2 {report['relative_l2']:.3e} (max |diff| {report['max_abs_diff']:.3e}, "
            f"rtol {report['rtol']:g}): {'OK' if report['ok'] else 'FAIL'}")
    else:
      print(f"max |diff| {report['max_abs_diff']:.3e} at [batch, position, token] "
            f"{report['worst_position']} (atol {report['atol']:g}); argmax agreement "
            f"{report['argmax_agreement']:.4f}: {'OK' if report['ok'] else 'FAIL'}")
  if _REFERENCE.value and not report["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["params"])
  cli.run(main)
