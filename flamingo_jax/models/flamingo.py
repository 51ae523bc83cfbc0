"""Flamingo (docs/paper.md §1): frozen NFNet -> Perceiver Resampler -> frozen LM with gated xattn.

    visual = resampler(stop_gradient(nfnet(normalise(media))))   # [B, N, R, D_resampler]
    logits = lm(input_ids, visual, φ(input_ids))                  # [B, L, V] float32

`make_flamingo(config.model)` is the docs/design.md §5 contract; `make_flamingo_stages` gives the
same parameters as separate "encode media" and "decode text" functions (encode once,
decode many times: generation, scoring, RICES).
"""

import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import gated_xattn
from flamingo_jax.models import language_model
from flamingo_jax.models import perceiver
from flamingo_jax.models.vision import nfnet
from flamingo_jax.models.vision import vit

# Per-channel pixel statistics (mean, std; in [0, 255]) by config.model.vision.pixel_stats:
# the paper normalises to mean 0, variance 1 without saying with which statistics (docs/paper.md
# §1.8): ImageNet's; CLIP's for CLIP-trained ViTs (what their weights expect).
PIXEL_STATS = {
    "imagenet": (np.array([0.485, 0.456, 0.406], np.float32) * 255.0,
                 np.array([0.229, 0.224, 0.225], np.float32) * 255.0),
    "clip": (np.array([0.48145466, 0.4578275, 0.40821073], np.float32) * 255.0,
             np.array([0.26862954, 0.26130258, 0.27577711], np.float32) * 255.0),
}
PIXEL_MEAN, PIXEL_STD = PIXEL_STATS["imagenet"]


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


# vision_batching(encode, frames) -> encode(frames): lets the caller lay the frozen encoder's
# batch out on its mesh (training/train_step.py spreads it over every device); the model
# itself knows no mesh. frames [BNT, H, W, 3] -> grid [BNT, h, w, C].
VisionBatching = Callable[[Callable[[jax.Array], jax.Array], jax.Array], jax.Array]


def _direct(encode: Callable[[jax.Array], jax.Array], frames: jax.Array) -> jax.Array:
  return encode(frames)


def normalize_pixels(images: jax.Array, dtype: Any, stats: str = "imagenet") -> jax.Array:
  """uint8 pixels -> the encoder's input: mean/std normalised (PIXEL_STATS), in `dtype`."""
  if stats not in PIXEL_STATS:
    raise ValueError(f"config.model.vision.pixel_stats={stats!r}; known: {sorted(PIXEL_STATS)}")
  mean, std = PIXEL_STATS[stats]
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def nfnet_encoder(vision: Any) -> nfnet.NFNet:
  """The NFNet `config.model.vision` describes, as module `vision_encoder` (Flamingo's and
  the contrastive model's: one path, so a trained tower moves between them)."""
  return nfnet.NFNet(vision.variant, activation=vision.activation,
                     stochdepth_rate=vision.stochdepth_rate,
                     numerics=vision.get("numerics", "deepmind"),
                     remat=vision.get("remat", False), name="vision_encoder")


# config.model.xattn options that GatedCrossAttentionDense takes, and their defaults (the
# paper's; config_base.XATTN_OPTIONS documents them).
XATTN_BLOCK_OPTIONS = dict(media_norm=True, ffw_activation="squared_relu", norm="layer",
                           norm_eps=1e-5, ffw="mlp", ffw_size=0, gate="scalar", qk_norm="")


def no_media_after_id(model_config: Any) -> int:
  """The token after which text sees no image until the next <image> (-1: none)."""
  return int(model_config.xattn.get("no_media_after_id", -1))


class Flamingo(hk.Module):
  """The whole model. Submodules are built inside methods: paths are `flamingo/<child>/...`."""

  def __init__(self, config: Any, *, compute_dtype: Any = jnp.float32,
               vision_batching: Optional[VisionBatching] = None,
               name: Optional[str] = "flamingo"):
    super().__init__(name=name)
    self.config = config
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.vision_batching = vision_batching or _direct

  def _check_media(self, media: jax.Array) -> None:
    cfg = self.config
    if media.ndim != 6 or media.shape[-1] != 3:
      raise ValueError(f"media must be [B, N, T, H, W, 3] uint8, got shape {media.shape}")
    t, h, w = media.shape[2:5]
    if (h, w) != (cfg.image_size, cfg.image_size):
      raise ValueError(
          f"media {media.shape} has {h}x{w} frames but config.model.image_size="
          f"{cfg.image_size} (square {cfg.image_size}x{cfg.image_size} expected)")
    r = cfg.resampler
    if t > max(r.max_frames, r.num_time_embeddings):
      raise ValueError(
          f"media {media.shape} has T={t} frames per item; the resampler has "
          f"{r.num_time_embeddings} temporal embeddings, interpolated up to "
          f"max_frames={r.max_frames}")

  def _check_image_tokens(self, input_ids: jax.Array, num_slots: int) -> None:
    """Eager calls check values; under jit, rows past the last slot get no media."""
    if not _is_concrete(input_ids):
      return
    counts = np.sum(np.asarray(input_ids) == self.config.image_token_id, axis=-1)
    if counts.size and counts.max() > num_slots:
      raise ValueError(
          f"a row of input_ids {tuple(input_ids.shape)} has {counts.max()} <image> tokens "
          f"(id {self.config.image_token_id}) but media has only {num_slots} slots")

  @hk.name_like("__call__")
  def encode_media(self, media: jax.Array, *, is_training: bool = False) -> jax.Array:
    """media uint8 [B, N, T, H, W, 3] -> visual tokens [B, N, R, D_resampler]."""
    self._check_media(media)
    cfg = self.config
    b, n, t, h, w, c = media.shape
    r = cfg.resampler
    frames = media.reshape(b * n * t, h, w, c)                                   # [BNT, H, W, 3]
    vision_trainable = cfg.vision.trainable
    encoder = self._vision_encoder()

    # Parameters are created in float32 whatever the compute dtype: Haiku layers take their
    # input's dtype, and every layer after this one sees activations derived from it.
    dtype = jnp.float32 if hk.running_init() else self.compute_dtype

    def encode(frames):
      return encoder(self._encoder_input(frames, dtype),
                     is_training=is_training and vision_trainable)          # [BNT, h, w, C]

    grid = self.vision_batching(encode, frames)
    if not vision_trainable:
      grid = jax.lax.stop_gradient(grid)  # frozen tower: no backward pass through it
    features = grid.reshape(b, n, t, -1, grid.shape[-1])                         # [B, N, T, S, C]
    kind = r.get("kind", "perceiver")
    if kind == "none":                  # IDEFICS without a resampler: every encoder token
      return features.reshape(b, n, t * features.shape[3], features.shape[4])    # [B, N, T*S, C]
    if kind != "perceiver":
      raise ValueError(f"config.model.resampler.kind={kind!r}; expected 'perceiver' or 'none'")
    return perceiver.PerceiverResampler(
        num_layers=r.num_layers, dim=r.dim, num_heads=r.num_heads, key_size=r.key_size,
        ffw_mult=r.ffw_mult, num_latents=r.num_latents,
        num_time_embeddings=r.num_time_embeddings, max_frames=r.max_frames,
        attention_impl=self.config.get("attention_impl", "einsum"),
        input_projection=r.get("input_projection", True),
        ffw_activation=r.get("ffw_activation", "squared_relu"),
        qk_norm=r.get("qk_norm", ""), name="perceiver_resampler")(features)

  def _encoder_input(self, pixels: jax.Array, dtype: Any) -> jax.Array:
    """uint8 pixels normalised with the encoder's statistics (vision.pixel_stats)."""
    return normalize_pixels(pixels, dtype, self.config.vision.get("pixel_stats", "imagenet"))

  @hk.name_like("__call__")           # paths: flamingo/vision_encoder
  def _vision_encoder(self) -> nfnet.NFNet | vit.VisionTransformer:
    cfg = self.config.vision
    kind = cfg.get("kind", "nfnet")
    if kind == "vit":
      v = cfg.vit
      return vit.VisionTransformer(width=v.width, layers=v.layers, heads=v.heads,
                                   patch_size=v.patch_size, image_size=self.config.image_size,
                                   mlp_ratio=v.mlp_ratio, activation=v.activation,
                                   ln_eps=v.get("ln_eps", 1e-5),
                                   output=v.get("output", "patches"), name="vision_encoder")
    if kind != "nfnet":
      raise ValueError(f"config.model.vision.kind={kind!r}; expected 'nfnet' or 'vit'")
    return nfnet_encoder(cfg)

  @hk.name_like("__call__")
  def vision_features(self, images: jax.Array) -> jax.Array:
    """images uint8 [N, H, W, 3] -> the frozen encoder's final grid, mean-pooled, float32
    [N, C]: what RICES compares (docs/paper.md §6)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3] uint8, got shape {images.shape}")
    grid = self.encoder_grid(self._encoder_input(images, self.compute_dtype))  # [N, h, w, C]
    return jnp.mean(grid.astype(jnp.float32), axis=tuple(range(1, grid.ndim - 1)))

  @hk.name_like("__call__")
  def encoder_grid(self, normalised: jax.Array) -> jax.Array:
    """Pixels already normalised for the encoder [N, H, W, 3] -> its final grid [N, h, w, C]
    (what tools/check_logits --part=vision compares with timm's / open_clip's)."""
    return self._vision_encoder()(normalised, is_training=False)

  @hk.name_like("__call__")           # paths: flamingo/language_model, not ~_language_model
  def _language_model(self) -> language_model.LanguageModel:
    cfg = self.config
    lm, x = cfg.lm, cfg.xattn
    return language_model.LanguageModel(
        vocab_size=cfg.vocab_size, num_layers=lm.num_layers, dim=lm.dim,
        num_heads=lm.num_heads, key_size=lm.key_size, ffw_size=lm.ffw_size,
        xattn_every=x.every, xattn_num_heads=x.num_heads, xattn_key_size=x.key_size,
        xattn_ffw_mult=x.ffw_mult,
        only_attend_immediate_media=x.only_attend_immediate_media,
        new_token_ids=tuple(cfg.get("new_token_ids", ()) or (cfg.image_token_id,
                                                             cfg.eoc_token_id)),
        options=language_model.DecoderOptions.from_config(lm),
        tied_embeddings=lm.get("tied_embeddings", False),
        embed_multiplier=lm.get("embed_multiplier", 1.0),
        valid_vocab_size=lm.get("valid_vocab_size", 0), remat=cfg.remat,
        attention_impl=cfg.get("attention_impl", "einsum"),
        xattn_options={k: x.get(k, default) for k, default in XATTN_BLOCK_OPTIONS.items()},
        xattn_offset=x.get("offset", 0), name="language_model")

  @hk.name_like("__call__")
  def decode(self, input_ids: jax.Array, visual: Optional[jax.Array]) -> jax.Array:
    """input_ids int32 [B, L], visual [B, N, R, D] or None (text only) -> logits [B, L, V]."""
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    phi = None
    if visual is not None:
      if visual.ndim != 4 or visual.shape[0] != input_ids.shape[0]:
        raise ValueError(f"visual tokens {visual.shape} do not match input_ids {input_ids.shape}")
      self._check_image_tokens(input_ids, visual.shape[1])
      phi = gated_xattn.media_positions(input_ids, self.config.image_token_id,
                                        no_media_after_id(self.config))
    return self._language_model()(input_ids, visual, phi)

  @hk.name_like("__call__")
  def decode_cached(self, input_ids: jax.Array, positions: jax.Array, phi: jax.Array,
                    cache: dict, visual: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Generation: input_ids [B, T] at positions [B, T] (contiguous per row) whose media
    index is phi [B, T] (φ counted over the whole sequence so far, not just these T tokens).
    visual [B, N, R, D] on the prefill (its xattn keys/values go into the cache), None
    afterwards. -> (logits [B, T, V] float32, updated cache)."""
    return self._language_model()(input_ids, visual, phi, positions=positions, cache=cache)

  def __call__(self, input_ids: jax.Array, media: Optional[jax.Array], *,
               is_training: bool = False) -> jax.Array:
    if media is not None:  # fail fast, before the vision tower runs
      self._check_media(media)
      self._check_image_tokens(input_ids, media.shape[1])
    visual = None if media is None else self.encode_media(media, is_training=is_training)
    return self.decode(input_ids, visual)


def make_flamingo(config: Any, *, compute_dtype: Any = jnp.float32,
                  vision_batching: Optional[VisionBatching] = None) -> hk.Transformed:
  """docs/design.md §5: init(rng, input_ids, media); apply(params, rng, input_ids, media, is_training)."""

  def forward(input_ids, media, is_training: bool = False):
    return Flamingo(config, compute_dtype=compute_dtype, vision_batching=vision_batching)(
        input_ids, media, is_training=is_training)

  return hk.transform(forward)


class FlamingoStages(NamedTuple):
  encode_media: Any    # (params, rng, media, is_training=False) -> visual [B, N, R, D]
  vision_features: Any  # (params, rng, images [N, H, W, 3]) -> pooled features [N, C]
  encoder_grid: Any    # (params, rng, normalised pixels [N, H, W, 3]) -> grid [N, h, w, C]
  decode: Any          # (params, rng, input_ids, visual) -> logits [B, L, V]
  decode_cached: Any   # (params, rng, input_ids, positions, phi, cache, visual=None)
                       #   -> (logits [B, T, V], cache)


def make_flamingo_stages(config: Any, *, compute_dtype: Any = jnp.float32) -> hk.MultiTransformed:
  """Same parameters as `make_flamingo`, split into `apply.encode_media` and `apply.decode`."""

  def stages():
    model = Flamingo(config, compute_dtype=compute_dtype)
    return model.__call__, FlamingoStages(model.encode_media, model.vision_features,
                                          model.encoder_grid, model.decode,
                                          model.decode_cached)

  return hk.multi_transform(stages)


def init_cache(config: Any, batch: int, slots: int, dtype: Any = jnp.float32) -> dict:
  """An empty generation cache for `batch` rows of `slots` positions (language_model.py)."""
  lm = config.lm
  return language_model.init_cache(
      num_layers=lm.num_layers, xattn_every=config.xattn.every,
      xattn_offset=config.xattn.get("offset", 0),
      num_kv_heads=lm.get("num_kv_heads", 0) or lm.num_heads, key_size=lm.key_size,
      batch=batch, slots=slots, dtype=dtype)


# --- which parameters train -------------------------------------------------------------

COMPONENTS = ("vision", "resampler", "xattn", "lm")
_COMPONENT_PATTERNS = (
    ("vision", re.compile(r"(^|/)vision_encoder(/|$)")),
    ("resampler", re.compile(r"(^|/)perceiver_resampler(/|$)")),
    ("xattn", re.compile(r"(^|/)(tail_)?xattn(/|$)")),
    ("lm", re.compile(r"(^|/)language_model(/|$)")),
)
# LM modules that train although the LM is frozen: the rows of <image> and <EOC>.
_NEW_TOKEN_PATTERN = re.compile(r"(^|/)new_token_(un)?embed(/|$)")


def component_of(module_path: str) -> str:
  """'vision' | 'resampler' | 'xattn' | 'lm' for a Haiku module path."""
  for component, pattern in _COMPONENT_PATTERNS:
    if pattern.search(module_path):
      return component
  raise ValueError(f"parameter path {module_path!r} belongs to no Flamingo component")


def is_trainable(module_path: str, *, train_vision: bool = False,
                 train_lm: bool = False) -> bool:
  """The one predicate for trainable vs frozen (docs/design.md §5).

  Trainable: resampler, gated xattn blocks, the new-token rows; the vision encoder too
  with `train_vision` (the paper's fine-tuning recipe, docs/paper.md §8). Frozen: the LM, unless
  `train_lm` (the paper's "LM unfrozen" ablation, docs/paper.md Table 3 xiii; the few-shot demo,
  whose tiny LM has no pretraining).
  """
  component = component_of(module_path)
  if component in ("resampler", "xattn"):
    return True
  if component == "vision":
    return train_vision
  return train_lm or bool(_NEW_TOKEN_PATTERN.search(module_path))


def trainable_predicate(config: Any):
  """module path -> trainable?, for `config` (config.model)."""
  train_vision = bool(config.vision.trainable)
  train_lm = bool(config.lm.get("trainable", False))
  return lambda module: is_trainable(module, train_vision=train_vision, train_lm=train_lm)


def split_trainable(params: Mapping, config: Any) -> tuple[hk.Params, hk.Params]:
  """(trainable, frozen) Haiku param dicts, by `is_trainable` on each module path."""
  trainable = trainable_predicate(config)
  return hk.data_structures.partition(lambda module, name, value: trainable(module), params)


def count_by_component(params: Mapping, config: Any) -> dict[str, int]:
  """Parameter counts {lm, vision, resampler, xattn, total, trainable, frozen} (shapes suffice)."""
  counts = dict.fromkeys(COMPONENTS + ("total", "trainable", "frozen"), 0)
  trainable = trainable_predicate(config)
  for module, name, value in hk.data_structures.traverse(params):
    size = int(np.prod(value.shape))
    counts[component_of(module)] += size
    counts["total"] += size
    counts["trainable" if trainable(module) else "frozen"] += size
  return counts


def param_shapes(config: Any) -> hk.Params:
  """ShapeDtypeStructs of all parameters (`jax.eval_shape`: nothing is allocated)."""
  size = config.image_size
  return jax.eval_shape(make_flamingo(config).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 8), jnp.int32),
                        jax.ShapeDtypeStruct((1, 1, 1, size, size, 3), jnp.uint8))


def count_params(config: Any) -> dict[str, int]:
  """{"lm", "vision", "resampler", "xattn", "total", "trainable", "frozen"} from shapes."""
  return count_by_component(param_shapes(config), config)
