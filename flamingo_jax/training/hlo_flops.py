"""Matmul and convolution FLOPs of a compiled XLA program, counting loops by their trip counts.

XLA's `cost_analysis()` counts a `while` body once, so a model whose layers run under
`lax.scan` (ours: hk.layer_stack) reports a fraction of its real FLOPs. This walks the
optimised HLO text instead: every `dot` and `convolution`, in every computation reachable from
ENTRY, times the trip count of each enclosing while loop. Elementwise work is not counted —
the same convention as the analytic count (training/flops.py).

Trip counts: the loop's `known_trip_count` backend config where XLA keeps it (CPU, GPU);
otherwise (TPU strips it) the bound of its condition, `i < N` against a scalar constant, for a
counter that starts at 0 and steps by 1 (what `lax.scan` lowers to).
"""

import math
import re
from typing import Optional

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z]\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\(.*?\)|([a-z]\w*)\[([\d,]*)\])\S*\s+([\w\-]+)\((.*)$")
_CALLS = re.compile(r"\b(calls|body|to_apply|branch_computations|called_computations)=\{?%?([\w.\-, %]+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((\d+)\)")
_LESS_THAN = re.compile(r"compare\(%?[\w.\-]+,\s*%?([\w.\-]+)\),\s*direction=LT")


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
    self.flops_by: dict[str, float] = {}      # by classify(op_name)
    self.by_instruction: dict[str, float] = {}  # each dot / convolution's
    self.calls: list[tuple[str, float | str]] = []  # (callee, multiplier | condition name)
    self.constants: dict[str, int] = {}
    self.loop_bound: Optional[int] = None    # N of a condition computation `i < N`


def _dot_flops(out, lhs, attrs: str) -> float:
  match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
  contracted = math.prod(lhs[i] for i in _dims(match.group(1))) if match else 1
  return 2.0 * math.prod(out) * contracted


def _conv_flops(out, rhs, attrs: str) -> float:
  """2 x outputs x kernel taps that meet real input. An input dilated by d (lhs_dilate) puts
  d-1 zeros between elements, so only 1/d of a window's taps do work: TPU rewrites a grouped
  convolution as a dense one over a group dimension dilated by the group count, and the
  data-gradient of a strided convolution dilates by the stride."""
  match = re.search(r"dim_labels=\w+_(\w+)->", attrs)
  if not match:
    return 0.0
  kernel_labels = match.group(1)
  out_features = rhs[kernel_labels.index("o")]
  dilation = re.search(r"lhs_dilate=([\dx]+)", attrs)
  dilated = math.prod(int(d) for d in dilation.group(1).split("x")) if dilation else 1
  return 2.0 * math.prod(out) * math.prod(rhs) / out_features / dilated


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def classify(op_name: str) -> str:
  """'<component>/<forward|backward>' from an instruction's op_name (the Haiku path in it)."""
  component = "other"
  for key, pattern in (("vision", "vision_encoder"), ("resampler", "perceiver_resampler"),
                       ("xattn", "xattn"), ("lm", "language_model")):
    if pattern in op_name:
      component = key
      break
  direction = "backward" if "transpose(" in op_name else "forward"
  return f"{component}/{direction}"


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
    constant = _CONSTANT.match(line)
    if constant:
      current.constants[constant.group(1)] = int(constant.group(2))
    less = _LESS_THAN.search(line)
    if less and less.group(1) in current.constants:
      current.loop_bound = current.constants[less.group(1)]
    instr = _INSTR.match(line)
    if not instr:
      continue
    name, _, dims, op, rest = instr.groups()
    out = _dims(dims) if dims is not None else ()
    current.shapes[name] = out
    operands = _operands(rest)
    flops = 0.0
    if op == "dot" and len(operands) >= 2 and operands[0] in current.shapes:
      flops = _dot_flops(out, current.shapes[operands[0]], rest)
    elif op == "convolution" and len(operands) >= 2 and operands[1] in current.shapes:
      flops = _conv_flops(out, current.shapes[operands[1]], rest)
    if flops:
      current.flops += flops
      current.by_instruction[name] = flops
      op_name = _OP_NAME.search(rest)
      key = classify(op_name.group(1) if op_name else "")
      current.flops_by[key] = current.flops_by.get(key, 0.0) + flops
    trip = _TRIP.search(rest)
    condition = _CONDITION.search(rest)
    for kind, callees in _CALLS.findall(rest):
      for callee in re.split(r"[,\s]+", callees):
        callee = callee.strip().lstrip("%")
        if not callee:
          continue
        multiplier = 1.0
        if kind == "body":
          multiplier = float(trip.group(1)) if trip else (condition.group(1) if condition else 1.0)
        current.calls.append((callee, multiplier))
  computations["__entry__"] = computations[entry]
  return computations


def count(hlo_text: str) -> float:
  """Total dot + convolution FLOPs of the program (per device for an SPMD program)."""
  return sum(breakdown(hlo_text).values())


def breakdown(hlo_text: str) -> dict[str, float]:
  """Dot + convolution FLOPs by `classify` key ('lm/backward', ...), loops counted."""
  computations = parse(hlo_text)
  return breakdown_of(computations, computations["__entry__"].name)


def instruction_flops(computation: _Computation, name: str) -> float:
  """One dot's or convolution's FLOPs (0 for anything else)."""
  return computation.by_instruction.get(name, 0.0)


def breakdown_of(computations: dict[str, _Computation], name: str) -> dict[str, float]:
  """breakdown() of one computation of `parse`'s result and what it calls."""
  memo: dict[str, dict[str, float]] = {}

  def trips(multiplier) -> float:
    if isinstance(multiplier, str):            # a while loop without known_trip_count
      condition = computations.get(multiplier)
      return float(condition.loop_bound) if condition and condition.loop_bound else 1.0
    return multiplier

  def total(name: str, depth: int = 0) -> dict[str, float]:
    if name in memo:
      return memo[name]
    comp: Optional[_Computation] = computations.get(name)
    if comp is None or depth > 200:
      return {}
    value = dict(comp.flops_by)
    for callee, multiplier in comp.calls:
      for key, flops in total(callee, depth + 1).items():
        value[key] = value.get(key, 0.0) + trips(multiplier) * flops
    memo[name] = value
    return value

  return total(name)
