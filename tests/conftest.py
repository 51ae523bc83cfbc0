"""Test set-up: CPU only, 8 fake devices (docs/design.md §3), before anything imports jax."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# Unoptimised XLA:CPU code: compiles take ~40% less time, steps run ~2x slower, and tests
# compile far more than they run; the classic fusion emitters compile the tiny train step in
# ~25% less time again (29 -> 22 s). Every run inside a test uses the same flags, so
# comparisons between runs hold.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {XLA_TEST_FLAGS}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Persistent XLA cache: runs that compile the same program (in this process or the trainer
# subprocesses, which inherit the environment) compile it once. Delete .jax_cache to reset.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TPU topologies (libtpu, no TPU) in a test and in its subprocesses or another worker at
# once: libtpu's one-process lockfile guards real chips, which tests never open.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needs_reference(*modules: str, script: str):
  """Skips a test unless the reference libraries `modules` are installed (the fixture
  regeneration tests; the libraries live in the reference venv, never in CI's)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  return pytest.mark.skipif(bool(missing), reason=f"{'/'.join(missing)} not installed "
                                                  f"(see {script})")


def regenerate_fixture(script: str, out_dir) -> None:
  """Runs a fixture script of tests/data (its reference library installed) into `out_dir`."""
  import subprocess  # pylint: disable=g-import-not-at-top
  result = subprocess.run([sys.executable, script, str(out_dir)], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]


def config_path(name: str) -> str:
  return os.path.join(REPO, "experiments", "configs", f"{name}.py")


@pytest.fixture(scope="session")
def tiny_config():
  from flamingo_jax import config_base
  return config_base.load_config(config_path("tiny"))
