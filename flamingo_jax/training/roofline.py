"""A roofline estimate of a compiled program's time on one chip, from its optimised HLO.

Every instruction the device runs on its own (a fusion, a dot or convolution outside one, a
copy or transpose) takes at least max(its FLOPs / peak FLOP/s, the bytes it reads and writes /
HBM bandwidth); the estimate is the sum over the program, each while loop's body counted
by its trip count (hlo_flops). FLOPs are the dots' and convolutions' inside the instruction;
bytes are its operands' and outputs' sizes, except where a fusion only slices an operand
(a scanned layer's weights, read one layer at a time out of the whole stack: the slices'
bytes) or updates it in place (a gradient written into its layer's slot: the update's bytes).

Pallas kernels are custom calls XLA knows no FLOPs of: splash attention's (models/splash.py)
are counted as dense attention over their operands' padded shapes, 2 matmuls forward, 3 for
dq and 4 for dk/dv (`kernel_flops`), an upper bound for a causal mask, whose kernels skip the
blocks above the diagonal; any other custom call counts its bytes only.

What it leaves out, so a lower bound rather than a forecast: collectives (their bytes are
reported beside, not timed: ICI bandwidth and overlap with compute depend on the topology
and on XLA's scheduling), elementwise FLOPs, the MXU's lower efficiency on small or
unaligned shapes, launch and synchronisation overheads, and fusions that re-read an operand
more than once.
"""

import re
from typing import Optional

from flamingo_jax.training import hlo_flops

# Peak bf16 FLOP/s and HBM bytes/s per chip by device_kind, from the public TPU specs.
PEAKS = {
    "TPU v4": (275e12, 1228e9),
    "TPU v5 lite": (197e12, 819e9), "TPU v5e": (197e12, 819e9),
    "TPU v5p": (459e12, 2765e9), "TPU v5": (459e12, 2765e9),
    "TPU v6 lite": (918e12, 1640e9), "TPU v6e": (918e12, 1640e9),
}
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[a-z]\w*\[[\d,]*\]\S*)\s+"
                    r"([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|body|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")
# Instructions that move no data of their own.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "iota", "opt-barrier"}
_LAYOUTS = re.compile(r"operand_layout_constraints=\{(.*?)\}, \w+=")
# Matmuls per splash kernel phase (the backward recomputes the logits).
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH = re.compile(r"^splash_m[hq]a_(fwd|dq|dkv)")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "all-reduce-start", "all-gather-start",
                "collective-permute-start")


def _size(text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    count = 1
    for d in dims.split(","):
      count *= int(d) if d else 1
    total += count * _BYTES.get(dtype, 4)
  return total


def splash_kernel_flops(name: str, rest: str) -> float:
  """Dense-attention FLOPs of one splash kernel call (0 if `name` is not one): q [B, H, Lq, K]
  and k [B, Hkv, Lk, K] are its first two rank-4 floating operands."""
  phase, layouts = _SPLASH.match(name), _LAYOUTS.search(rest)
  if not phase or not layouts:
    return 0.0
  arrays = [tuple(int(d) for d in dims.split(",")) for dtype, dims in _ARRAY.findall(
      layouts.group(1)) if dtype.startswith(("f", "bf")) and dims.count(",") == 3]
  if len(arrays) < 2:
    return 0.0
  (b, h, lq, k), (_, _, lk, _) = arrays[:2]
  return 2.0 * b * h * lq * lk * k * _SPLASH_MATMULS[phase.group(1)]


def _computations(hlo_text: str) -> tuple[dict[str, list], dict[str, dict[str, int]], str,
                                          dict[str, str]]:
  """({computation: [(name, op, output bytes, operands, rest)]}, {computation: {value:
  bytes}}, entry name, {computation: its root's name})."""
  instructions, sizes, current, entry, roots = {}, {}, None, None, {}
  for line in hlo_text.splitlines():
    header = hlo_flops._HEADER.match(line)  # pylint: disable=protected-access
    if header and not line.startswith(" "):
      current = header.group(1)
      instructions[current], sizes[current] = [], {}
      if line.startswith("ENTRY"):
        entry = current
      continue
    match = _INSTR.match(line) if current else None
    if match:
      name, shape, op, rest = match.groups()
      sizes[current][name] = _size(shape)
      operands = hlo_flops._operands(rest)  # pylint: disable=protected-access
      instructions[current].append((name, op, sizes[current][name], operands, rest))
      if line.lstrip().startswith("ROOT"):
        roots[current] = name
  return instructions, sizes, entry, roots


_SLICES = ("dynamic-slice", "slice", "gather")


def _callees(rest: str) -> list[str]:
  """The computations an instruction runs (a fusion's, a loop's body, a call's, a
  conditional's branches), not the reducers it applies (`to_apply`)."""
  return [c.strip().lstrip("%") for kind, names in _CALLEE.findall(rest)
          for c in re.split(r"[,\s]+", names) if c.strip() and kind != "to_apply"]


def _fused_traffic(fused: str, instructions: dict[str, list], sizes: dict[str, dict[str, int]],
                   roots: dict[str, str], memo: dict) -> tuple[dict[int, int], Optional[int]]:
  """What the fused computation `fused` really moves: ({parameter index: bytes read} for
  parameters that are only sliced (the slices' sizes; also inside a nested fusion) or only
  updated in place (0), the bytes its output writes when in-place updates are its root or a
  root tuple's elements (their updates' sizes), else None)."""
  if fused in memo:
    return memo[fused]
  memo[fused] = ({}, None)                    # a cycle (never in valid HLO) reads as unknown
  params, uses, by_name = {}, {}, {}
  for name, op, out, operands, rest in instructions.get(fused, []):
    by_name[name] = (op, operands)
    if op == "parameter":
      params[name] = int(rest.split(")", 1)[0])
    callee = (_callees(rest) or [None])[0] if op == "fusion" else None
    for position, operand in enumerate(operands):
      uses.setdefault(operand, []).append((name, op, out, position, callee))

  def read(value: str, depth: int = 0) -> Optional[int]:
    """Bytes read of `value` if every use slices it or updates it in place (through
    bitcasts and nested fusions), else None."""
    if value not in uses or depth > 8:
      return None
    total = 0
    for user, op, out, position, callee in uses[value]:
      if op == "bitcast":
        inner = read(user, depth + 1)
      elif op == "fusion" and callee:
        inner = _fused_traffic(callee, instructions, sizes, roots, memo)[0].get(position)
      elif op in _SLICES and position == 0:
        inner = out
      elif op == "dynamic-update-slice" and position == 0:
        inner = 0
      else:
        inner = None
      if inner is None:
        return None
      total += inner
    return total

  reads = {index: r for name, index in params.items() if (r := read(name)) is not None}
  table = sizes.get(fused, {})

  def written(value: str) -> Optional[int]:
    op, operands = by_name.get(value, (None, []))
    if op == "dynamic-update-slice":
      return table.get(operands[1], 0)
    if op == "tuple":
      parts = [written(o) for o in operands]
      if any(p is not None for p in parts):
        return sum(table.get(o, 0) if p is None else p for o, p in zip(operands, parts))
    return None
  memo[fused] = reads, (written(roots[fused]) if fused in roots else None)
  return memo[fused]


def estimate(hlo_text: str, peak_flops: float, peak_bytes_per_second: float) -> dict:
  """{"seconds": the estimate, "compute_seconds" / "memory_seconds": the instructions bound by
  each, "flops" (of which "kernel_flops" Pallas kernels'), "bytes", "collective_bytes" (not
  timed)}, per chip."""
  instructions, sizes, entry, roots = _computations(hlo_text)
  flops_of = hlo_flops.parse(hlo_text)
  traffic = {}

  def fusion_bytes(computation: str, fused: str, out_bytes: int, operands: list) -> int:
    reads, written = _fused_traffic(fused, instructions, sizes, roots, traffic)
    return ((out_bytes if written is None else written)
            + sum(reads.get(i, sizes[computation].get(o, 0)) for i, o in enumerate(operands)))

  loop_bound = lambda cond: (flops_of[cond].loop_bound if cond in flops_of
                             and flops_of[cond].loop_bound else 1)
  memo: dict[str, dict[str, float]] = {}

  def dot_flops(computation: str) -> float:
    """Dot and convolution FLOPs of a fusion's computation (and what it calls)."""
    return sum(hlo_flops.breakdown_of(flops_of, computation).values())

  def walk(computation: str, depth: int = 0) -> dict[str, float]:
    if computation in memo:
      return memo[computation]
    totals = dict(seconds=0.0, compute_seconds=0.0, memory_seconds=0.0, flops=0.0, bytes=0.0,
                  collective_bytes=0.0, kernel_flops=0.0)
    if depth > 200:
      return totals
    for name, op, out_bytes, operands, rest in instructions.get(computation, []):
      callees = _callees(rest)
      if op == "while":
        trip = hlo_flops._TRIP.search(rest)  # pylint: disable=protected-access
        condition = hlo_flops._CONDITION.search(rest)  # pylint: disable=protected-access
        trips = int(trip.group(1)) if trip else loop_bound(condition.group(1)) if condition else 1
        body = re.search(r"body=%?([\w.\-]+)", rest)
        inner = walk(body.group(1), depth + 1) if body else {}
        for key, value in inner.items():
          totals[key] += trips * value
        continue
      if op in ("call", "conditional", "async-start") and callees:
        parts = [walk(c, depth + 1) for c in callees]
        worst = max(parts, key=lambda p: p["seconds"]) if op == "conditional" else None
        for part in ([worst] if worst else parts):
          for key, value in part.items():
            totals[key] += value
        continue
      if op == "fusion" and callees:
        moved = fusion_bytes(computation, callees[0], out_bytes, operands)
      elif op == "dynamic-update-slice":            # in place: the update read and written
        moved = 2 * sizes[computation].get(operands[1], 0)
      elif op in _SLICES:
        moved = 2 * out_bytes
      else:
        moved = out_bytes + sum(sizes[computation].get(o, 0) for o in operands)
      if op.startswith(_COLLECTIVES):
        totals["collective_bytes"] += moved
        continue
      if op in _FREE:
        continue
      flops = 0.0
      if op == "fusion" and callees:
        flops = dot_flops(callees[0])
      elif op in ("dot", "convolution"):
        flops = hlo_flops.instruction_flops(flops_of[computation], name)
      elif op == "custom-call":
        flops = splash_kernel_flops(name, rest)
        totals["kernel_flops"] += flops
      compute, memory = flops / peak_flops, moved / peak_bytes_per_second
      totals["seconds"] += max(compute, memory)
      totals["compute_seconds" if compute >= memory else "memory_seconds"] += max(compute, memory)
      totals["flops"] += flops
      totals["bytes"] += moved
    memo[computation] = totals
    return totals

  return walk(entry)


def for_device(hlo_text: str, device_kind: str) -> Optional[dict]:
  """The estimate for a known TPU chip (PEAKS), else None."""
  if device_kind not in PEAKS:
    return None
  peak_flops, peak_bytes = PEAKS[device_kind]
  return estimate(hlo_text, peak_flops, peak_bytes)
