"""Matmul and convolution FLOPs of a compiled XLA program, counting loops by their trip counts.

XLA's `cost_analysis()` counts a `while` body once, so a model whose layers run under
`lax.scan` (ours: hk.layer_stack) reports a fraction of its real FLOPs. This walks the
optimised HLO text instead: every `dot` and `convolution`, in every computation reachable from
ENTRY, times the `known_trip_count` of each enclosing while loop. Elementwise work is not
counted — the same convention as the analytic count (training/flops.py).
"""

import math
import re
from typing import Optional

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z]\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\(.*?\)|([a-z]\w*)\[([\d,]*)\])\S*\s+([\w\-]+)\((.*)$")
_CALLS = re.compile(r"\b(calls|body|to_apply|branch_computations|called_computations)=\{?%?([\w.\-, %]+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def _operands(rest: str) -> list[str]:
  head = rest.split(")", 1)[0]
  return [name.strip().lstrip("%") for name in head.split(",") if name.strip()]


class _Computation:
  def __init__(self, name: str):
    self.name = name
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.flops = 0.0
    self.calls: list[tuple[str, float]] = []  # (callee, multiplier)


def _dot_flops(out, lhs, attrs: str) -> float:
  match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
  contracted = math.prod(lhs[i] for i in _dims(match.group(1))) if match else 1
  return 2.0 * math.prod(out) * contracted


def _conv_flops(out, rhs, attrs: str) -> float:
  match = re.search(r"dim_labels=\w+_(\w+)->", attrs)
  if not match:
    return 0.0
  kernel_labels = match.group(1)
  out_features = rhs[kernel_labels.index("o")]
  return 2.0 * math.prod(out) * math.prod(rhs) / out_features


def parse(hlo_text: str) -> dict[str, _Computation]:
  computations, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = _Computation(header.group(1))
      computations[current.name] = current
      if line.startswith("ENTRY"):
        entry = current.name
      for name, _, dims in _PARAM.findall(header.group(2)):
        current.shapes[name] = _dims(dims)
      continue
    if current is None:
      continue
    instr = _INSTR.match(line)
    if not instr:
      continue
    name, _, dims, op, rest = instr.groups()
    out = _dims(dims) if dims is not None else ()
    current.shapes[name] = out
    operands = _operands(rest)
    if op == "dot" and len(operands) >= 2 and operands[0] in current.shapes:
      current.flops += _dot_flops(out, current.shapes[operands[0]], rest)
    elif op == "convolution" and len(operands) >= 2 and operands[1] in current.shapes:
      current.flops += _conv_flops(out, current.shapes[operands[1]], rest)
    trip = _TRIP.search(rest)
    for kind, callees in _CALLS.findall(rest):
      for callee in re.split(r"[,\s]+", callees):
        callee = callee.strip().lstrip("%")
        if not callee:
          continue
        multiplier = float(trip.group(1)) if (kind == "body" and trip) else 1.0
        current.calls.append((callee, multiplier))
  computations["__entry__"] = computations[entry]
  return computations


def count(hlo_text: str) -> float:
  """Total dot + convolution FLOPs of the program (per device for an SPMD program)."""
  computations = parse(hlo_text)
  memo: dict[str, float] = {}

  def total(name: str, depth: int = 0) -> float:
    if name in memo:
      return memo[name]
    comp: Optional[_Computation] = computations.get(name)
    if comp is None or depth > 200:
      return 0.0
    value = comp.flops + sum(m * total(callee, depth + 1) for callee, m in comp.calls)
    memo[name] = value
    return value

  return total(computations["__entry__"].name)
