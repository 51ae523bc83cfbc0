"""The one name-mapping mechanism of every importer: a table of rules per family.

A rule is (pattern, transform): `pattern` is a regex that must match a whole source tensor
name, its named groups carry the numbers in it (layer, stage, block); `transform(tensor, xp,
ctx, groups)` returns {target: array}, with any transposes, reshapes and splits (a fused
q/k/v becomes three targets). `xp` is the array API (numpy when converting; jax.numpy under
`jax.eval_shape` when the LM loader checks shapes before reading anything); `ctx` is what a
family's transforms need of the target model (None for the towers).

Targets are our parameter paths `module/leaf`; `module/leaf@R` is row R of a layer-stacked
parameter, and `convert` stacks the rows (every row must be there). The LM families
(families.py) use logical block-relative targets instead, which loading.py places into the
scanned layer groups; the vision towers (vision.py) and OpenFlamingo's modules
(openflamingo.py) convert on the host with `convert`.
"""

import collections
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from flamingo_jax.weights.safetensors_io import CheckpointError

# (tensor, xp, ctx, groups of the name's match) -> {target: array}
Transform = Callable[[Any, Any, Any, dict], dict]
Rule = tuple[str, Transform]


def match(rules: Sequence[Rule], name: str) -> Optional[tuple[Transform, dict]]:
  """(transform, the match's named groups) of the first rule that names `name`, or None."""
  for pattern, transform in rules:
    found = re.fullmatch(pattern, name)
    if found:
      return transform, found.groupdict()
  return None


def to(target: str, fn: Optional[Callable[[Any], Any]] = None) -> Transform:
  """One tensor -> one target; `target` is formatted with the name's groups
  (`".../blocks/{module}/w@{layer}"`), `fn` transforms the tensor."""
  def transform(x, xp, ctx, groups):
    del xp, ctx
    return {target.format(**groups): x if fn is None else fn(x)}
  return transform


def transposed(x):
  """torch Linear [out, in] -> our [in, out]."""
  return np.ascontiguousarray(x.T)


def stack_rows(rows: dict[int, np.ndarray], count: int, what: str) -> np.ndarray:
  """{row: array} of a layer-stacked parameter -> [count, ...]; every row must be there."""
  if sorted(rows) != list(range(count)):
    raise CheckpointError(f"{what} has rows {sorted(rows)}, expected 0-{count - 1}")
  return np.stack([rows[i] for i in range(count)])             # a new, contiguous array


def convert(tensors: Iterable[tuple[str, np.ndarray]], rules: Sequence[Rule], *, what: str,
            ignored: Sequence[str] = (), rows: Optional[Callable[[str], int]] = None,
            ctx: Any = None, prefix: str = "") -> dict[str, dict[str, np.ndarray]]:
  """Source tensors -> {module: {leaf: array}} through `rules`.

  A name no rule matches is an error naming it (unless an `ignored` pattern does), as is a
  target filled twice. Rows (`module/leaf@R`) are stacked; `rows(module)` gives a stacked
  module's row count (default: one past the largest row seen), and missing rows are errors.
  `prefix`: what the source names had before the caller removed it (for the messages).
  """
  params = collections.defaultdict(dict)
  stacked = collections.defaultdict(dict)               # (module, leaf) -> {row: array}
  for name, tensor in tensors:
    found = match(rules, name)
    if found is None:
      if any(re.fullmatch(p, name) for p in ignored):
        continue
      raise CheckpointError(f"tensor {prefix}{name} has no place in our {what}")
    transform, groups = found
    for target, value in transform(np.asarray(tensor), np, ctx, groups).items():
      path, _, row = target.partition("@")
      module, _, leaf = path.rpartition("/")
      if row:
        slot = stacked[(module, leaf)]
        if int(row) in slot:
          raise CheckpointError(f"{what}: {path} row {row} is filled twice (by {prefix}{name})")
        slot[int(row)] = value
      else:
        if leaf in params[module]:
          raise CheckpointError(f"{what}: {path} is filled twice (by {prefix}{name})")
        params[module][leaf] = value
  for (module, leaf), per_row in stacked.items():
    count = rows(module) if rows else max(per_row) + 1
    params[module][leaf] = stack_rows(per_row, count, f"{what}: {module}/{leaf}")
  return dict(params)
