"""Test set-up: CPU only, 8 fake devices (DESIGN.md §3), before anything imports jax."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
  return os.path.join(REPO, "experiments", "configs", f"{name}.py")


@pytest.fixture(scope="session")
def tiny_config():
  from flamingo_jax import config_base
  return config_base.load_config(config_path("tiny"))
