"""The command lines' shared grammar (config_base.parse_arg, cli.apply_overrides): one
argument grammar for every config file, typed overrides on a locked config, and commands that
take their config from the run they read."""

import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

from conftest import config_path
from flamingo_jax import cli
from flamingo_jax import config_base
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_argument_grammar_for_every_config_file():
  parse = config_base.parse_arg
  assert parse(None, "tiny.py") == {"runlocal": False}
  assert parse("runlocal", "tiny.py") == {"runlocal": True}
  assert parse("lm=a/b,vision=c,runlocal", "pretrained.py", keys=("lm", "vision")) == {
      "lm": "a/b", "vision": "c", "runlocal": True}
  # A bare word that is not a switch is the positional key: bench.py:1b, openflamingo.py:DIR.
  assert parse("1b", "bench.py", keys=("size",), positional="size") == {
      "size": "1b", "runlocal": False}
  assert parse("size=1b,runlocal", "bench.py", keys=("size",), positional="size")["size"] == "1b"
  with pytest.raises(ValueError, match=r"^unexpected 'bogus'; tiny.py takes runlocal$"):
    parse("bogus", "tiny.py")
  with pytest.raises(ValueError, match=r"unexpected 'size=1b'; pretrained.py takes lm=..., "
                                       r"vision=..., runlocal"):
    parse("size=1b", "pretrained.py", keys=("lm", "vision"))
  with pytest.raises(ValueError, match="unexpected '9b'"):          # one positional at most
    parse("1b,9b", "bench.py", keys=("size",), positional="size")


@pytest.mark.parametrize("spec, check", [
    ("bench.py:1b", lambda c: c.model.image_size == 224),
    ("bench.py:size=1b,runlocal", lambda c: c.model.image_size == 224 and c.train.steps == 10),
    ("tiny.py:runlocal", lambda c: c.train.steps == 10),
    ("finetune.py:3b", lambda c: c.model.image_size == 480),
    ("zoo.py:idefics-9b,runlocal", lambda c: c.model.lm.num_layers == 32 and c.train.steps == 10),
])
def test_config_files_take_the_grammar(spec, check):
  name, _, arg = spec.partition(":")
  assert check(config_base.load_config(f"{config_path(name[:-3])}:{arg}"))


def test_overrides_are_typed_and_the_config_locked():
  config = config_base.load_config(config_path("tiny"))
  config = cli.apply_overrides(config, [
      ("train.steps", "7"), ("optim.learning_rate", "3e-4"), ("model.lm.trainable", "true"),
      ("data.tokenizer_path", "x.model"), ("model.new_token_ids", "(4, 5)"),
      ("train.profile_steps", "3,5")])
  assert config.train.steps == 7 and isinstance(config.train.steps, int)
  assert config.optim.learning_rate == 3e-4 and config.model.lm.trainable is True
  assert config.data.tokenizer_path == "x.model" and tuple(config.model.new_token_ids) == (4, 5)
  assert tuple(config.train.profile_steps) == (3, 5)
  with pytest.raises(AttributeError):       # locked: a misspelt key in code fails too
    config.train.stepz = 3
  fresh = config_base.load_config(config_path("tiny"))
  with pytest.raises(cli.ConfigKeyError,
                     match=r"^--config.train.stepz=3: train has no key 'stepz'; did you mean "
                           r"'steps'\?$"):
    cli.apply_overrides(fresh, [("train.stepz", "3")])
  with pytest.raises(cli.ConfigKeyError, match="the config has no key 'tran'"):
    cli.apply_overrides(fresh, [("tran.steps", "3")])
  with pytest.raises(ValueError, match=r"--config.train.steps=abc: not a valid int"):
    cli.apply_overrides(fresh, [("train.steps", "abc")])
  with pytest.raises(ValueError, match=r"--config.train=3: not a valid ConfigDict \(a section"):
    cli.apply_overrides(fresh, [("train", "3")])


def _command(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def _errors(result):
  return [line for line in result.stderr.splitlines()
          if line.strip() and "oneDNN" not in line and "absl::InitializeLog" not in line]


@pytest.mark.slow
def test_commands_that_read_a_run_take_its_config(tmp_path):
  """--workdir=RUN alone: the run's config.json (with the overrides it trained with) is the
  config; --config overrides apply on top; --config replaces it."""
  run = str(tmp_path / "run")
  trained = config_base.load_config(config_path("tiny"))
  trained = cli.apply_overrides(trained, [("model.xattn.every", "1"),
                                                  ("data.data_dir", str(tmp_path / "data"))])
  workdir_lib.write_config(trained, run)
  for module in ("flamingo_jax.generate", "flamingo_jax.evaluate", "flamingo_jax.train",
                 "flamingo_jax.tools.image_text_probe"):
    result = _command(module, f"--workdir={run}", "--config.seed=5", "--print_config")
    assert result.returncode == 0, (module, result.stderr[-2000:])
    printed = json.loads(result.stdout)
    expected = json.loads(trained.to_json_best_effort())
    expected["seed"] = 5
    assert printed == expected, module
  result = _command("flamingo_jax.generate", f"--workdir={run}", "--print_config",
                    f"--config={config_path('tiny')}")
  assert json.loads(result.stdout)["model"]["xattn"]["every"] == 2
  result = _command("flamingo_jax.generate", f"--workdir={run}", "--config.seeed=5")
  assert result.returncode == 2 and _errors(result) == [
      "error: --config.seeed=5: the config has no key 'seeed'; did you mean 'seed'?"]
  result = _command("flamingo_jax.generate", f"--workdir={tmp_path / 'nothing'}",
                    "--prompt=x")
  assert result.returncode == 2 and _errors(result) == [
      "error: --config=FILE is required (or --workdir=RUN) (or --params=RUN)"]


@pytest.mark.slow
def test_an_import_folder_carries_its_config(tmp_path):
  """An OpenFlamingo / IDEFICS import folder (its model.json) is a config source for --params;
  an LM-only import is not, and says so."""
  folder = tmp_path / "of"
  folder.mkdir()
  sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
  import zoo  # pylint: disable=g-import-not-at-top
  # What import_weights --kind=openflamingo writes: the model's fields and its own entry.
  fields = dict(zoo.CHECKPOINTS["openflamingo-3b"], openflamingo={"source": "checkpoint.pt"})
  (folder / "model.json").write_text(json.dumps(fields))
  result = _command("flamingo_jax.generate", f"--params={folder}", "--print_config")
  assert result.returncode == 0, result.stderr[-2000:]
  expected = json.loads(config_base.imported_flamingo_config(str(folder), "openflamingo")
                        .to_json_best_effort())
  assert json.loads(result.stdout) == expected
  lm_only = tmp_path / "lm"
  lm_only.mkdir()
  (lm_only / "model.json").write_text(json.dumps({"lm": {}}))
  result = _command("flamingo_jax.generate", f"--params={lm_only}", "--prompt=x")
  assert result.returncode == 2 and _errors(result) == [
      f"error: --params={lm_only} is a parameter folder without a model config: pass "
      "--config=FILE"]


def test_each_shared_flag_is_defined_once():
  """--config, --workdir, --params, --mesh, --json and the distributed flags are defined in
  cli.py alone."""
  shared = ("config", "workdir", "params", "mesh", "json", "coordinator_address",
            "num_processes", "process_id")
  found = []
  for directory, _, files in os.walk(os.path.join(REPO, "flamingo_jax")):
    for name in files:
      if name.endswith(".py"):
        text = open(os.path.join(directory, name)).read()
        found += [(name, flag) for flag in shared
                  for _ in re.finditer(rf'DEFINE_\w+\(\s*"{flag}"', text)]
  assert sorted(found) == sorted(("cli.py", flag) for flag in shared)


def test_ml_collections_config_locks():
  """What apply_overrides relies on: a locked ConfigDict refuses new keys at every depth."""
  config = ml_collections.ConfigDict({"a": {"b": 1}})
  config.lock()
  with pytest.raises(AttributeError):
    config.a.c = 2


@pytest.mark.slow
def test_a_restart_compiles_from_the_persistent_cache(tmp_path):
  """cli.start's compilation cache (on by default): the train step compiled once is read back
  from disk by a fresh process-level cache (as a restarted run would), not compiled again."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  assert cli.DEFAULT_COMPILATION_CACHE                          # on unless turned off
  events = []
  jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
  saved = {k: jax.config.values[k] for k in ("jax_compilation_cache_dir",
                                              "jax_persistent_cache_min_compile_time_secs")}
  environment = os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  try:
    cli.enable_compilation_cache(str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    config = config_base.load_config(config_path("tiny"))
    setup = tasks.make_train_setup(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
    compile_step = lambda: setup.step.lower(setup.abstract_state, setup.abstract_frozen,
                                            setup.abstract_batches).compile()
    compile_step()
    assert os.listdir(tmp_path / "xla"), "nothing was written to the cache"
    hits, misses = (events.count(f"/jax/compilation_cache/cache_{e}") for e in ("hits", "misses"))
    assert misses >= 1
    jax.clear_caches()
    compilation_cache.reset_cache()                    # what a new process starts with
    compile_step()
    assert events.count("/jax/compilation_cache/cache_hits") == hits + 1
    assert events.count("/jax/compilation_cache/cache_misses") == misses
  finally:
    for key, value in saved.items():
      jax.config.update(key, value)
    if environment is not None:
      os.environ["JAX_COMPILATION_CACHE_DIR"] = environment
    compilation_cache.reset_cache()
