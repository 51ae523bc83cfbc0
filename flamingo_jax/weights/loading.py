"""Pretrained LM weights into our parameter tree, one tensor at a time, straight to shardings.

    plan = import_plan(hf_dir, kind)                  # config.model fields the checkpoint implies
    params = load_lm(hf_dir, model_config, kind, shardings=...)   # Haiku dict, our paths
    save_params(out_dir, params); restore_params(out_dir, target)  # orbax

Layer i of the LM lives at `head_blocks/block/...[i]` for i < o, then with j = i - o at
`groups/blocks/block/...[j // k, j % k]` for j < G·k, else at `tail_blocks/block/...[j - G·k]`
(k = config.model.xattn.every, o = xattn.offset; language_model.layer_layout). Each
source tensor is read, transformed on the host, put on the devices that hold its shard
(`jax.make_array_from_callback`: each process builds only its addressable shards), and
written into its layer slot of the stacked parameter by a jitted, donated update, so the
host holds about one tensor at a time whatever the model size. Everything is checked before
the first read: unmapped source tensors, parameters nothing fills, shape mismatches.
"""

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from flamingo_jax import models
from flamingo_jax.models import language_model
from flamingo_jax.weights import families
from flamingo_jax.weights import lm_rules
from flamingo_jax.weights import mapping
from flamingo_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

LM_PREFIX = "flamingo/language_model"
# Our LM-level modules (not per block). `new_token_*` are trainable; the import starts them
# at the mean of the pretrained rows.
_GLOBAL_MODULES = ("token_embed", "new_token_embed", "new_token_unembed", "final_norm",
                   "unembed")
NEW_TOKENS = 2     # <image>, <EOC>


def import_plan(hf_dir: str, kind: Optional[str] = None, *, pad_vocab_multiple: int = 128,
                xattn_every: int = 1) -> tuple[str, dict]:
  """(kind, `config.model` fields) for a checkpoint: its LM options, `<image>` and `<EOC>`
  appended after its vocabulary, the table padded to a multiple of `pad_vocab_multiple`
  (so that the 'model' axis divides it; padded ids are masked out of the logits)."""
  kind, lm = families.lm_config_from_hf(hf_dir, kind)
  if kind == "chinchilla":          # our own layout: ids and padding are already in place
    model = dict(families.read_hf_config(hf_dir)["model"])
    model["xattn"] = {"every": min(xattn_every, model["lm"]["num_layers"])}
    return kind, model
  source_vocab = lm.pop("vocab_size")
  valid = source_vocab + NEW_TOKENS
  padded = -(-valid // pad_vocab_multiple) * pad_vocab_multiple
  lm["valid_vocab_size"] = valid if padded != valid else 0
  return kind, {"vocab_size": padded, "image_token_id": source_vocab,
                "eoc_token_id": source_vocab + 1, "lm": lm,
                "xattn": {"every": min(xattn_every, lm["num_layers"])}}


def layer_slot(model_config: Any, layer: int) -> tuple[str, tuple[int, ...]]:
  """(module prefix, index into the stacked parameter) of LM block `layer`."""
  num_layers, every = model_config.lm.num_layers, model_config.xattn.every
  if not 0 <= layer < num_layers:
    raise CheckpointError(f"source layer {layer} but config.model.lm.num_layers={num_layers}")
  head, groups, _ = language_model.layer_layout(num_layers, every,
                                                model_config.xattn.get("offset", 0))
  if layer < head:
    return f"{LM_PREFIX}/head_blocks/block", (layer,)
  layer -= head
  if layer < groups * every:
    return f"{LM_PREFIX}/groups/blocks/block", divmod(layer, every)
  return f"{LM_PREFIX}/tail_blocks/block", (layer - groups * every,)


def _target(model_config: Any, logical: str, layer: Optional[int]) -> tuple[str, str, tuple]:
  """(module, param name, stack index) of one logical name."""
  module, _, name = logical.rpartition("/")
  if layer is None:
    return f"{LM_PREFIX}/{module}", name, ()
  prefix, index = layer_slot(model_config, layer)
  return f"{prefix}/{module}", name, index


def lm_param_shapes(model_config: Any) -> dict[tuple[str, str], jax.ShapeDtypeStruct]:
  """{(module, name): shape} of every LM parameter the import must fill (no xattn)."""
  shapes = models.param_shapes(model_config)
  return {(module, name): value for module, name, value in hk.data_structures.traverse(shapes)
          if models.component_of(module) == "lm" or
          (module.startswith(LM_PREFIX) and "new_token" in module)}


def lm_param_shapes_tree(model_config: Any) -> hk.Params:
  """`lm_param_shapes` as a Haiku dict {module: {name: ShapeDtypeStruct}} (for shardings)."""
  tree: dict = {}
  for (module, name), shape in lm_param_shapes(model_config).items():
    tree.setdefault(module, {})[name] = shape
  return tree


@dataclasses.dataclass
class _Item:
  source: str
  layer: Optional[int]
  transform: Callable
  groups: dict
  outputs: dict            # logical -> (module, name, index)


def _context(model_config: Any) -> lm_rules.Context:
  lm = model_config.lm
  return lm_rules.Context(vocab_size=model_config.vocab_size, num_heads=lm.num_heads,
                          num_kv_heads=lm.get("num_kv_heads", 0) or lm.num_heads,
                          key_size=lm.key_size, tied=bool(lm.get("tied_embeddings", False)),
                          new_tokens=len(model_config.get("new_token_ids", ()) or (0, 0)))


def plan_tensors(ckpt: SafetensorsCheckpoint, family: lm_rules.Family,
                 model_config: Any) -> list[_Item]:
  """Matches every source tensor to our parameters and checks shapes, reading no data."""
  targets = lm_param_shapes(model_config)
  ctx = _context(model_config)
  unmapped, items, filled = [], [], {}
  for name, info in ckpt.tensors.items():
    found = families.match(family, name)
    if found is None:
      if not families.is_ignored(family, name):
        unmapped.append(name)
      continue
    layer, transform, groups = found
    abstract = jax.ShapeDtypeStruct(info.shape, jnp.dtype(info.dtype))
    try:
      shapes = jax.eval_shape(lambda x: transform(x, jnp, ctx, groups), abstract)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"source tensor {name} {info.shape} does not fit this config's "
                            f"shapes ({e}); check config.model.lm.num_heads / key_size") from None
    outputs = {}
    for logical, shape in shapes.items():
      module, pname, index = _target(model_config, logical, layer)
      if (module, pname) not in targets:
        raise CheckpointError(
            f"source tensor {name} maps to {module}/{pname}, which this config does not have "
            f"(check config.model.lm: norm_bias, qkv_bias, output_bias, ffw_bias, ffw, qk_norm, "
            f"tied_embeddings)")
      want = targets[(module, pname)].shape[len(index):]
      if tuple(shape.shape) != tuple(want):
        raise CheckpointError(
            f"shape mismatch: source tensor {name} {info.shape} gives {module}/{pname} "
            f"{tuple(shape.shape)} per layer but the config expects {tuple(want)} (check "
            f"config.model.vocab_size and config.model.lm: dim, num_heads, num_kv_heads, "
            f"key_size, ffw_size)")
      key = (module, pname, index)
      if key in filled:
        raise CheckpointError(f"{module}/{pname}{list(index)} is filled by both {filled[key]} "
                              f"and {name}")
      filled[key] = name
      outputs[logical] = key
    items.append(_Item(name, layer, transform, groups, outputs))
  if unmapped:
    more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
    raise CheckpointError(f"{len(unmapped)} source tensor(s) map to no parameter of a "
                          f"{family.name} model: {unmapped[:5]}{more} (wrong --kind?)")
  missing = []
  for (module, pname), shape in targets.items():
    stack = _stack_dims(module)
    for index in np.ndindex(*shape.shape[:stack]):
      if (module, pname, tuple(index)) not in filled:
        missing.append(f"{module}/{pname}{list(index) if index else ''}")
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise CheckpointError(
        f"{len(missing)} parameter(s) of this config are in no source tensor: {missing[:5]}"
        f"{more} (check config.model.lm.num_layers, tied_embeddings and the bias options)")
  return items


def _stack_dims(module: str) -> int:
  if "/groups/blocks/" in module:
    return 2
  if "/tail_blocks/" in module or "/head_blocks/" in module:
    return 1
  return 0


def _set_slot(stacked: jax.Array, value: jax.Array, index: tuple[int, ...]) -> jax.Array:
  start = tuple(index) + (0,) * value.ndim
  return jax.lax.dynamic_update_slice(stacked, value.reshape((1,) * len(index) + value.shape),
                                      start)


class _Progress:
  """One status line on stderr: tensors, bytes, seconds."""

  def __init__(self, total: int, total_bytes: int, enabled: bool):
    self.total, self.total_bytes, self.enabled = total, total_bytes, enabled
    self.done = self.bytes = 0
    self.start = self.shown = time.time()

  def update(self, nbytes: int) -> None:
    self.done += 1
    self.bytes += nbytes
    last = self.done == self.total
    if self.enabled and (last or time.time() - self.shown > 0.5):
      self.shown = time.time()
      end = "\n" if last else ""
      print(f"\r[import] {self.done}/{self.total} tensors, {self.bytes / 2**30:.2f}/"
            f"{self.total_bytes / 2**30:.2f} GiB, {time.time() - self.start:.0f}s",
            end=end, file=sys.stderr, flush=True)


def load_lm(source, model_config: Any, kind: str, *,
            shardings: Optional[Mapping] = None, dtype: Optional[Any] = None,
            progress: bool = False) -> tuple[hk.Params, dict]:
  """Reads a safetensors LM (a path, or a SafetensorsCheckpoint-like object) into our
  parameter tree for `model_config`.

  shardings: {module: {name: jax.sharding.Sharding}} (default: the first device);
  dtype: frozen parameters' dtype (None: the source's); the trainable new-token rows are
  always float32. Returns (params, stats {tensors, parameters, bytes, seconds}).
  """
  start = time.time()
  family = families.family_for(kind)
  ckpt = source if hasattr(source, "tensors") else SafetensorsCheckpoint(source)
  items = plan_tensors(ckpt, family, model_config)
  targets = lm_param_shapes(model_config)
  ctx = _context(model_config)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def sharding_of(module, name):
    return shardings[module][name] if shardings is not None else default

  def dtype_of(module, source_dtype):
    if "new_token" in module:
      return jnp.float32
    return jnp.dtype(dtype) if dtype is not None else source_dtype

  params: dict = {}
  setters: dict = {}
  progress_line = _Progress(len(items), ckpt.total_bytes, progress)
  by_name = {item.source: item for item in items}
  for name, tensor in ckpt:
    item = by_name.get(name)
    if item is None:
      continue                                    # an ignored buffer
    outputs = item.transform(tensor, np, ctx, item.groups)
    for logical, value in outputs.items():
      module, pname, index = item.outputs[logical]
      value = np.asarray(value).astype(dtype_of(module, value.dtype))
      full = targets[(module, pname)]
      sharding = sharding_of(module, pname)
      if not index:
        params.setdefault(module, {})[pname] = jax.make_array_from_callback(
            value.shape, sharding, lambda idx, v=value: v[idx])
        continue
      # A layer slice lives on the same devices as the stacked parameter, minus stack dims.
      spec = sharding.spec if isinstance(sharding, jax.sharding.NamedSharding) else None
      if spec is not None:
        layer_sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*tuple(spec)[len(index):]))
      else:
        layer_sharding = sharding
      piece = jax.make_array_from_callback(value.shape, layer_sharding,
                                           lambda idx, v=value: v[idx])
      leaves = params.setdefault(module, {})
      if pname not in leaves:
        leaves[pname] = jax.jit(lambda: jnp.zeros(full.shape, value.dtype),
                                out_shardings=sharding)()
      key = (full.shape, value.dtype, sharding)
      if key not in setters:
        setters[key] = jax.jit(_set_slot, static_argnums=2, donate_argnums=0,
                               out_shardings=sharding)
      leaves[pname] = setters[key](leaves[pname], piece, index)
    del tensor, outputs
    progress_line.update(ckpt.tensors[name].nbytes)
  jax.block_until_ready(params)
  count = sum(int(np.prod(v.shape)) for _, _, v in hk.data_structures.traverse(params))
  stats = {"tensors": len(items), "parameters": count, "bytes": ckpt.total_bytes,
           "seconds": round(time.time() - start, 2)}
  return params, stats


def export_lm(params: hk.Params, model_config: Any, out_dir: str) -> None:
  """Writes the LM of `params` as a "chinchilla" checkpoint (`--kind=chinchilla`): one
  safetensors tensor per layer (`layers.3.self_attention.query.w`, our [in, out] layout)
  and a config.json, so that it re-imports under any `xattn.every`."""
  tensors = {}
  for (module, name), _ in lm_param_shapes(model_config).items():
    value = np.asarray(jax.device_get(params[module][name]))
    relative = module[len(LM_PREFIX) + 1:]
    stack = _stack_dims(module)
    if not stack:
      tensors[f"{relative.replace('/', '.')}.{name}"] = value
      continue
    logical = relative.split("/block/", 1)[1].replace("/", ".")
    every = model_config.xattn.every
    head, groups, _ = language_model.layer_layout(model_config.lm.num_layers, every,
                                                  model_config.xattn.get("offset", 0))
    for index in np.ndindex(*value.shape[:stack]):
      if stack == 2:
        layer = head + index[0] * every + index[1]
      elif "/head_blocks/" in module:
        layer = index[0]
      else:
        layer = head + groups * every + index[0]
      tensors[f"layers.{layer}.{logical}.{name}"] = np.ascontiguousarray(value[index])
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"))
  model = {"vocab_size": int(model_config.vocab_size),
           "image_token_id": int(model_config.image_token_id),
           "eoc_token_id": int(model_config.eoc_token_id),
           "lm": {k: v for k, v in model_config.lm.to_dict().items()
                  if k not in ("init_checkpoint", "trainable")}}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump({"model_type": "chinchilla", "model": model}, f, indent=1)


# --- orbax: our import format ------------------------------------------------------------

def stack_xattn_blocks(blocks: list[dict], num_layers: int, every: int, offset: int) -> dict:
  """Our groups/xattn ([G, ...]) and tail_xattn parameters from gated blocks in layer order,
  each {block-relative module: {leaf: array}} (language_model.layer_layout places them)."""
  _, groups, _ = models.layer_layout(num_layers, every, offset)
  params = collections.defaultdict(dict)
  rows = collections.defaultdict(dict)
  for j, block in enumerate(blocks):
    for module, leaves in block.items():
      for leaf, value in leaves.items():
        if j < groups:
          rows[(module, leaf)][j] = value
        else:
          params[f"{LM_PREFIX}/tail_xattn/{module}".rstrip("/")][leaf] = value
  for (module, leaf), per_block in rows.items():
    params[f"{LM_PREFIX}/groups/xattn/{module}".rstrip("/")][leaf] = mapping.stack_rows(
        per_block, groups, f"gated blocks {module}/{leaf}")
  return dict(params)


def check_complete(params: dict, shapes: hk.Params) -> None:
  """A whole-model import has every parameter of the model, of its shape, and nothing else
  (CheckpointError naming the first that differs)."""
  want = {(m, n): tuple(v.shape) for m, n, v in hk.data_structures.traverse(shapes)}
  have = {(m, n): tuple(np.shape(v)) for m, leaves in params.items() for n, v in leaves.items()}
  for key in sorted(set(want) | set(have)):
    if want.get(key) != have.get(key):
      raise CheckpointError(f"{key[0]}/{key[1]}: the checkpoints give "
                            f"{have.get(key, 'nothing')}, the model needs "
                            f"{want.get(key, 'no such parameter')}")


def save_params(path: str, params: hk.Params) -> None:
  """Writes a Haiku params dict as an orbax StandardCheckpointer directory."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  checkpointer.close()


def pytree_metadata(path: str) -> Mapping:
  """The tree of an orbax pytree checkpoint directory, from its metadata only (ArrayMetadata
  leaves: shapes and dtypes, no array read); ValueError when it holds none."""
  tree = getattr(ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)), "tree", None)
  if not isinstance(tree, Mapping):
    raise ValueError(f"no pytree metadata in {path}")
  return tree


def _stored_tree(path: str) -> Mapping:
  if not epath.Path(path).exists():
    raise CheckpointError(f"parameter checkpoint {path!r} does not exist")
  try:
    return pytree_metadata(path)
  except ValueError:
    raise CheckpointError(f"{path} is not a parameter checkpoint written by import_weights"
                          ) from None


def _tower(vision: Mapping) -> str:
  kind = vision.get("kind", "nfnet")
  if kind == "vit":
    v = vision.get("vit", {})
    return (f"a ViT ({v.get('width')} wide, {v.get('layers')} layers, patch "
            f"{v.get('patch_size')})")
  return f"an NFNet {vision.get('variant')}"


def check_vision_import(params_path: str, vision_config: Mapping) -> None:
  """An import's vision tower (its model.json beside `params/`) is the one the config
  builds: the kind, and the NFNet variant or the ViT's shape; else an error naming both."""
  model_json = os.path.join(os.path.dirname(os.path.normpath(params_path)), "model.json")
  if not os.path.exists(model_json):
    return                                   # not an import folder: restore_params checks shapes
  with open(model_json) as f:
    stored = json.load(f).get("vision")
  if not stored:
    return
  ours = dict(vision_config)
  same = stored.get("kind", "nfnet") == ours.get("kind", "nfnet")
  if same and stored.get("kind", "nfnet") == "vit":
    keys = ("width", "layers", "heads", "patch_size")
    same = all(stored["vit"].get(k) == dict(ours["vit"]).get(k) for k in keys)
  elif same:
    same = stored.get("variant") == ours.get("variant")
  if not same:
    raise CheckpointError(f"{params_path} holds {_tower(stored)} but config.model.vision "
                          f"builds {_tower(ours)}; use the import's model.json fields "
                          "(experiments/configs/pretrained.py:...,vision=DIR sets them)")


def stored_param_names(path: str) -> set[tuple[str, str]]:
  """{(module, name)} of the parameters a `save_params` directory holds (metadata only)."""
  return {(m, n) for m, leaves in _stored_tree(path).items() for n in leaves}


def restore_params(path: str, target: hk.Params) -> hk.Params:
  """Restores `target`'s leaves (ShapeDtypeStructs with shardings, or arrays) from a
  checkpoint written by `save_params` (an import's `params/`; it may hold more, e.g. the
  new-token rows next to the frozen LM): values arrive in the target's dtype and sharding.
  A missing parameter or a shape difference is an error naming it, before anything is read."""
  stored = _stored_tree(path)
  for module, name, value in hk.data_structures.traverse(target):
    if module not in stored or name not in stored[module]:
      raise CheckpointError(f"{path} has no {module}/{name} (an import made for another "
                            "config? config.model.xattn.every regroups the LM layers)")
    have = tuple(stored[module][name].shape)
    if have != tuple(value.shape):
      raise CheckpointError(f"{path}: {module}/{name} is {have} but the config expects "
                            f"{tuple(value.shape)} (config.model.lm / vocab_size / xattn.every "
                            "differ from the import's model.json?)")
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or default), target)
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  checkpointer.close()
  return restored
