"""What every command line shares: its common flags, defined here once, the config they
build, start-up (the compilation cache, distributed), and misuse as one line on stderr (exit 2), not a traceback.

    _CONFIG = cli.define_config(run_flags=("workdir",))   # --config=FILE[:ARG], --config.K=V
    _WORKDIR = cli.define_workdir("A training run.")
    cli.define_start()
    def main(argv):
      cli.start()                # the compilation cache, distributed start-up
      config = _CONFIG.value
    if __name__ == "__main__":
      cli.run(main)            # instead of absl's app.run(main)

The config: `--config=FILE[:ARG]` (ARG in the grammar of config_base.parse_arg:
`key=value` pairs and switches, `pretrained.py:lm=DIR,runlocal`); without it, the run named
by one of `run_flags` (a workdir: its config.json; an OpenFlamingo or IDEFICS import folder:
its model.json through experiments/configs/{kind}.py). `--config.KEY=VALUE` overrides apply
on top, typed as the field they replace; then the config is locked, so an unknown key is an
error with the nearest names.
"""

import ast
import difflib
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import jax
import ml_collections

from flamingo_jax import config_base
from flamingo_jax.training import param_sources

# --config.KEY=VALUE, or --config.KEY alone (a boolean set to true).
_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(?:=(.*))?$", re.S)
_IMPORT_KINDS = ("openflamingo", "idefics")        # import folders that carry their config


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


class ConfigKeyError(ValueError):
  """An override names a key the config does not have."""


def _parse_value(text: str, current: Any, key: str) -> Any:
  """`text` as the type of the field it replaces (absl's parsers for scalars, Python literals
  for sequences and fields that are None)."""
  try:
    if isinstance(current, bool):
      return flags.BooleanParser().parse(text)
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, ml_collections.ConfigDict):
      raise ValueError("a section; set its keys one by one")
    value = ast.literal_eval(text)
    if isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
      value = (value,)
    return type(current)(value) if isinstance(current, (list, tuple)) else value
  except (ValueError, SyntaxError) as e:
    kind = type(current).__name__
    raise ValueError(f"--config.{key}={text}: not a valid {kind} ({e})") from None


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
  """`config` with each ("a.b.c", "text") override set, typed as the field it replaces, then
  locked: a key the config lacks is a ConfigKeyError with the nearest names."""
  for key, text in overrides:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        known = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        near = difflib.get_close_matches(part, known, n=3)
        where = ".".join(parts[:depth]) or "the config"
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise ConfigKeyError(f"--config.{key}={text}: {where} has no key {part!r}{hint}")
      if depth < len(parts) - 1:
        node = node[part]
    node[parts[-1]] = _parse_value(text, node[parts[-1]], key)
  config.lock()
  return config


class ConfigHolder:
  """`.value`: the command's config (None when it takes none and none was given)."""

  def __init__(self, run_flags: Sequence[str], required: bool):
    self.run_flags, self.required = tuple(run_flags), required
    self.overrides: list[tuple[str, str]] = []
    self.value: Optional[ml_collections.ConfigDict] = None

  def build(self) -> None:
    spec = flags.FLAGS["config"].value
    if spec:
      try:
        config = config_base.load_config(spec)
      except Exception as e:  # pylint: disable=broad-except  (a config file's own error)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _fail(f"--config={spec}: {lines[-1] if lines else type(e).__name__}")
    else:
      config = self._from_run()
    if config is None:
      if self.overrides:
        _fail(f"--config.{self.overrides[0][0]} given without a config: pass --config=FILE"
              + "".join(f" or --{name}=RUN" for name in self.run_flags))
      if self.required:
        _fail("--config=FILE is required" + "".join(f" (or --{name}=RUN)"
                                                     for name in self.run_flags))
      return
    try:
      self.value = apply_overrides(config, self.overrides)
    except ValueError as e:
      _fail(str(e))
    if flags.FLAGS["print_config"].value:
      print(self.value.to_json_best_effort(indent=2, sort_keys=True))
      sys.exit(0)

  def _from_run(self) -> Optional[ml_collections.ConfigDict]:
    """The config of the first run flag given: a training run's, or an import folder's."""
    for name in self.run_flags:
      path = flags.FLAGS[name].value
      if not path or not os.path.isdir(path):
        continue
      try:
        if param_sources.kind_of(path) == param_sources.RUN:
          return param_sources.run_config(path)
        kind = param_sources.import_kind(path)
        if kind in _IMPORT_KINDS:
          return config_base.imported_flamingo_config(path, kind)
      except ValueError as e:
        _fail(f"--{name}={path}: {e}")
      _fail(f"--{name}={path} is a parameter folder without a model config: pass "
            f"--config=FILE")
    return None


_HOLDER: Optional[ConfigHolder] = None


def define_config(run_flags: Sequence[str] = (), required: bool = True) -> ConfigHolder:
  """--config (and --config.KEY=VALUE overrides); `run_flags`: flags naming a run or import
  folder whose config is used when --config is absent."""
  global _HOLDER
  flags.DEFINE_string(
      "config", None, "Config: experiments/configs/FILE.py[:key=value,...,switch]"
      + (f"; default: that of --{' / --'.join(run_flags)}" if run_flags else "")
      + ". Override any key with --config.KEY=VALUE.")
  flags.DEFINE_bool("print_config", False, "Print the config this command would use (JSON, "
                    "overrides applied) and exit.")
  _HOLDER = ConfigHolder(run_flags, required)
  return _HOLDER


def define_workdir(help_text: str, required: bool = False) -> flags.FlagHolder:
  return flags.DEFINE_string("workdir", None, help_text, required=required)


def define_params() -> flags.FlagHolder:
  return flags.DEFINE_string("params", "", "An import_weights folder (or its params/) or a "
                             "training run's workdir.")


def define_mesh(help_text: str = "data=D,model=M over all devices (training's partition "
                "rules); default: one device.") -> flags.FlagHolder:
  return flags.DEFINE_string("mesh", "", help_text)


def define_json(help_text: str = "Print one JSON object.") -> flags.FlagHolder:
  return flags.DEFINE_bool("json", False, help_text)


# Compiled programs persist here between runs, so that a restart or a resume does not compile
# the step again (one directory per host; JAX keys entries by program, devices and versions).
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "flamingo_jax", "xla")


def define_start() -> None:
  """The flags `start` reads: distributed start-up and the compilation cache."""
  flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 (several processes "
                      "without a TPU: gloo collectives on CPU).")
  flags.DEFINE_integer("num_processes", 1, "Processes in the run.")
  flags.DEFINE_integer("process_id", 0, "This process's index.")
  flags.DEFINE_string("compilation_cache_dir", DEFAULT_COMPILATION_CACHE, "Persistent cache of "
                      "compiled programs ('' turns it off; JAX_COMPILATION_CACHE_DIR wins).")


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory` (unless the environment names one, or
  `directory` is empty). Programs that compile in under a second are not stored."""
  if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def start() -> None:
  """The one start-up, before any computation: the compilation cache, then distributed
  start-up: --coordinator_address (gloo on CPU), else a TPU pod's workers find each other from
  the environment; else one process."""
  enable_compilation_cache(flags.FLAGS["compilation_cache_dir"].value)
  coordinator = flags.FLAGS["coordinator_address"].value
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=flags.FLAGS["num_processes"].value,
                               process_id=flags.FLAGS["process_id"].value)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()


def parse_flags(argv: list[str]) -> list[str]:
  """--config.KEY=VALUE taken out, absl's parsing of the rest, then the config built."""
  rest = list(argv)
  if _HOLDER is not None:
    rest = [argv[0]]
    for arg in argv[1:]:
      match = _OVERRIDE.match(arg)
      if match:
        _HOLDER.overrides.append((match.group(1), "true" if match.group(2) is None
                                  else match.group(2)))
      else:
        rest.append(arg)
  try:
    remaining = flags.FLAGS(rest)
  except flags.Error as e:
    _fail(str(e))
  if _HOLDER is not None:
    _HOLDER.build()
  return remaining


def run(main) -> None:
  app.run(main, flags_parser=parse_flags)


class Progress:
  """`[label] done/total unit, rate, ETA` on stderr, one terminal line updated in place
  (long batch commands: generate, evaluate)."""

  def __init__(self, total: int, label: str, *, unit: str = "items", enabled: bool = True):
    self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
    self.done, self.start = 0, time.time()

  def update(self, count: int) -> None:
    self.done += count
    if not self.enabled:
      return
    rate = self.done / max(time.time() - self.start, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    end = "\n" if self.done >= self.total else ""
    print(f"\r[{self.label}] {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
          f"eta {eta:.0f}s", end=end, file=sys.stderr, flush=True)
