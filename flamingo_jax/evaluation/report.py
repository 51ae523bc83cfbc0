"""Accuracy against the number of shots over evaluation seeds: a table and a plot.

    summary = summarize(["eval/seed0/results.json", "eval/seed1/results.json", ...])
    print(table(summary, chance=9.1))            # mean, std, min, max per shot count
    plot(summary, 9.1, "accuracy_vs_shots.png")  # matplotlib (the dev extra), chance drawn
"""

import json

import numpy as np


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


def plot(summary: dict[int, dict], chance: float, path: str,
         title: str = "Accuracy vs shots") -> None:
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
  axes.set_title(title)
  axes.legend(loc="lower right", fontsize=8)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
