"""Mesh ('data', 'model'), partition rules (data, not code), ZeRO-1 specs (docs/design.md §8).

Parameters get their PartitionSpec from one ordered table of (regex on "module/param" path,
spec), first match wins. Specs name the trailing dimensions; leading layer-stack dimensions
([G, k, ...] from hk.layer_stack) are left unsharded. Megatron on 'model': embedding split on
vocab, q/k/v and ffw_in column-parallel, attention output and ffw_out row-parallel, in the LM,
the gated xattn blocks and the resampler. The NFNet is replicated (as in the paper).
"""

import collections
import re
from typing import Any, Iterable, Optional, Sequence

import haiku as hk
import jax
from jax.experimental import mesh_utils
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

# Ordered: first match wins. Paths look like "flamingo/language_model/groups/xattn/ffw/ffw_in/w".
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"language_model/token_embed/embeddings$", P(MODEL, None)),   # vocab-parallel
    (r"language_model/unembed/w$", P(None, MODEL)),                 # vocab-parallel logits
    (r"text_encoder/token_embed/embeddings$", P(MODEL, None)),      # contrastive text tower
    (r"/(query|key|value)/w$", P(None, MODEL)),                     # column-parallel
    (r"/(query|key|value)/b$", P(MODEL)),
    (r"/output/w$", P(MODEL, None)),                                # row-parallel
    (r"/ffw_(in|gate)/w$", P(None, MODEL)),                         # column-parallel
    (r"/ffw_(in|gate)/b$", P(MODEL)),
    (r"/ffw_out/w$", P(MODEL, None)),                               # row-parallel
    (r"/(output|ffw_out)/b$", P()),                                 # added after the all-reduce
    (r"vision_encoder/", P()),                                      # NFNet: replicated
    (r"perceiver_resampler/input_projection/w$", P()),              # 3072x1536, replicated
    (r"(image|text)_projection/w$", P()),                           # contrastive heads
)
# Parameters no rule names are replicated, but only if small: a big one is a missing rule.
MAX_UNMATCHED_SIZE = 1_000_000


def rules_for(model_config: Any, model_axis: int,
              rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> tuple[tuple[str, P], ...]:
  """`rules` for this model on a 'model' axis of `model_axis`: grouped-query key/value heads
  are split over 'model' when their number divides it, and replicated otherwise."""
  kv_heads = model_config.lm.get("num_kv_heads", 0) or model_config.lm.num_heads
  if kv_heads % model_axis:
    return ((r"language_model/.*/self_attention/(key|value)/[wb]$", P()),) + tuple(rules)
  return tuple(rules)


def parse_mesh(text: str, default_data: int, default_model: int) -> tuple[int, int]:
  """"data=D,model=M" (either may be left out: the defaults) -> (D, M)."""
  values = {"data": default_data, "model": default_model}
  for part in filter(None, text.split(",")):
    key, _, value = part.partition("=")
    if key not in values or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: expected data=D,model=M")
    values[key] = int(value)
  return values["data"], values["model"]


def topology_devices(topology: str) -> list:
  """The devices of a TPU topology ("v4:8x12x16", from libtpu; no TPU needed: each device
  knows its process and coordinates), or "cpu": this machine's devices."""
  if topology == "cpu":
    return jax.devices()
  kwargs = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           **kwargs).devices)


def make_mesh(data: int, model: int, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Mesh ('data', 'model') over `devices` (default: all). data=-1: all the devices left."""
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  if model < 1 or count % model:
    raise ValueError(f"mesh model={model} does not divide the {count} devices")
  if data == -1:
    data = count // model
  if data * model != count:
    raise ValueError(f"mesh data={data} x model={model} = {data * model} but there are "
                     f"{count} devices")
  try:
    grid = mesh_utils.create_device_mesh((data, model), devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def check_model_fits_mesh(model_config: Any, model_axis: int) -> None:
  """Megatron needs every split dimension divisible by the 'model' axis; names the culprit."""
  cfg = model_config
  split = {
      "model.vocab_size": cfg.vocab_size,
      "model.lm.num_heads": cfg.lm.num_heads,
      "model.lm.ffw_size": cfg.lm.ffw_size,
      "model.xattn.num_heads": cfg.xattn.num_heads,
      "model.xattn.ffw_mult * model.lm.dim": cfg.xattn.ffw_mult * cfg.lm.dim,
      "model.resampler.num_heads": cfg.resampler.num_heads,
      "model.resampler.ffw_mult * model.resampler.dim": cfg.resampler.ffw_mult * cfg.resampler.dim,
  }
  bad = {k: v for k, v in split.items() if v % model_axis}
  if bad:
    raise ValueError(f"mesh model={model_axis} does not divide " +
                     ", ".join(f"{k}={v}" for k, v in bad.items()))


def assign_data_shards(process_grid: np.ndarray) -> list[tuple[int, ...]]:
  """The data shards each process feeds, from which process owns each device of the mesh.

  `process_grid` is int [data, model]: the process index of the device at each mesh position
  (`process_grid(mesh)`, or a topology's devices laid out as `make_mesh` lays them out, to
  check a pod without one). Data shard d (mesh row d) holds rows [d·b, (d+1)·b) of every
  global batch (b = batch / data); a process feeds every shard any of its devices hold, so
  the processes of a model group that spans hosts feed the same shard and, the pipeline being
  a function of (seed, shard, position), produce the same rows without talking to each other.
  Returns, per process index, its shards in increasing order.

  Raises for meshes the loader cannot feed evenly: a process with no device in the mesh, or
  processes feeding different numbers of shards (the host with more would decode more
  examples per step and hold every step back).
  """
  grid = np.asarray(process_grid)
  if grid.ndim != 2:
    raise ValueError(f"process grid has shape {grid.shape}; expected [data, model]")
  count = int(grid.max()) + 1
  shards = [sorted({int(d) for d in np.nonzero((grid == p).any(axis=1))[0]}) for p in range(count)]
  idle = [p for p, s in enumerate(shards) if not s]
  if idle:
    raise ValueError(f"processes {idle} own no device of the {grid.shape[0]}x{grid.shape[1]} "
                     f"mesh and cannot feed it; build the mesh over every process's devices")
  sizes = collections.Counter(len(s) for s in shards)
  if len(sizes) > 1:
    most = max(range(count), key=lambda p: len(shards[p]))
    fewest = min(range(count), key=lambda p: len(shards[p]))
    raise ValueError(
        f"the mesh gives processes unequal input work: process {most} feeds data shards "
        f"{shards[most]}, process {fewest} feeds {shards[fewest]}; choose mesh axes so that "
        f"every host's devices cover the same number of data shards (e.g. model dividing or "
        f"a multiple of the devices per host)")
  return [tuple(s) for s in shards]


def process_grid(mesh: Mesh) -> np.ndarray:
  """int [data, model]: the process owning each device of `mesh`."""
  return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)


def check_batches_fit_mesh(streams: Any, data_axis: int, microbatches: Any) -> None:
  for name, spec in streams.items():
    parts = data_axis * microbatches.get(name, 1)
    if spec.batch_size % parts:
      raise ValueError(f"stream {name!r}: batch_size={spec.batch_size} is not divisible by "
                       f"mesh data={data_axis} x microbatches={microbatches.get(name, 1)}")


def _full_spec(spec: P, ndim: int, path: str) -> P:
  if len(spec) > ndim:
    raise ValueError(f"rule spec {spec} has more dims than parameter {path} (rank {ndim})")
  return P(*((None,) * (ndim - len(spec)) + tuple(spec)))


def spec_for(path: str, shape: Sequence[int],
             rules: Iterable[tuple[str, P]] = PARTITION_RULES) -> P:
  """PartitionSpec of one parameter "module/name" of `shape`, by the first matching rule."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return _full_spec(spec, len(shape), path)
  size = int(np.prod(shape))
  if size > MAX_UNMATCHED_SIZE:
    raise ValueError(f"no partition rule matches {path} {tuple(shape)} ({size:,} elements > "
                     f"{MAX_UNMATCHED_SIZE:,}); add a rule to sharding.PARTITION_RULES")
  return P()


def param_specs(params: hk.Params, rules: Iterable[tuple[str, P]] = PARTITION_RULES) -> hk.Params:
  """The Haiku dict of PartitionSpecs for `params` (arrays or ShapeDtypeStructs)."""
  rules = tuple(rules)
  return {module: {name: spec_for(f"{module}/{name}", value.shape, rules)
                   for name, value in leaves.items()}
          for module, leaves in params.items()}


def zero1_spec(spec: P, shape: Sequence[int], data_axis: int) -> P:
  """ZeRO-1: the parameter's spec plus 'data' on the largest free dimension that divides."""
  if data_axis == 1:
    return spec
  free = [i for i, axis in enumerate(spec) if axis is None and shape[i] % data_axis == 0]
  if not free:
    return spec  # small leaf (gates, odd sizes): replicated over 'data'
  best = max(free, key=lambda i: shape[i])
  return P(*(DATA if i == best else axis for i, axis in enumerate(spec)))


def _param_key(path) -> Optional[tuple[str, str]]:
  """(module, name) when a tree path ends in two dict keys, as param-shaped leaves do."""
  keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
  return (keys[-2], keys[-1]) if len(keys) >= 2 else None


def state_specs(tree: Any, specs: hk.Params, *, zero1_data_axis: int = 1) -> Any:
  """Specs for any tree whose param-shaped leaves sit under (module, name) keys: params,
  gradients, optimizer states (mu, nu). Other leaves (step counts) are replicated."""

  def leaf_spec(path, leaf):
    key = _param_key(path)
    if key is None or key[0] not in specs or key[1] not in specs[key[0]]:
      return P()
    spec = specs[key[0]][key[1]]
    return zero1_spec(spec, leaf.shape, zero1_data_axis) if zero1_data_axis > 1 else spec

  return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def spec_table(params: hk.Params, rules: Iterable[tuple[str, P]] = PARTITION_RULES) -> dict[str, str]:
  """{"module/name": "PartitionSpec(...)"} — the snapshot the tests keep."""
  specs = param_specs(params, rules)
  return {f"{m}/{n}": str(tuple(s)) for m, leaves in specs.items() for n, s in leaves.items()}
