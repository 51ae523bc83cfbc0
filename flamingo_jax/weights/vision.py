"""Vision-tower imports: timm's NFNet (`dm_nfnet_f0` ... `f6`) and CLIP ViTs (OpenCLIP /
OpenAI state dicts, Hugging Face CLIPVisionModel folders) -> our encoders' parameters.

    params, fields = vision.load_timm_nfnet("dm_nfnet_f0/")   # a .safetensors file or folder
    # params: {"flamingo/vision_encoder/...": {...}}, numpy, the source's dtype
    # fields: {"vision": {"variant": "F0", "numerics": "timm"}} (config.model.vision)

timm's NFNet is DeepMind's network in PyTorch layout, with its own arithmetic (weight
standardisation eps, exact GELU; models/vision/nfnet.py): the import sets `numerics="timm"`,
under which our features equal timm's (tests/test_vision_import.py). The variant is found
from the tensors' shapes (stage depths and widths, group size), not from the file name; a
network no variant matches is an error naming what it has. timm's classifier head is not
imported (Flamingo uses the feature grid). Both towers' names map through rule tables
(NFNET_RULES, `_vit_rules`) of the importers' one mechanism (mapping.py).

    timm                                   ours (under flamingo/vision_encoder/)
    stem.conv{1..4}                        stem_conv{0..3}
    stages.S.0.*                           stageS_block0/*
    stages.S.B.* (B >= 1)                  stageS_blocks/block/* (stacked, row B - 1)
    conv1 / conv2 / conv2b / conv3         conv0 / conv1 / conv1b / conv2
    downsample.conv                        conv_shortcut
    attn_last.fc1 / attn_last.fc2          squeeze_excite/fc0 / squeeze_excite/fc1
    skipinit_gain                          skip_gain
    final_conv                             final_conv
    conv: weight [O, I, kh, kw], gain [O, 1, 1, 1], bias [O] -> w [kh, kw, I, O], gain [O], b [O]
    SE:   weight [O, I, 1, 1] -> w [I, O] (our SE is two Linears)
"""

import collections
import json
import os
import re
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.vision import nfnet
from flamingo_jax.models.vision import vit
from flamingo_jax.weights import mapping
from flamingo_jax.weights.safetensors_io import CheckpointError, SafetensorsCheckpoint

PREFIX = "flamingo/vision_encoder"
_BLOCK_MODULES = {"conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b", "conv3": "conv2",
                  "downsample.conv": "conv_shortcut", "attn_last.fc1": "squeeze_excite/fc0",
                  "attn_last.fc2": "squeeze_excite/fc1"}
_CONV_LEAVES = {"weight": "w", "gain": "gain", "bias": "b"}
_NFNET_IGNORED = (r"head\.fc\.(weight|bias)", r".*num_batches_tracked")


def _block_target(groups: dict, module: str, leaf: str) -> str:
  """`module/leaf` of a block's parameter: block 0 of a stage is its own module; blocks 1..
  are rows 0.. of a stacked one. `module` "" is the block itself (its skip gain)."""
  stage, block = int(groups["stage"]), int(groups["block"])
  if block == 0:
    parts, row = (f"{PREFIX}/stage{stage}_block0", module, leaf), ""
  else:
    parts, row = (f"{PREFIX}/stage{stage}_blocks/block", module, leaf), f"@{block - 1}"
  return "/".join(p for p in parts if p) + row


def _nfnet_conv(target) -> mapping.Transform:
  """A weight-standardised conv (or the SE's 1x1 convs, our Linears) -> w / gain / b at
  `target(groups, leaf)`."""
  def transform(x, xp, ctx, groups):
    del xp, ctx
    if groups["leaf"] == "weight":
      linear = groups.get("module", "").startswith("attn_last")
      value = (x.reshape(x.shape[:2]).T if linear              # SE [O, I, 1, 1] -> [I, O]
               else x.transpose(2, 3, 1, 0))                    # [O, I, kh, kw] -> HWIO
      value = np.ascontiguousarray(value)
    else:
      value = x.reshape(-1)                                     # gain [O, 1, 1, 1], bias [O]
    return {target(groups, _CONV_LEAVES[groups["leaf"]]): value}
  return transform


_BLOCK_SOURCES = "|".join(re.escape(m) for m in _BLOCK_MODULES)
NFNET_RULES: tuple[mapping.Rule, ...] = (
    (r"stem\.conv(?P<i>\d)\.(?P<leaf>weight|gain|bias)",
     _nfnet_conv(lambda g, leaf: f"{PREFIX}/stem_conv{int(g['i']) - 1}/{leaf}")),
    (r"final_conv\.(?P<leaf>weight|gain|bias)",
     _nfnet_conv(lambda g, leaf: f"{PREFIX}/final_conv/{leaf}")),
    (rf"stages\.(?P<stage>\d+)\.(?P<block>\d+)\.(?P<module>{_BLOCK_SOURCES})\."
     r"(?P<leaf>weight|gain|bias)",
     _nfnet_conv(lambda g, leaf: _block_target(g, _BLOCK_MODULES[g["module"]], leaf))),
    (r"stages\.(?P<stage>\d+)\.(?P<block>\d+)\.skipinit_gain",
     lambda x, xp, ctx, g: {_block_target(g, "", "skip_gain"): x.reshape(())}),
)


def _strip(name: str) -> str:
  for prefix in ("model.", "module."):
    if name.startswith(prefix):
      return name[len(prefix):]
  return name


def _structure(shapes: dict[str, tuple]) -> dict:
  """Stage depths and widths, group size and stem width from the tensor shapes."""
  blocks = collections.defaultdict(set)
  for name in shapes:
    match = re.match(r"stages\.(\d+)\.(\d+)\.conv1\.weight$", name)
    if match:
      blocks[int(match.group(1))].add(int(match.group(2)))
  if sorted(blocks) != [0, 1, 2, 3]:
    raise CheckpointError(f"not an NFNet state dict: stages {sorted(blocks)} (want 0-3; "
                          f"names like stages.0.0.conv1.weight)")
  depth = tuple(len(blocks[s]) for s in range(4))
  width = tuple(shapes[f"stages.{s}.0.conv3.weight"][0] for s in range(4))
  group_size = shapes["stages.0.0.conv2.weight"][1]
  stem = shapes["stem.conv4.weight"][0]
  return dict(width=width, depth=depth, group_size=group_size, stem=stem)


def find_variant(structure: dict) -> str:
  for name, variant in nfnet.NFNET_VARIANTS.items():
    if (tuple(variant["width"]) == structure["width"]
        and tuple(variant["depth"]) == structure["depth"]
        and variant["group_size"] == structure["group_size"]
        and variant["width"][0] // 2 == structure["stem"]):
      return name
  raise CheckpointError(
      f"no NFNet variant has stage depths {structure['depth']}, widths {structure['width']}, "
      f"group size {structure['group_size']} and stem width {structure['stem']} (known: "
      f"{sorted(nfnet.NFNET_VARIANTS)}, models/vision/nfnet.py)")


def _module_shapes(module_fn, image_size: int) -> dict[str, dict[str, tuple]]:
  """{module: {leaf: shape}} of the encoder `module_fn(name)` under PREFIX (shapes only)."""
  outer, inner = PREFIX.split("/")
  def forward(images):
    with hk.experimental.name_scope(outer):
      return module_fn(inner)(images)
  shapes = jax.eval_shape(hk.transform(forward).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return {m: {n: tuple(v.shape) for n, v in leaves.items()} for m, leaves in shapes.items()}


def expected_shapes(variant: str) -> dict[str, dict[str, tuple]]:
  """{module: {leaf: shape}} of our NFNet `variant` under PREFIX (shapes only)."""
  return _module_shapes(
      lambda name: lambda x: nfnet.NFNet(variant, name=name)(x, is_training=False),
      nfnet.NFNET_VARIANTS[variant]["test_imsize"])


def load_timm_nfnet(source: str) -> tuple[dict, dict]:
  """(params at our paths as numpy arrays, {"vision": config fields}) of a timm NFNet."""
  ckpt = SafetensorsCheckpoint(source)
  shapes = {_strip(name): tuple(info.shape) for name, info in ckpt.tensors.items()}
  try:
    variant = find_variant(_structure(shapes))
  except KeyError as e:
    raise CheckpointError(f"{source}: not a timm NFNet state dict (no tensor {e})") from None
  depth = nfnet.NFNET_VARIANTS[variant]["depth"]
  params = mapping.convert(
      ((_strip(name), array) for name, array in ckpt), NFNET_RULES, what=f"NFNet ({source})",
      ignored=_NFNET_IGNORED,
      rows=lambda module: depth[int(re.search(r"stage(\d)_blocks", module).group(1))] - 1)
  _check_shapes(source, params, expected_shapes(variant), f"NFNet {variant}")
  return dict(params), {"vision": {"variant": variant, "numerics": "timm"}}


# --- CLIP ViT (OpenCLIP / OpenAI state dicts, or Hugging Face's renamed to them) -----------

_VIT_BLOCK_LEAVES = {
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "offset"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "offset"),
    "attn.in_proj_weight": ("in_proj", "w"), "attn.in_proj_bias": ("in_proj", "b"),
    "attn.out_proj.weight": ("out_proj", "w"), "attn.out_proj.bias": ("out_proj", "b"),
    "mlp.c_fc.weight": ("c_fc", "w"), "mlp.c_fc.bias": ("c_fc", "b"),
    "mlp.c_proj.weight": ("c_proj", "w"), "mlp.c_proj.bias": ("c_proj", "b"),
}
_VIT_TOP = {"ln_pre.weight": ("ln_pre", "scale"), "ln_pre.bias": ("ln_pre", "offset"),
            "ln_post.weight": ("ln_post", "scale"), "ln_post.bias": ("ln_post", "offset")}
_VIT_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")


def _vit_rules(image_size: int) -> tuple[mapping.Rule, ...]:
  """OpenCLIP's visual.* (prefix removed) -> our ViT; positions resized for `image_size`."""
  rules = [
      (r"conv1\.weight", mapping.to(f"{PREFIX}/conv1/w",              # [D, 3, p, p] -> HWIO
                                     lambda x: np.ascontiguousarray(x.transpose(2, 3, 1, 0)))),
      (r"class_embedding", mapping.to(f"{PREFIX}/class_embedding")),
      (r"positional_embedding", lambda x, xp, ctx, g: {
          f"{PREFIX}/positional_embedding": resize_positions(
              x, image_size // ctx["patch"])}),
  ]
  for source, (module, leaf) in _VIT_TOP.items():
    rules.append((re.escape(source), mapping.to(f"{PREFIX}/{module}/{leaf}")))
  for source, (module, leaf) in _VIT_BLOCK_LEAVES.items():
    rules.append((rf"transformer\.resblocks\.(?P<layer>\d+)\.{re.escape(source)}",
                  mapping.to(f"{PREFIX}/blocks/block/{module}/{leaf}@{{layer}}",
                             mapping.transposed if leaf == "w" else None)))
  return tuple(rules)


# CLIP's joint-space projection and attention pooling: not part of the token grid.
_VIT_IGNORED = (r"proj", r"attn_pool.*")


def _visual_names(names) -> tuple[str, bool]:
  """The prefix of the vision tower's tensors ("visual." in a whole CLIP model)."""
  for prefix in ("visual.", "model.visual.", ""):
    if f"{prefix}class_embedding" in names:
      return prefix, True
  return "", False


def resize_positions(positions: np.ndarray, grid: int) -> np.ndarray:
  """[1 + g*g, D] positions (class first) -> [1 + grid*grid, D]: the patch positions resized
  bicubically as a g x g image (jax.image.resize, Keys a = -0.5; open_clip's resize uses
  PyTorch's a = -0.75, so its resized positions differ slightly)."""
  old = int(round(np.sqrt(positions.shape[0] - 1)))
  if old * old != positions.shape[0] - 1:
    raise CheckpointError(f"{positions.shape[0] - 1} patch positions are not a square grid")
  if old == grid:
    return positions
  patch = positions[1:].reshape(old, old, -1).astype(np.float32)
  resized = np.asarray(jax.image.resize(patch, (grid, grid, patch.shape[-1]), "bicubic"))
  return np.concatenate([positions[:1], resized.reshape(grid * grid, -1).astype(positions.dtype)])


def _hf_clip_as_openclip(tensors: dict, hf_config: dict) -> dict:
  """A Hugging Face CLIPVisionModel / CLIPModel state dict renamed to OpenCLIP's `visual.*`
  (q/k/v fused into in_proj as torch's MultiheadAttention keeps them)."""
  out = {}
  prefix = "vision_model."
  names = {n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)}
  simple = {"embeddings.class_embedding": "class_embedding",
            "embeddings.patch_embedding.weight": "conv1.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
            "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
  layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj":
                 "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
  qkv = collections.defaultdict(dict)
  for name, value in names.items():
    if name in simple:
      out[simple[name]] = value
      continue
    match = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not match:
      if name == "embeddings.position_ids":
        continue                                     # a buffer some exports carry
      raise CheckpointError(f"vision_model.{name} has no place in our ViT")
    layer, module, leaf = match.groups()
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
      qkv[(layer, leaf)][module[10]] = value
    elif module in layer_names:
      out[f"transformer.resblocks.{layer}.{layer_names[module]}.{leaf}"] = value
    else:
      raise CheckpointError(f"vision_model.{name} has no place in our ViT")
  for (layer, leaf), parts in qkv.items():
    if sorted(parts) != ["k", "q", "v"]:
      raise CheckpointError(f"layer {layer}: q/k/v {leaf} incomplete ({sorted(parts)})")
    out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate(
        [parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def _hf_vision_config(source: str) -> Optional[dict]:
  folder = source if os.path.isdir(source) else os.path.dirname(source)
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    config = json.load(f)
  return config.get("vision_config", config)


OPENCLIP_CONFIG = "open_clip_config.json"
# An open_clip model folder (as open_clip's hub export writes it): its config and weights.
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "model.safetensors")


def openclip_config(source: str) -> Optional[dict]:
  """The open_clip model config of `source` (a folder holding open_clip_config.json, or a
  weights file beside one): its `model_cfg` ({"embed_dim", "vision_cfg", "quick_gelu"...}),
  or None when there is none."""
  folder = source if os.path.isdir(source) else os.path.dirname(source)
  path = os.path.join(folder, OPENCLIP_CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  return config.get("model_cfg", config)


def openclip_weights(source: str) -> str:
  """The weights file of an open_clip folder (or `source` itself when it is a file)."""
  if not os.path.isdir(source):
    return source
  for name in OPENCLIP_WEIGHTS:
    if os.path.exists(os.path.join(source, name)):
      return os.path.join(source, name)
  return source            # a Hugging Face folder: the safetensors reader finds its shards


def openclip_activation(model_cfg: Optional[dict], source: str, override: str) -> str:
  """QuickGELU when the open_clip config says `quick_gelu: true`, else GELU (open_clip's
  default: the LAION towers, IDEFICS'); `override` wins; no config and no override is an
  error (OpenAI's weights use QuickGELU, open_clip's own GELU: a guess would be 6e-3 off)."""
  if override:
    return override
  if model_cfg is None:
    raise CheckpointError(
        f"{source}: no {OPENCLIP_CONFIG} beside it says which activation the tower uses; pass "
        f"--vit_activation=quick_gelu (OpenAI's CLIP weights, OpenFlamingo's ViT-L/14) or "
        f"--vit_activation=gelu (open_clip's default: the LAION towers)")
  return "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"


def load_clip_vit(source: str, *, heads: int = 0, activation: str = "",
                  image_size: int = 0) -> tuple[dict, dict]:
  """(params under PREFIX as numpy arrays, model.json fields) of a CLIP ViT: an OpenCLIP /
  OpenAI state dict (a whole CLIP model or its visual tower; a file, or an open_clip folder
  with open_clip_config.json) or a Hugging Face CLIPVisionModel / CLIPModel folder (its
  config.json gives heads and activation).

  An OpenCLIP tower's activation comes from its open_clip_config.json (`quick_gelu: true`:
  QuickGELU; absent: GELU, as open_clip builds it), its heads from `vision_cfg.head_width`
  (default 64); `activation` and `heads` override them. `image_size` (0: the checkpoint's)
  resizes the positions to another resolution."""
  weights_file = openclip_weights(source)
  tensors = {name: np.asarray(array) for name, array in SafetensorsCheckpoint(weights_file)}
  return clip_vit_params(tensors, source, heads=heads, activation=activation,
                         image_size=image_size)


def clip_vit_params(tensors: dict[str, np.ndarray], source: str, *, heads: int = 0,
                    activation: str = "", image_size: int = 0, output: str = "patches",
                    hf_config: Optional[dict] = None) -> tuple[dict, dict]:
  """`load_clip_vit` of tensors in memory (`source` names them in errors). `output`: the
  ViT's features ("tokens": IDEFICS', without ln_post, whose tensors are then left out).
  `hf_config`: a Hugging Face vision config to use instead of source's config.json."""
  ln_eps = 1e-5
  if "vision_model.embeddings.class_embedding" in tensors:
    if hf_config is None:
      hf_config = _hf_vision_config(source) or {}
    heads = heads or int(hf_config.get("num_attention_heads", 0))
    activation = activation or hf_config.get("hidden_act", "")
    ln_eps = float(hf_config.get("layer_norm_eps", 1e-5))
    tensors, prefix = _hf_clip_as_openclip(tensors, hf_config), ""
  else:
    prefix, found = _visual_names(tensors)
    if not found:
      raise CheckpointError(f"{source}: not a CLIP ViT state dict (no class_embedding, "
                            f"visual.class_embedding or vision_model.embeddings)")
    model_cfg = openclip_config(source)
    activation = openclip_activation(model_cfg, source, activation)
    vision_cfg = (model_cfg or {}).get("vision_cfg", {})
    if not heads and vision_cfg.get("width"):
      heads = int(vision_cfg["width"]) // int(vision_cfg.get("head_width", 64))
  if activation not in vit.ACTIVATIONS:
    raise CheckpointError(f"activation {activation!r}; our ViT has {sorted(vit.ACTIVATIONS)}")
  shape = lambda name: tuple(tensors[prefix + name].shape)
  width = shape("class_embedding")[0]
  patch = shape("conv1.weight")[-1]
  layers = len({int(m.group(1)) for name in tensors
                for m in [_VIT_BLOCK.match(name.removeprefix(prefix))]
                if name.startswith(prefix) and m})
  native = int(round(np.sqrt(shape("positional_embedding")[0] - 1))) * patch
  image_size = image_size or native
  if image_size % patch:
    raise CheckpointError(f"image_size {image_size} is not a multiple of the patch {patch}")
  heads = heads or width // 64
  if width % heads:
    raise CheckpointError(f"width {width} is not divisible by {heads} heads")
  mlp_ratio = shape("transformer.resblocks.0.mlp.c_fc.weight")[0] / width
  mine = ((name[len(prefix):], array) for name, array in tensors.items()
          if name.startswith(prefix))             # not the text tower of a whole CLIP model
  if output == "tokens":             # features before ln_post: it is not part of the module
    mine = ((name, array) for name, array in mine if not name.startswith("ln_post."))
  params = mapping.convert(mine, _vit_rules(image_size), what=f"ViT ({source})",
                           ignored=_VIT_IGNORED, rows=lambda module: layers,
                           ctx={"patch": patch}, prefix=prefix)
  vit_fields = dict(width=width, layers=layers, heads=heads, patch_size=patch,
                    mlp_ratio=mlp_ratio, activation=activation)
  if output != "patches" or ln_eps != 1e-5:     # the defaults stay out of model.json
    vit_fields.update(output=output, ln_eps=ln_eps)
  expected = expected_vit_shapes(vit_fields, image_size)
  _check_shapes(source, params, expected, f"ViT {vit_fields}")
  return dict(params), {"image_size": image_size,
                        "vision": {"kind": "vit", "vit": vit_fields, "pixel_stats": "clip"}}


def expected_vit_shapes(vit_fields: dict, image_size: int) -> dict[str, dict[str, tuple]]:
  return _module_shapes(
      lambda name: vit.VisionTransformer(image_size=image_size, name=name, **vit_fields),
      image_size)


def _check_shapes(source: str, params: dict, expected: dict, what: str) -> None:
  """Every parameter of our module has a tensor of its shape, and nothing else is there."""
  for module in sorted(set(expected) | set(params)):
    for leaf in sorted(set(expected.get(module, {})) | set(params.get(module, {}))):
      have = params.get(module, {}).get(leaf)
      have = None if have is None else tuple(have.shape)
      if have != expected.get(module, {}).get(leaf):
        raise CheckpointError(f"{source}: {module}/{leaf} is {have or 'absent'}, our {what} "
                              f"has {expected.get(module, {}).get(leaf, 'none')}")
