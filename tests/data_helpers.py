"""Hand-made raw sources for the data tests: solid-colour images, known captions."""

import json
import os

import numpy as np
from PIL import Image

from flamingo_jax import config_base
from flamingo_jax.data import tokenizer as tok

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)


def solid(colour, width=80, height=80) -> np.ndarray:
  return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()


def save_png(array, path) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


def write_jsonl(path, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def tokenizer() -> tok.Tokenizer:
  return tok.Tokenizer(config_base.SYNTHETIC_TOKENIZER)


def ids(tk: tok.Tokenizer, *pieces: str) -> list[int]:
  """Ids of the named pieces ("<s>", "<image>", "▁red", ...), checked to exist."""
  out = []
  for piece in pieces:
    i = tk.piece_to_id(piece)
    assert i != tok.UNK_ID or piece == "<unk>", piece
    out.append(i)
  return out


class FixedRng:
  """Stands in for np.random.Generator where a test fixes every draw."""

  def __init__(self, random=0.0, integers=0):
    self._random, self._integers = random, integers

  def random(self):
    return self._random

  def integers(self, low, high=None):
    return self._integers

  def uniform(self, low, high, size=None):
    return np.full(size, (low + high) / 2) if size else (low + high) / 2
