"""The layout's rules (docs/design.md §2), checked over the source: one-way imports between
the package's parts, no import cycle, no module over 450 lines, imports at the top but for
the deliberate ones, and no document cited that the repository does not hold."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "flamingo_jax")

# What each part may import of ours (docs/design.md §2). Entry points (train, generate,
# evaluate, tools) may import anything; nothing imports them.
ALLOWED = {
    "models": set(),
    "config_base": set(),
    "lease": set(),
    "host": set(),
    "data": {"config_base", "lease"},
    "weights": {"config_base", "models"},
    "inference": {"models"},
    "evaluation": {"data", "inference"},
    "training": {"config_base", "data", "lease", "models", "weights"},
    "cli": {"config_base", "training"},
}
ENTRY_POINTS = {"train", "generate", "evaluate", "tools"}
# Imports inside functions on purpose: optional dependencies, read only when used.
DELIBERATE_LATE_IMPORTS = {("weights.openflamingo", "torch"),        # the `torch` extra
                           ("evaluation.report", "matplotlib"),      # the `dev` extra
                           ("evaluation.report", "matplotlib.pyplot")}
MAX_LINES = 450


def _modules() -> dict[str, str]:
  """{dotted name relative to the package ("training.trainer"): path}."""
  found = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        found[module.removesuffix(".__init__") if module != "__init__" else ""] = path
  return found


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, bool]]:
  """[(our module imported, relative to the package; whether at the top level)]."""
  tree = ast.parse(open(path).read())
  top = {id(node) for node in tree.body}
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      submodules = [f"{node.module}.{a.name}" for a in node.names]
      names = [n for n in submodules if n.removeprefix("flamingo_jax.") in MODULES] or [
          node.module]
    for name in names:
      out.append((name, id(node) in top))
  return out


def _ours(name: str) -> str | None:
  if name != "flamingo_jax" and not name.startswith("flamingo_jax."):
    return None
  return name.removeprefix("flamingo_jax").removeprefix(".")


def _part(module: str) -> str:
  return module.split(".")[0]


def test_parts_import_one_way():
  wrong = []
  for module, path in MODULES.items():
    part = _part(module)
    for name, _ in _imports(path):
      target = _ours(name)
      if target is None or _part(target) == part or not module:
        continue
      if _part(target) in ENTRY_POINTS:
        wrong.append(f"{module} imports the entry point {target}")
      elif part not in ENTRY_POINTS and _part(target) not in ALLOWED[part]:
        wrong.append(f"{module} imports {target}")
  assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
  graph = {m: set() for m in MODULES}
  for module, path in MODULES.items():
    for name, _ in _imports(path):
      target = _ours(name)
      if target is not None and target in MODULES and target != module:
        graph[module].add(target)
  # Depth-first search for a back edge; the path to it is the cycle.
  state, cycles = {}, []

  def visit(node, trail):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, trail + [nxt])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "\n".join(cycles)


def test_modules_are_short():
  long = {m: n for m, p in MODULES.items() if (n := len(open(p).read().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_imports_are_at_the_top():
  late = [(module, name) for module, path in MODULES.items()
          for name, at_top in _imports(path) if not at_top]
  assert set(late) <= DELIBERATE_LATE_IMPORTS, sorted(set(late) - DELIBERATE_LATE_IMPORTS)


def _text_files():
  for directory, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("data", "__pycache__")]
    for name in files:
      if name.endswith((".py", ".md", ".sh")):
        yield os.path.join(directory, name)


@pytest.mark.parametrize("pattern", [r"\bdocs/[a-z_]+\.md\b", r"\b[A-Z]+\.md\b"])
def test_cited_documents_exist(pattern):
  missing = set()
  for path in _text_files():
    for cited in re.findall(pattern, open(path, errors="replace").read()):
      here = os.path.join(os.path.dirname(path), cited)
      if not (os.path.exists(os.path.join(ROOT, cited)) or os.path.exists(here)):
        missing.add(f"{os.path.relpath(path, ROOT)}: {cited}")
  assert not missing, "\n".join(sorted(missing))
