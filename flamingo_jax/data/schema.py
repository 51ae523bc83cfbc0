"""The batch schema (docs/design.md §4): one dict of fixed-shape arrays per stream.

| key         | dtype, shape                      |
| input_ids   | int32   [B, L]                    |
| target_ids  | int32   [B, L]                    |
| loss_mask   | float32 [B, L]                    |
| media       | uint8   [B, N, T, H, W, 3]        |
| media_mask  | bool    [B, N]                    |
"""

from typing import Any

import jax
import numpy as np

BATCH_KEYS = ("input_ids", "target_ids", "loss_mask", "media", "media_mask")


def stream_shapes(spec: Any, image_size: int, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of one stream's batch (global batch unless `batch_size` is given)."""
  b = spec.batch_size if batch_size is None else batch_size
  length, n, t = spec.max_tokens, spec.max_media, spec.frames
  return {
      "input_ids": jax.ShapeDtypeStruct((b, length), np.int32),
      "target_ids": jax.ShapeDtypeStruct((b, length), np.int32),
      "loss_mask": jax.ShapeDtypeStruct((b, length), np.float32),
      "media": jax.ShapeDtypeStruct((b, n, t, image_size, image_size, 3), np.uint8),
      "media_mask": jax.ShapeDtypeStruct((b, n), np.bool_),
  }


def batch_shapes(config: Any) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """{stream: stream_shapes} for every stream of `config.data.streams`."""
  return {name: stream_shapes(spec, config.model.image_size)
          for name, spec in config.data.streams.items()}


def random_stream_batch(spec: Any, model_config: Any, seed: int,
                        batch_size: int | None = None) -> dict[str, np.ndarray]:
  """A schema-valid batch of random tokens and pixels (benchmarks, shape tests).

  Each row holds `max_media` `<image>` tokens, evenly spaced from position 1, one per slot;
  the targets are the inputs shifted by one; every position counts in the loss.
  """
  b = spec.batch_size if batch_size is None else batch_size
  length, n, t, size = spec.max_tokens, spec.max_media, spec.frames, model_config.image_size
  rng = np.random.RandomState(seed)
  tokens = rng.randint(6, model_config.vocab_size, (b, length + 1)).astype(np.int32)
  tokens[:, 1 + np.arange(n) * max(1, (length - 1) // n)] = model_config.image_token_id
  return {
      "input_ids": tokens[:, :-1],
      "target_ids": tokens[:, 1:],
      "loss_mask": np.ones((b, length), np.float32),
      "media": rng.randint(0, 256, (b, n, t, size, size, 3)).astype(np.uint8),
      "media_mask": np.ones((b, n), np.bool_),
  }


def random_batches(config: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
  return {name: random_stream_batch(spec, config.model, seed + i)
          for i, (name, spec) in enumerate(config.data.streams.items())}
