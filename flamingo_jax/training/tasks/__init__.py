"""Training tasks as data, and the one dispatcher (`config.task`).

    task = tasks.task_of(config)              # config.task: "flamingo" | "contrastive"
    setup = tasks.make_train_setup(config, mesh)
    params = tasks.initial_params(config)    # every parameter from the config's seed

A task says how to build its model (`make_model`), what shapes its parameters
(`init_args`), which of them train (`split`), its whole train setup (`make_setup`: loss and
gradients, optimizer, mesh checks, shardings, the jitted init and step), its analytic FLOPs
per stream (`stream_flops`) and its parameter counts (`count_params`). Adding a task: a module
beside these with those names, and one line in TASKS.
"""

import dataclasses
from typing import Any, Callable

import haiku as hk
import jax

from flamingo_jax import models
from flamingo_jax.models import contrastive as contrastive_model
from flamingo_jax.training.tasks import contrastive
from flamingo_jax.training.tasks import flamingo
from flamingo_jax.training import train_step


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  make_model: Callable[..., hk.Transformed]         # (model_config, compute_dtype=, vision_batching=)
  init_args: Callable[[Any], tuple]                 # model_config -> inputs for model.init
  split: Callable[[hk.Params, Any], tuple[hk.Params, hk.Params]]   # -> (trainable, frozen)
  make_setup: Callable[..., train_step.TrainSetup]  # (config, mesh=None, rules=None)
  stream_flops: Callable[[Any, Any], dict]          # (model_config, stream spec) -> by part
  count_params: Callable[[Any], dict]               # model_config -> by component


TASKS = {
    "flamingo": Task("flamingo", flamingo.make_model, flamingo.init_args,
                     models.split_trainable, flamingo.make_setup, flamingo.stream_flops,
                     models.count_params),
    "contrastive": Task("contrastive", contrastive.make_model, contrastive.init_args,
                        contrastive.split, contrastive.make_setup, contrastive.stream_flops,
                        contrastive_model.count_params),
}


def task_of(config: Any) -> Task:
  """The task `config.task` names (a config from before the key existed: flamingo)."""
  name = config.get("task", "flamingo")
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name]


def make_train_setup(config: Any, mesh=None, rules=None) -> train_step.TrainSetup:
  """Model, optimizer, shardings and the jitted init and step of `config`'s task."""
  if (config.model.get("attention_impl") == "cudnn"
      and config.precision.compute not in ("bfloat16", "float16")):
    raise ValueError(f"attention_impl=cudnn needs precision.compute=bfloat16 (cuDNN's flash "
                     f"attention takes half precision only; got {config.precision.compute}): "
                     f"set it, or attention_impl=auto")
  return task_of(config).make_setup(config, mesh, rules)


def initial_params(config: Any, rng: jax.Array | None = None) -> hk.Params:
  """Every parameter of `config.model` from `rng` (default: the config's seed), float32,
  unsharded: the model's one init (inference, checks, benchmarks)."""
  task = task_of(config)
  rng = jax.random.key(config.seed) if rng is None else rng
  return jax.jit(task.make_model(config.model).init)(rng, *task.init_args(config.model))


def step_flops(config: Any) -> dict[str, Any]:
  """Analytic FLOPs of one accumulate-mode step over every stream: {total, by_stream,
  by_component}."""
  stream_flops = task_of(config).stream_flops
  by_stream, by_component = {}, {}
  for name, spec in config.data.streams.items():
    parts = stream_flops(config.model, spec)
    by_stream[name] = sum(parts.values())
    for key, value in parts.items():
      by_component[key] = by_component.get(key, 0.0) + value
  return {"total": sum(by_stream.values()), "by_stream": by_stream, "by_component": by_component}
