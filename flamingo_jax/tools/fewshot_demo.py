r"""The few-shot demo's data and report (launch/fewshot_demo.sh runs both).

  python -m flamingo_jax.tools.fewshot_demo --make_task=DIR [--task_seed=S] [--attribute=shape]
      # the attributes benchmark (data/synthetic.py write_attribute_task) in DIR
  python -m flamingo_jax.tools.fewshot_demo --results=EVAL_DIR[,EVAL_DIR...] \
      --task_dir=DIR --output=DIR
      # accuracy per shot count over the evaluation seeds (one `evaluate` output per seed):
      # OUTPUT/accuracy_vs_shots.md (mean, std, min, max, seeds) and .png (chance drawn)

Prints the table, and with --json one JSON object {shots: {mean, std, min, max, seeds},
chance}.
"""

import json
import os
import sys

from absl import flags

from flamingo_jax import cli
from flamingo_jax.data import synthetic
from flamingo_jax.evaluation import report
from flamingo_jax.evaluation import tasks

TASK = "attributes"           # evaluation/tasks.py

_MAKE_TASK = flags.DEFINE_string("make_task", "", "Write the naming task into this folder.")
_TASK_SEED = flags.DEFINE_integer("task_seed", 12345, "Seed of the binding and the images.")
_ATTRIBUTE = flags.DEFINE_enum("attribute", "shape", ["colour", "shape", "count"],
                               "The attribute the task asks for.")
_SUPPORT = flags.DEFINE_integer("support", 64, "Support examples of the task.")
_QUERIES = flags.DEFINE_integer("queries", 100, "Queries of the task.")
_RESULTS = flags.DEFINE_list("results", [], "evaluate --output folders, one per seed.")
_TASK_DIR = flags.DEFINE_string("task_dir", "", "The task's folder (for chance).")
_OUTPUT = flags.DEFINE_string("output", "", "Where the table and the plot go.")
_JSON = cli.define_json("Print the summary as JSON.")


def main(argv):
  del argv
  if _MAKE_TASK.value:
    path = synthetic.write_attribute_task(_MAKE_TASK.value, _TASK_SEED.value, _ATTRIBUTE.value,
                                          _SUPPORT.value, _QUERIES.value)
    print(path)
    return
  if not (_RESULTS.value and _TASK_DIR.value and _OUTPUT.value):
    sys.exit("error: give --make_task=DIR, or --results, --task_dir and --output")
  try:
    chance = 100.0 / len(tasks.get(TASK).load(_TASK_DIR.value).candidates)
    summary = report.summarize([os.path.join(d, "results.json") for d in _RESULTS.value])
  except (ValueError, FileNotFoundError, KeyError) as e:
    sys.exit(f"error: {e}")
  os.makedirs(_OUTPUT.value, exist_ok=True)
  text = report.table(summary, chance)
  with open(os.path.join(_OUTPUT.value, "accuracy_vs_shots.md"), "w") as f:
    f.write(text)
  report.plot(summary, chance, os.path.join(_OUTPUT.value, "accuracy_vs_shots.png"),
              title="Which attribute? Accuracy vs shots")
  print(json.dumps({"shots": summary, "chance": chance}) if _JSON.value else text, end="")


if __name__ == "__main__":
  cli.run(main)
