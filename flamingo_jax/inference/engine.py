"""Encode once, decode many: the jitted pieces generation and scoring are built from.

    engine = Engine(config.model, params, max_slots=256)   # optional mesh + param shardings
    prompt = engine.prefill(ids, lengths, media)             # one call for the whole prompt
    logits, cache = engine.step(tokens, positions, phi, cache) # one jitted call per new token

Media are encoded (vision + resampler) once per prompt; each xattn layer's visual
keys/values are computed once in the prefill and kept in the cache; the LM's self-attention
keys/values live in a cache of `max_slots` positions laid out for the scanned layer stacks
(models/language_model.py). Shapes are static: prompts are right-padded to a length bucket
(powers of two from 16), so a new prompt length recompiles only when it crosses a bucket,
and the per-token step compiles once per batch size.

On a mesh ('data', 'model'), the batch is split over 'data' (padded with dummy rows to a
multiple of it) and the caches over 'model' by key/value heads (when they divide it);
parameters keep the shardings they arrive with (the training partition rules).
"""

from typing import Any, NamedTuple, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from flamingo_jax import models

DATA, MODEL = "data", "model"      # the mesh axes of docs/design.md §8
MIN_BUCKET = 16


def bucket(length: int) -> int:
  """The padded length of a prompt of `length` tokens: the next power of two >= 16."""
  return max(MIN_BUCKET, 1 << (int(length) - 1).bit_length())


class Prompt(NamedTuple):
  """A prefilled batch: logits of each row's last prompt token, the cache, and per row the
  next position to write, its media index φ and its last token (a pytree: the decode loop
  takes it whole, the cache donated)."""
  logits: jax.Array      # float32 [B, V]
  cache: dict
  positions: jax.Array   # int32 [B]: = prompt lengths
  phi: jax.Array         # int32 [B]: φ of each row's last prompt token (models.media_positions)
  last_token: jax.Array  # int32 [B]: each row's last prompt token


class Engine:
  """Jitted encode / prefill / step / extend for one model config and parameter set."""

  def __init__(self, model_config: Any, params: Any, *, max_slots: int = 256,
               compute_dtype: Any = jnp.float32, mesh: Optional[jax.sharding.Mesh] = None):
    self.config = model_config
    self.max_slots = int(max_slots)
    self.dtype = jnp.dtype(compute_dtype)
    self.mesh = mesh
    if mesh is None and jax.process_count() > 1:
      raise ValueError("several processes: give the Engine a mesh over all their devices")
    # params None: an engine whose jitted functions are only lowered (aot_compile).
    self.params = None if params is None else jax.tree.map(
        lambda x: x.astype(self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    self.loops = {}          # decoding's jitted loops, by their static settings
    self.image_id = int(model_config.image_token_id)
    self.no_media_after_id = models.no_media_after_id(model_config)
    stages = models.make_flamingo_stages(model_config, compute_dtype=self.dtype)
    self._apply = stages.apply
    self._encode = jax.jit(self._encode_fn)
    self._vision_features = jax.jit(
        lambda params, images: self._apply.vision_features(params, None, images))
    self._prefill = jax.jit(self._prefill_fn, static_argnums=(4,))
    self._step = jax.jit(self._step_fn, donate_argnums=(4,))
    self._extend = jax.jit(self._extend_fn, donate_argnums=(5,))
    self._reorder = jax.jit(reorder_rows, static_argnums=(2,), donate_argnums=(0,))
    self._tile = jax.jit(reorder_rows, static_argnums=(2,))

  # -- shardings ---------------------------------------------------------------------------

  @property
  def data_parallelism(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape[DATA]

  def cache_specs(self, cache: Any) -> Any:
    """PartitionSpecs of a cache (arrays or shapes): rows over 'data', heads over 'model'
    when they divide it."""
    def spec(path, leaf):
      keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
      dims = [None] * len(leaf.shape)
      dims[models.CACHE_BATCH_AXES[keys[0]][keys[1]]] = DATA
      heads = models.CACHE_HEAD_AXES[keys[1]]
      dims[heads] = MODEL if leaf.shape[heads] % self.mesh.shape[MODEL] == 0 else None
      return P(*dims)
    return jax.tree_util.tree_map_with_path(spec, cache)

  def _constrain_cache(self, cache: dict) -> dict:
    if self.mesh is None:
      return cache
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, s)), cache, self.cache_specs(cache),
        is_leaf=lambda x: isinstance(x, P))

  def put_batch(self, x: np.ndarray) -> jax.Array:
    """Host rows (the whole batch, the same on every process) -> device, split over 'data'
    on a mesh; each process places only the rows its devices hold."""
    if self.mesh is None:
      return jnp.asarray(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, P(DATA)),
                                        lambda index: x[index])

  @staticmethod
  def to_host(x: Any) -> Any:
    """Device values -> numpy on every process (an all-gather when processes share them)."""
    if jax.process_count() == 1:
      return jax.device_get(x)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(x, tiled=True))

  # -- jitted bodies -------------------------------------------------------------------------

  def _encode_fn(self, params, media):
    return self._apply.encode_media(params, None, media)

  def _prefill_fn(self, params, ids, lengths, visual, slots):
    b, length = ids.shape
    cache = self._constrain_cache(models.init_cache(self.config, b, slots, self.dtype))
    phi = models.media_positions(ids, self.image_id, self.no_media_after_id)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    logits, cache = self._apply.decode_cached(params, None, ids, positions, phi, cache, visual)
    last = lengths - 1
    rows = jnp.arange(b)
    return logits[rows, last], self._constrain_cache(cache), phi[rows, last], ids[rows, last]

  def apply_decode(self, params, tokens, positions, phi, cache):
    """One new token per row through the cached model (traceable: the jitted step and the
    decode loops): tokens/positions/phi int32 [B] -> (logits [B, V], cache)."""
    logits, cache = self._apply.decode_cached(params, None, tokens[:, None], positions[:, None],
                                              phi[:, None], cache)
    return logits[:, 0], self._constrain_cache(cache)

  def _step_fn(self, params, tokens, positions, phi, cache):
    return self.apply_decode(params, tokens, positions, phi, cache)

  def next_phi(self, phi: jax.Array, previous: jax.Array, tokens: jax.Array) -> jax.Array:
    """φ [B] of new tokens [B] after tokens `previous` [B] whose φ was `phi`."""
    return models.media_positions(tokens[:, None], self.image_id, self.no_media_after_id,
                                  start=phi, previous=previous)[:, 0]

  def _extend_fn(self, params, ids, start, phi, previous, cache):
    """ids [B, T] written at start + arange(T) (no new media), after tokens `previous` [B]
    of φ `phi`: logits [B, T, V]."""
    b, length = ids.shape
    positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
    phi = models.media_positions(ids, self.image_id, self.no_media_after_id, start=phi,
                                 previous=previous)
    logits, cache = self._apply.decode_cached(params, None, ids, positions, phi, cache)
    return logits, self._constrain_cache(cache)

  # -- host API ------------------------------------------------------------------------------

  def encode(self, media: Optional[np.ndarray]) -> Optional[jax.Array]:
    """uint8 [B, N, T, H, W, 3] -> visual tokens [B, N, R, D] (None: text only)."""
    if media is None:
      return None
    return self._encode(self.params, self.put_batch(np.asarray(media, np.uint8)))

  def vision_features(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, C]: the frozen encoder's pooled features (RICES),
    on the host. N should divide over the mesh's 'data' axis."""
    return self.to_host(self._vision_features(self.params,
                                              self.put_batch(np.asarray(images, np.uint8))))

  def prefill(self, ids: np.ndarray, lengths: np.ndarray, visual: Optional[jax.Array],
              slots: Optional[int] = None) -> Prompt:
    """ids int32 [B, L] right-padded (L a bucket), lengths [B] -> Prompt."""
    slots = int(slots or self.max_slots)
    if ids.shape[1] > slots:
      raise ValueError(f"prompt of {ids.shape[1]} tokens does not fit {slots} cache slots")
    lengths = np.asarray(lengths, np.int32)
    logits, cache, phi, last = self._prefill(
        self.params, self.put_batch(np.asarray(ids, np.int32)), self.put_batch(lengths), visual,
        slots)
    return Prompt(logits, cache, self.put_batch(lengths), phi, last)

  def step(self, tokens, positions, phi, cache):
    """One new token per row: tokens/positions/phi int32 [B] -> (logits [B, V], cache)."""
    return self._step(self.params, tokens, positions, phi, cache)

  def extend(self, ids, start, phi, previous, cache):
    return self._extend(self.params, ids, start, phi, previous, cache)

  def reorder(self, cache: dict, rows: jax.Array, *, self_only: bool = True) -> dict:
    """Cache rows -> cache[rows] along each leaf's batch axis (beam search: parents)."""
    return self._reorder(cache, rows, self_only)

  def tile(self, cache: dict, rows: jax.Array) -> dict:
    """A new cache whose row i is row rows[i] of `cache` (shared-prefix scoring)."""
    return self._tile(cache, rows, False)


def reorder_rows(cache: dict, rows: jax.Array, self_only: bool) -> dict:
  """cache[rows] along each leaf's batch axis (`self_only`: the self-attention keys/values
  only; the visual ones are the same for every hypothesis of a prompt)."""
  def take(path, leaf):
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    if self_only and keys[1] != "self":
      return leaf
    return jnp.take(leaf, rows, axis=models.CACHE_BATCH_AXES[keys[0]][keys[1]])
  return jax.tree_util.tree_map_with_path(take, cache)
