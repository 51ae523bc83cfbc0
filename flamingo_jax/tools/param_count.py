r"""Parameter counts per component, from shapes only (`jax.eval_shape`: nothing allocated).

  python -m flamingo_jax.tools.param_count --config=experiments/configs/flamingo_80b.py [--json]
"""

import json

from absl import flags
from ml_collections import config_flags

from flamingo_jax import models
from flamingo_jax.models import contrastive
from flamingo_jax.tools import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def main(argv):
  del argv
  config = _CONFIG.value
  counts = (contrastive.count_params(config.model) if config.get("task") == "contrastive"
            else models.count_params(config.model))
  if _JSON.value:
    print(json.dumps(counts))
    return
  for key, value in counts.items():
    print(f"{key:>10}  {value:>16,}  {value / 1e9:8.3f}B")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main)
