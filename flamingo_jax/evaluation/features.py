"""Frozen vision features for RICES (docs/paper.md §6): computed once per image set, cached on disk.

    extract = FeatureExtractor(engine)                        # inference.Engine
    support = cached_features(os.path.join(out, "support_features.npy"),
                              [e.media for e in split.support],
                              lambda paths: extract(paths))

The features are the frozen encoder's final grid, mean-pooled (`Flamingo.vision_features`),
of each image as training sees it (`preprocessing.load_image`). The cache stores a
fingerprint beside the array (the image paths and the caller's key, e.g. which parameters);
a cache whose fingerprint differs is computed again, never silently reused.
"""

import hashlib
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from flamingo_jax.data import preprocessing


class FeatureExtractor:
  """Media items -> float32 [N, C] pooled frozen-encoder features through an
  `inference.Engine`, `batch_size` images at a time (the last batch padded: one compiled
  shape; a multiple of the mesh's data axis). `load(item)` -> uint8 [size, size, 3]: by
  default an image path through `preprocessing.load_image`."""

  def __init__(self, engine: Any, batch_size: int = 32,
               load: Optional[Callable[[Any], np.ndarray]] = None):
    self.engine = engine
    self.size = int(engine.config.image_size)
    self.batch_size = -(-batch_size // engine.data_parallelism) * engine.data_parallelism
    self.load = load or (lambda path: preprocessing.load_image(path, self.size))

  def __call__(self, paths: Sequence[Any]) -> np.ndarray:
    out = []
    for start in range(0, len(paths), self.batch_size):
      chunk = [self.load(p) for p in paths[start:start + self.batch_size]]
      images = np.zeros((self.batch_size, self.size, self.size, 3), np.uint8)
      images[:len(chunk)] = chunk
      out.append(np.asarray(self.engine.vision_features(images))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _fingerprint(paths: Sequence[Any], key: str) -> str:
  digest = hashlib.sha256(key.encode())
  for path in paths:
    digest.update(str(path).encode() + b"\0")
  return digest.hexdigest()


def cached_features(path: str, paths: Sequence[Any],
                    compute: Callable[[Sequence[Any]], np.ndarray], key: str = "") -> np.ndarray:
  """The features of `paths` from `path` when it was computed for the same paths and `key`;
  else computed with `compute`, saved (atomically: a partial file is never read) and returned.
  `path` "": computed, not cached."""
  if not path:
    return np.asarray(compute(paths), np.float32)
  fingerprint = _fingerprint(paths, key)
  meta_path = path + ".json"
  if os.path.exists(path) and os.path.exists(meta_path):
    with open(meta_path) as f:
      if json.load(f).get("fingerprint") == fingerprint:
        return np.load(path)
  features = np.asarray(compute(paths), np.float32)
  if len(features) != len(paths):
    raise ValueError(f"{len(features)} feature rows for {len(paths)} images")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npy"      # several processes may write the same cache
  np.save(tmp, features)
  os.replace(tmp, path)
  with open(f"{meta_path}.tmp{os.getpid()}", "w") as f:
    json.dump({"fingerprint": fingerprint, "images": len(paths), "key": key}, f)
  os.replace(f"{meta_path}.tmp{os.getpid()}", meta_path)
  return features
