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
import numpy as np

from flamingo_jax.tools import cli

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
_JSON = flags.DEFINE_bool("json", False, "Print the summary as JSON.")


def summarize(result_files: list[str]) -> dict[int, dict]:
  """{shots: {mean, std, min, max, seeds}} over the evaluations' results.json files."""
  by_shots: dict[int, list[float]] = {}
  for path in result_files:
    with open(path) as f:
      for row in json.load(f):
        if row["value"] is None or not row.get("complete", True):
          raise ValueError(f"{path}: {row['shots']} shots is incomplete; re-run its evaluation")
        by_shots.setdefault(int(row["shots"]), []).append(float(row["value"]))
  return {k: dict(mean=float(np.mean(v)), std=float(np.std(v)), min=float(np.min(v)),
                  max=float(np.max(v)), seeds=len(v)) for k, v in sorted(by_shots.items())}


def table(summary: dict[int, dict], chance: float) -> str:
  lines = ["| shots | accuracy (%) mean | std | min | max | seeds |", "|---|---|---|---|---|---|"]
  for k, s in summary.items():
    lines.append(f"| {k} | {s['mean']:.1f} | {s['std']:.1f} | {s['min']:.1f} | {s['max']:.1f} "
                 f"| {s['seeds']} |")
  return "\n".join(lines) + f"\n\nchance: {chance:.1f}%\n"


def plot(summary: dict[int, dict], chance: float, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shots = list(summary)
  mean = np.array([summary[k]["mean"] for k in shots])
  std = np.array([summary[k]["std"] for k in shots])
  figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
  axes.errorbar(shots, mean, yerr=std, marker="o", capsize=3,
                label=f"tiny Flamingo ({summary[shots[0]]['seeds']} seeds, mean ± std)")
  axes.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.0f}%)")
  axes.set_xscale("symlog", linthresh=1)
  axes.set_xticks(shots)
  axes.set_xticklabels([str(k) for k in shots])
  axes.set_xlabel("shots")
  axes.set_ylabel("accuracy (%)")
  axes.set_ylim(0, 100)
  axes.set_title("Which attribute? Accuracy vs shots")
  axes.legend(loc="lower right", fontsize=8)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def main(argv):
  del argv
  from flamingo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from flamingo_jax.evaluation import tasks  # pylint: disable=g-import-not-at-top
  if _MAKE_TASK.value:
    path = synthetic.write_attribute_task(_MAKE_TASK.value, _TASK_SEED.value, _ATTRIBUTE.value,
                                          _SUPPORT.value, _QUERIES.value)
    print(path)
    return
  if not (_RESULTS.value and _TASK_DIR.value and _OUTPUT.value):
    sys.exit("error: give --make_task=DIR, or --results, --task_dir and --output")
  try:
    chance = 100.0 / len(tasks.get(TASK).load(_TASK_DIR.value).candidates)
    summary = summarize([os.path.join(d, "results.json") for d in _RESULTS.value])
  except (ValueError, FileNotFoundError, KeyError) as e:
    sys.exit(f"error: {e}")
  os.makedirs(_OUTPUT.value, exist_ok=True)
  text = table(summary, chance)
  with open(os.path.join(_OUTPUT.value, "accuracy_vs_shots.md"), "w") as f:
    f.write(text)
  plot(summary, chance, os.path.join(_OUTPUT.value, "accuracy_vs_shots.png"))
  print(json.dumps({"shots": summary, "chance": chance}) if _JSON.value else text, end="")


if __name__ == "__main__":
  cli.run(main)
