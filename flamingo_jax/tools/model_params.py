"""Parameters for inference and checks, from wherever a user has them.

  params, from_seed = load(config, path)
  params, mesh = place(config, params, "data=2,model=4")     # or "": one device, no mesh

`path`: a run's workdir (its newest loadable checkpoint, with the frozen towers it trained
with), an import_weights output folder, or a parameter directory (its `params/`).
Parameters the source does not hold (the Flamingo modules around an LM-only import) are
initialised from `config.seed` and their names returned.
"""

import os
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax import models
from flamingo_jax import weights


def initial(config: Any) -> hk.Params:
  """Every parameter of `config.model`, from the config's seed (float32)."""
  size = config.model.image_size
  return jax.jit(models.make_flamingo(config.model).init)(
      jax.random.key(config.seed), jnp.zeros((1, 8), jnp.int32),
      jnp.zeros((1, 1, 1, size, size, 3), jnp.uint8))


def load(config: Any, path: str) -> tuple[hk.Params, list[str]]:
  """(params, names of the parameters that came from the seed)."""
  from flamingo_jax.training import trainer  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise weights.CheckpointError(f"{path!r} does not exist")
  init_params = initial(config)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    loaded = trainer.restore_workdir_params(config, path)
  else:
    if os.path.isdir(os.path.join(path, "params")):
      path = os.path.join(path, "params")
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
  from flamingo_jax.training import sharding  # pylint: disable=g-import-not-at-top
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
