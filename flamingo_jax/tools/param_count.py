r"""Parameter counts per component, from shapes only (`jax.eval_shape`: nothing allocated).

  python -m flamingo_jax.tools.param_count --config=experiments/configs/flamingo_80b.py [--json]
"""

import json


from flamingo_jax import cli
from flamingo_jax.training import tasks

_CONFIG = cli.define_config()
_JSON = cli.define_json("Print one JSON object instead of a table.")


def main(argv):
  del argv
  config = _CONFIG.value
  counts = tasks.task_of(config).count_params(config.model)
  if _JSON.value:
    print(json.dumps(counts))
    return
  for key, value in counts.items():
    print(f"{key:>10}  {value:>16,}  {value / 1e9:8.3f}B")


if __name__ == "__main__":
  cli.run(main)
