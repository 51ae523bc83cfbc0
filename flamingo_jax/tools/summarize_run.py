r"""Summarise a run directory: the loss curve from metrics.jsonl, checkpoints, TensorBoard.

  python -m flamingo_jax.tools.summarize_run --workdir=runs/local
"""

import json
import os


from flamingo_jax import cli

_WORKDIR = cli.define_workdir("The run.", required=True)
_BARS = " ▁▂▃▄▅▆▇█"


def summarize(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if not records:
    raise ValueError(f"{workdir}/metrics.jsonl is empty")
  by_step = {r["step"]: r for r in records}           # a resumed run may repeat steps
  records = [by_step[s] for s in sorted(by_step)]
  first, last = records[0], records[-1]
  streams = sorted(k[5:] for k in first if k.startswith("loss/"))
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) if os.path.isdir(checkpoints) else []
  return {
      "steps": [r["step"] for r in records], "losses": [r["loss"] for r in records],
      "first": first, "last": last,
      "drop": 1 - last["loss"] / first["loss"],
      "streams": {s: (first[f"loss/{s}"], last[f"loss/{s}"]) for s in streams},
      "checkpoints": checkpoints, "checkpoint_steps": steps,
      "tensorboard": os.path.join(workdir, "tensorboard"),
  }


def main(argv):
  del argv
  s = summarize(_WORKDIR.value)
  losses = s["losses"]
  lo, hi = min(losses), max(losses)
  picks = losses[::max(1, len(losses) // 40)]
  curve = "".join(_BARS[1 + int(7 * (v - lo) / (hi - lo or 1))] for v in picks)
  print(f"loss curve ({len(losses)} logs, steps {s['steps'][0]}..{s['steps'][-1]}): {curve}")
  print(f"loss {s['first']['loss']:.4f} (step {s['first']['step']}) -> {s['last']['loss']:.4f} "
        f"(step {s['last']['step']}): {s['drop']:.1%} lower")
  for name, (a, b) in s["streams"].items():
    print(f"  {name:6s} {a:.4f} -> {b:.4f}")
  print(f"checkpoints: {s['checkpoints']} (steps {s['checkpoint_steps']})")
  print(f"tensorboard: tensorboard --logdir {s['tensorboard']}")


if __name__ == "__main__":
  cli.run(main)
