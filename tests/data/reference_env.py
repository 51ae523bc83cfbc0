"""Shared by the fixture scripts under tests/data (run in the reference venv of
docs/benchmarks.md, "The reference environment", never by the suite itself)."""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _Placeholder(type):
  """A class whose attributes are placeholders too (enum members, nested names)."""

  def __getattr__(cls, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _placeholder(f"{cls.__name__}.{attr}")

  def __hash__(cls):
    return id(cls)


def _placeholder(name: str) -> type:
  def absent(*args, **kwargs):
    raise RuntimeError(f"{name}: torchvision is not installed")
  return _Placeholder(name, (), {"__init__": absent})


class _AbsentTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Placeholder `torchvision.*` modules for timm's imports when no torchvision matches this
  torch (the registries' torch 2.13.0+cpu has none). timm imports torchvision for its data
  and norm utilities; the NFNet forward uses none of them, and a placeholder that is called
  raises."""

  def find_spec(self, name, path=None, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []

    def attribute(attr):
      if attr.startswith("__"):
        raise AttributeError(attr)
      return _placeholder(f"{spec.name}.{attr}")
    module.__getattr__ = attribute
    return module

  def exec_module(self, module):
    pass


def allow_missing_torchvision() -> None:
  """Lets timm / open_clip import without torchvision (their models need none of it)."""
  if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.append(_AbsentTorchvision())
