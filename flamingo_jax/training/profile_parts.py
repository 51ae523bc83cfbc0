r"""Where a train step's time goes, by model part: a jax.profiler trace of the step, read
against the compiled step's HLO (each instruction's `op_name` says which module and whether it
is the forward `jvp(...)` or the backward `transpose(jvp(...))`).

  python -m flamingo_jax.tools.bench_step --config=FILE --steps=3 --profile_dir=/tmp/prof --json
  # -> its report's "profile_ms_per_step": {"perceiver_resampler backward": 760.1, ...}

Durations are summed per op, so on a host that runs independent ops side by side (XLA:CPU's
thunk executor on several cores) the parts can add up to more than the step's wall time.
Ops whose name is no HLO instruction of the step (runtime bookkeeping) are left out.
"""

import collections
import glob
import gzip
import json
import os
import re

PARTS = ("vision_encoder", "perceiver_resampler", "language_model", "text_encoder")
_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]+)"', re.M)


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: its metadata op_name} of a compiled module's text."""
  names = {}
  for match in _INSTRUCTION.finditer(hlo_text):
    names.setdefault(match.group(1), match.group(2))
  return names


def part_of(op_name: str) -> str:
  """"<part> forward|backward", or "update" for what is outside the differentiated model
  (optimizer, gradient clipping, loss bookkeeping)."""
  if "jvp(" not in op_name:
    return "update"
  direction = "backward" if "transpose(jvp(" in op_name else "forward"
  part = next((p for p in PARTS if p in op_name), "loss and other")
  # The gated xattn blocks (`xattn`, `tail_xattn`) live inside the language model's scans.
  if part == "language_model" and "xattn/" in op_name.split("language_model", 1)[1]:
    part = "gated_xattn"
  return f"{part} {direction}"


def trace_file(profile_dir: str) -> str:
  """The newest `*.trace.json.gz` that jax.profiler wrote under `profile_dir`."""
  files = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {profile_dir}/plugins/profile")
  return max(files, key=os.path.getmtime)


def summarize(trace: dict, hlo_text: str, steps: int) -> dict[str, float]:
  """{part: milliseconds per step}, largest first, from a Chrome-format trace (`traceEvents`,
  complete events "X" with microsecond `dur`). An event names its op by its name (XLA:CPU)
  or by args.hlo_op (XLA:GPU kernels)."""
  names = op_names(hlo_text)
  totals = collections.Counter()
  for event in trace.get("traceEvents", []):
    if event.get("ph") != "X":
      continue
    op = event.get("args", {}).get("hlo_op", event.get("name", ""))
    if op in names:
      totals[part_of(names[op])] += float(event.get("dur", 0.0))
  return {part: round(total / 1e3 / steps, 1) for part, total in totals.most_common()}


def summarize_dir(profile_dir: str, hlo_text: str, steps: int) -> dict[str, float]:
  with gzip.open(trace_file(profile_dir), "rt") as f:
    return summarize(json.load(f), hlo_text, steps)
