"""Reading safetensors checkpoints one tensor at a time, without pickle.

A checkpoint is a Hugging Face model folder (`model.safetensors`, or shards listed by
`model.safetensors.index.json`, or any `*.safetensors` files) or a single file. Headers are
read and checked up front (every tensor's bytes must lie inside its file, so a truncated
download is an error before anything is loaded); tensors are then read one by one through
the `safetensors` numpy API (memory-mapped: a read costs about one tensor of host memory).
"""

import json
import os
import struct
from typing import Iterator, NamedTuple

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names -> numpy (bfloat16 through ml_dtypes, which jax installs).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as asked; the message names the file and tensor."""


class TensorInfo(NamedTuple):
  shape: tuple[int, ...]
  dtype: str           # numpy name
  file: str
  nbytes: int


def _read_header(path: str) -> dict:
  """The JSON header of one .safetensors file, checked against the file's size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > size - 8:
      raise CheckpointError(f"{path}: truncated or not safetensors (header of {header_len} "
                            f"bytes in a {size}-byte file)")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
  data_size = size - 8 - header_len
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    end = entry["data_offsets"][1]
    if end > data_size:
      raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the "
                            f"data section but the file holds {data_size} (re-download it)")
  return header


def checkpoint_files(source: str) -> list[str]:
  """The .safetensors files of a model folder or a single file, in a fixed order."""
  if not os.path.exists(source):
    raise CheckpointError(f"checkpoint {source!r} does not exist")
  if os.path.isfile(source):
    return [source]
  index = os.path.join(source, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    files = sorted(set(weight_map.values()))
    missing = [name for name in files if not os.path.exists(os.path.join(source, name))]
    if missing:
      raise CheckpointError(f"{index} lists shard(s) {missing} that are not in {source}")
    return [os.path.join(source, name) for name in files]
  if os.path.exists(os.path.join(source, SINGLE_FILE)):
    return [os.path.join(source, SINGLE_FILE)]
  files = sorted(name for name in os.listdir(source) if name.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"no .safetensors file in {source} (a .bin / .pt checkpoint must be "
                          "converted to safetensors first)")
  return [os.path.join(source, name) for name in files]


class SafetensorsCheckpoint:
  """Tensor names, shapes and dtypes of a checkpoint (headers only), and one-at-a-time reads."""

  def __init__(self, source: str):
    self.source = source
    self.tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(source):
      for name, entry in _read_header(path).items():
        if name == "__metadata__":
          continue
        if name in self.tensors:
          raise CheckpointError(f"tensor {name!r} is in both {self.tensors[name].file} and {path}")
        if entry["dtype"] not in _DTYPES:
          raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        self.tensors[name] = TensorInfo(tuple(entry["shape"]), _DTYPES[entry["dtype"]], path,
                                        end - start)

  @property
  def total_bytes(self) -> int:
    return sum(info.nbytes for info in self.tensors.values())

  def read(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    with safe_open(info.file, framework="numpy") as f:
      return f.get_tensor(name)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) in file order: one tensor in host memory at a time."""
    return self.items(self.tensors)

  def items(self, names) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of `names` only, in file order (the others are never read)."""
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(self.tensors[name].file, []).append(name)
    for path, names in by_file.items():
      with safe_open(path, framework="numpy") as f:
        for name in names:
          yield name, f.get_tensor(name)


class OverlaidCheckpoint:
  """A checkpoint with some tensors replaced or added from memory (an OpenFlamingo
  checkpoint's trained embeddings over its base LM's files); the same interface as
  SafetensorsCheckpoint for the loaders."""

  def __init__(self, base: SafetensorsCheckpoint, overrides: dict[str, np.ndarray],
               dropped: tuple[str, ...] = ()):
    self.source = base.source
    self._base = base
    self._overrides = overrides
    self.tensors = {name: info for name, info in base.tensors.items()
                    if name not in overrides and name not in dropped}
    for name, value in overrides.items():
      self.tensors[name] = TensorInfo(tuple(value.shape), value.dtype.name, "<memory>",
                                      value.nbytes)

  @property
  def total_bytes(self) -> int:
    return sum(info.nbytes for info in self.tensors.values())

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    # The base's replaced tensors are never read (a token table is hundreds of MB).
    yield from self._base.items([n for n in self.tensors if n not in self._overrides])
    yield from self._overrides.items()
