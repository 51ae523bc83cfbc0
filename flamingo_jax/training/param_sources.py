"""Where parameters come from: one rule for every reader, and their loaders.

    kind_of(path)              "run" | "folder"
    config = run_config(RUN)   the config a run was started with
    params, from_seed = load(config, path)                  # inference, checks, benchmarks
    params, mesh = place(config, params, "data=2,model=4")  # or "": one device, no mesh

The one rule: a path holding `config.json` is a training run's workdir ("run": its newest
loadable checkpoint, with the frozen towers it trained with); anything else is a parameter
folder ("folder": an import_weights output, whose parameters are in `params/`, or such a
`params/` directory itself, as weights.save_params writes it). Every reader goes through
`kind_of`: the inference tools (`load`), a training run's `config.init_from` (`init_from`),
and the contrastive hand-off (`restore_run`).

Reading a run restores its trainable parameters alone (no optimizer state, no train setup)
and its frozen towers from `frozen/` or their init checkpoints. Parameters a source does not
hold (the Flamingo modules around an LM-only import) come from the config's seed (the one
init: tasks.initial_params) and are named.
"""

import json
import os
from typing import Any

from absl import logging
import haiku as hk
import jax
import ml_collections

from flamingo_jax import config_base
from flamingo_jax import models
from flamingo_jax.training import checkpointing
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks
from flamingo_jax.training.tasks import contrastive
from flamingo_jax import weights

RUN, FOLDER = "run", "folder"


def kind_of(path: str) -> str:
  """RUN when `path` holds a run's config.json, else FOLDER."""
  return RUN if os.path.isfile(os.path.join(path, "config.json")) else FOLDER


def import_kind(path: str) -> str:
  """A whole-model import folder's kind ("openflamingo" | "idefics": the entry its model.json
  carries), else ""."""
  model_json = os.path.join(path, "model.json")
  if not os.path.isfile(model_json):
    return ""
  with open(model_json) as f:
    fields = json.load(f)
  return next((kind for kind in ("openflamingo", "idefics") if kind in fields), "")


def params_dir(path: str) -> str:
  """A parameter folder's orbax directory: `path/params` for an import folder, else `path`."""
  inner = os.path.join(path, "params")
  return inner if os.path.isdir(inner) else path


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (WORKDIR/config.json), options it predates at their
  defaults (config_base.with_defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found: is {workdir} a training run's workdir?")
  with open(path) as f:
    return config_base.with_defaults(ml_collections.ConfigDict(json.load(f)))


def init_paths(model_config: Any) -> list[tuple[str, str]]:
  """[(component, init checkpoint)] of the towers the config loads from imports."""
  lm = model_config.get("lm")       # a contrastive model has none
  return [(c, p) for c, p in (("lm", lm.init_checkpoint if lm else ""),
                              ("vision", model_config.vision.init_checkpoint)) if p]


def init_checkpoints(model_config: Any, frozen: hk.Params) -> hk.Params:
  """`frozen` with the LM / vision parameters replaced by those of their init checkpoints
  (parameter folders whose paths match ours, as tools/import_weights writes them); `frozen`
  may be arrays or ShapeDtypeStructs with shardings."""
  for component, path in init_paths(model_config):
    part, _ = hk.data_structures.partition(
        lambda module, name, value, c=component: models.component_of(module) == c, frozen)
    if component == "vision":
      weights.check_vision_import(path, model_config.vision)
    if not part:      # the component trains (lm.trainable): init_trainable loads it
      continue
    frozen = hk.data_structures.merge(frozen, weights.restore_params(path, part))
    logging.info("loaded %s from %s", component, path)
  return frozen


def init_trainable(model_config: Any, params: hk.Params) -> hk.Params:
  """Trainable parameters that an init checkpoint also holds, taken from it at a fresh start:
  an LM import's `<image>`/`<EOC>` rows (started at the mean pretrained row), a tower that
  trains (vision.trainable), a whole-model import's resampler and gated blocks."""
  for path in dict.fromkeys(p for _, p in init_paths(model_config)):
    stored = weights.stored_param_names(path)
    part, _ = hk.data_structures.partition(lambda module, name, value: (module, name) in stored,
                                           params)
    if part:
      params = hk.data_structures.merge(params, weights.restore_params(path, part))
  return params


def _abstract(config: Any, mesh) -> tuple[hk.Params, hk.Params]:
  """(trainable, frozen) ShapeDtypeStructs of config's model, sharded on `mesh` by the
  partition rules: restore targets, computed without running the init."""
  task = tasks.task_of(config)
  shapes = jax.eval_shape(lambda: tasks.initial_params(config))
  model_axis = mesh.shape[sharding.MODEL]
  rules = (sharding.rules_for(config.model, model_axis) if task.name == "flamingo"
           else sharding.PARTITION_RULES)
  specs = sharding.named(mesh, sharding.param_specs(shapes, rules))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, specs)
  return task.split(target, config.model)


def restore_run(config: Any, workdir: str, mesh=None) -> tuple[hk.Params, int]:
  """(every parameter of a run's newest loadable checkpoint, its step) on `mesh` (default:
  all devices over 'data'): the trainable ones read alone, the frozen towers from frozen/ or
  their init checkpoints (or the seed, as the run made them)."""
  mesh = mesh or sharding.make_mesh(-1, 1)
  trainable, frozen_target = _abstract(config, mesh)
  workdir = workdir if "://" in workdir else os.path.abspath(workdir)
  ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints, async_save=False)
  try:
    restored = ckpt.restore_params(trainable)
    if restored is None:
      raise ValueError(f"no checkpoint in {workdir}/checkpoints")
    frozen = ckpt.restore_frozen_into(frozen_target)
  finally:
    ckpt.close()
  if frozen is None:
    if not init_paths(config.model):
      raise ValueError(f"{workdir} has no frozen/ and the config names no init_checkpoint")
    _, seeded = tasks.task_of(config).split(tasks.initial_params(config), config.model)
    frozen = init_checkpoints(config.model, jax.tree.map(
        lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), seeded, frozen_target))
  params, step = restored
  return hk.data_structures.merge(params, frozen), step


def _run_at_mesh(workdir: str, mesh) -> ml_collections.ConfigDict:
  """A run's config with its batches set to fit `mesh` (they shape no parameter)."""
  config = run_config(workdir)
  for name, stream in config.data.streams.items():
    stream.batch_size = mesh.shape[sharding.DATA]
    config.train.microbatches[name] = 1
  return config


def init_from(source: str, setup) -> tuple[hk.Params, hk.Params]:
  """`config.init_from`: (trainable, frozen) parameters of `setup`'s model, every one taken
  from `source` (a run or a folder, by kind_of) and split by this config's trainability
  (fine-tuning: the vision tower trains now). A parameter `source` lacks, or of another
  shape, is an error naming it."""
  target = hk.data_structures.merge(
      jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                   setup.abstract_state.params, setup.state_shardings.params),
      jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                   setup.abstract_frozen, setup.frozen_shardings))
  if kind_of(source) == RUN:
    loaded, _ = restore_run(_run_at_mesh(source, setup.mesh), source, setup.mesh)
    for module, name, value in hk.data_structures.traverse(target):
      have = loaded.get(module, {}).get(name)
      if have is None:
        raise ValueError(f"config.init_from={source} has no parameter {module}/{name} (a run "
                         f"of another model?)")
      if tuple(have.shape) != tuple(value.shape):
        raise ValueError(f"config.init_from={source}: {module}/{name} is {tuple(have.shape)} "
                         f"but this config's is {tuple(value.shape)}")
    params = jax.tree.map(lambda t, x: jax.device_put(x.astype(t.dtype), t.sharding), target,
                          {m: {n: loaded[m][n] for n in leaves} for m, leaves in target.items()})
  else:
    path = params_dir(source)
    if not os.path.isdir(path):
      raise ValueError(f"config.init_from={source} is neither a run's workdir (config.json) "
                       f"nor a parameter folder")
    params = weights.restore_params(path, target)
  trainable = {m: {n: params[m][n] for n in leaves}
               for m, leaves in setup.abstract_state.params.items()}
  frozen = {m: {n: params[m][n] for n in leaves} for m, leaves in setup.abstract_frozen.items()}
  logging.info("parameters from %s (config.init_from)", source)
  return trainable, frozen


def load(config: Any, path: str) -> tuple[hk.Params, list[str]]:
  """(every parameter of config's model from `path`, names of those that came from the
  seed)."""
  if not os.path.exists(path):
    raise weights.CheckpointError(f"{path!r} does not exist")
  init_params = tasks.initial_params(config)
  if kind_of(path) == RUN:
    loaded, _ = restore_run(config, path)
  else:
    path = params_dir(path)
    stored = weights.stored_param_names(path)
    part, _ = hk.data_structures.partition(lambda m, n, v: (m, n) in stored, init_params)
    if not part:
      raise weights.CheckpointError(f"{path} holds none of this config's parameters")
    loaded = weights.restore_params(path, part)
  names = {(m, n) for m, n, _ in hk.data_structures.traverse(loaded)}
  missing = sorted(f"{m}/{n}" for m, n, _ in hk.data_structures.traverse(init_params)
                   if (m, n) not in names)
  return hk.data_structures.merge(init_params, loaded), missing


def place(config: Any, params: hk.Params, mesh_spec: str):
  """(params sharded over a `data=D,model=M` mesh by training's partition rules, the mesh),
  or (params, None) when `mesh_spec` is empty (inference on one device)."""
  if not mesh_spec:
    return params, None
  data, model = sharding.parse_mesh(mesh_spec, -1, 1)
  mesh = sharding.make_mesh(data, model)
  sharding.check_model_fits_mesh(config.model, model)
  specs = sharding.named(mesh, sharding.param_specs(params, sharding.rules_for(config.model,
                                                                                model)))
  params = jax.device_get(params)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                      params, specs), mesh


def contrastive_vision(workdir: str) -> tuple[dict, dict]:
  """(params under flamingo/vision_encoder, model.json fields) of a contrastive run's newest
  checkpoint: its NFNet handed to a Flamingo run (docs/paper.md §5). Raises
  weights.CheckpointError."""
  try:
    config = run_config(workdir)
  except ValueError as e:
    raise weights.CheckpointError(str(e)) from e
  if tasks.task_of(config).name != "contrastive":
    raise weights.CheckpointError(f"{workdir} is not a contrastive run (its config.json has "
                                  f"task={tasks.task_of(config).name!r})")
  try:
    params, _ = restore_run(config, workdir)
  except (ValueError, checkpointing.NoLoadableCheckpointError) as e:
    raise weights.CheckpointError(str(e)) from e
  vision = config.model.vision
  fields = {"vision": {"kind": "nfnet", "variant": vision.variant,
                       "activation": vision.activation, "numerics": vision.numerics}}
  return jax.device_get(contrastive.export_vision(params)), fields
