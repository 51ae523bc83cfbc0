"""Readers for the raw formats users bring; each yields canonical examples and counts skips.

Formats (paths inside a record are relative to the file that names them):

  interleaved  *.jsonl  {"content": [{"text": "..."}, {"image": "img/a.jpg"}, ...]}   (ordered)
               *.jsonl  MMC4: {"text_list": [...], "image_info": [{"image_name": "a.jpg",
                        "matched_text_index": i}, ...]}; image placed before text_list[i]
  image_text   *.jsonl  {"image": "img/a.jpg", "text": "..."}
               *.tar    webdataset shards: KEY.jpg|jpeg|png + KEY.txt
  video_text   *.jsonl  {"video": "clip.npy" | "frames": "dir_of_frames/", "fps": 1.0, "text": "..."}

Canonical examples (the TFDS features of builders.py):

  interleaved  {"texts": [str], "images": [uint8 HxWx3], "image_index": [int]}: image j sits
               just before texts[image_index[j]] (== len(texts): after the last text)
  image_text   {"image": uint8 HxWx3, "text": str}
  video_text   {"frames": uint8 [T,H,W,3], "fps": float, "text": str}

Bad input never raises: the example (or, in a document, the image) is dropped and counted
under one of SKIP_REASONS. The paper's image filters (PAPER.md §3.1): a side < 64 px or an
aspect ratio > 3 drops the image; documents left without images are dropped.
"""

import collections
import glob
import io
import json
import os
import tarfile
from typing import Iterator

import numpy as np
from PIL import Image

MIN_IMAGE_SIDE = 64
MAX_ASPECT_RATIO = 3.0
SKIP_REASONS = ("invalid_json", "missing_file", "unreadable_image", "image_too_small",
                "bad_aspect_ratio", "empty_document", "no_image", "empty_text", "empty_video",
                "text_too_long")
SOURCE_KINDS = ("interleaved", "image_text", "video_text")


class Skip(Exception):
  """An example (or image) to drop, with its reason (one of SKIP_REASONS)."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in SKIP_REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def check_image(image: np.ndarray) -> np.ndarray:
  h, w = image.shape[:2]
  if min(h, w) < MIN_IMAGE_SIDE:
    raise Skip("image_too_small", f"{w}x{h}")
  if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
    raise Skip("bad_aspect_ratio", f"{w}x{h}")
  return image


def decode_image(data: bytes, what: str = "") -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, 3]; a truncated or corrupt file raises Skip."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()                    # decodes fully: truncated files fail here
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise Skip("unreadable_image", f"{what}: {e}") from None


def read_image(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise Skip("missing_file", path)
  with open(path, "rb") as f:
    return check_image(decode_image(f.read(), path))


def _relative(root: str, path) -> str:
  if not isinstance(path, str) or not path:
    raise Skip("invalid_json", f"bad path {path!r}")
  return os.path.join(root, path)


def _text(value) -> str:
  if not isinstance(value, str):
    raise Skip("invalid_json", f"text is {type(value).__name__}")
  return value


def _jsonl(path: str, name: str) -> Iterator[tuple[str, dict | Skip]]:
  with open(path, encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f):
      if not line.strip():
        continue
      key = f"{name}:{line_no}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        yield key, Skip("invalid_json", str(e))
        continue
      yield key, record if isinstance(record, dict) else Skip("invalid_json", "not an object")


def _interleaved(record: dict, root: str, counts: collections.Counter) -> dict:
  if "content" in record:
    entries = record["content"]
    if not isinstance(entries, list):
      raise Skip("invalid_json", "content is not a list")
  elif "text_list" in record:                       # MMC4
    texts = record["text_list"]
    infos = record.get("image_info", [])
    if not isinstance(texts, list) or not isinstance(infos, list):
      raise Skip("invalid_json", "text_list / image_info are not lists")
    before = collections.defaultdict(list)
    for info in infos:
      if not isinstance(info, dict) or "matched_text_index" not in info:
        raise Skip("invalid_json", "image_info entry without matched_text_index")
      before[int(info["matched_text_index"])].append(info.get("image_name"))
    entries = []
    for i, text in enumerate(texts):
      entries += [{"image": name} for name in before.pop(i, [])] + [{"text": text}]
    entries += [{"image": name} for i in sorted(before) for name in before[i]]
  else:
    raise Skip("invalid_json", "neither 'content' nor 'text_list'")
  if not entries:
    raise Skip("empty_document")
  texts, images, image_index = [], [], []
  for entry in entries:
    if not isinstance(entry, dict) or ("text" in entry) == ("image" in entry):
      raise Skip("invalid_json", f"entry {entry!r:.60} is not one of {{text}} / {{image}}")
    if "text" in entry:
      text = _text(entry["text"]).strip()
      if text:
        texts.append(text)
      continue
    try:
      images.append(read_image(_relative(root, entry["image"])))
      image_index.append(len(texts))
    except Skip as skip:            # a bad image drops that image, not the document
      if skip.reason == "invalid_json":
        raise
      counts[skip.reason] += 1
  if not texts and not images:
    raise Skip("empty_document")
  if not images:
    raise Skip("no_image")
  return {"texts": texts, "images": images, "image_index": image_index}


def _image_text(record: dict, root: str) -> dict:
  if "image" not in record or "text" not in record:
    raise Skip("invalid_json", "needs 'image' and 'text'")
  text = _text(record["text"]).strip()
  if not text:
    raise Skip("empty_text")
  return {"image": read_image(_relative(root, record["image"])), "text": text}


def read_video(path: str) -> np.ndarray:
  """A clip as uint8 [T, H, W, 3] from a `.npy` file or a folder of .jpg/.png frames (in
  name order); raises Skip naming what is wrong."""
  if path.endswith(".npy"):
    if not os.path.isfile(path):
      raise Skip("missing_file", path)
    try:
      frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise Skip("unreadable_image", f"{path}: {e}") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise Skip("unreadable_image", f"{path}: want uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
  else:
    if not os.path.isdir(path):
      raise Skip("missing_file", path)
    names = sorted(n for n in os.listdir(path)
                   if n.lower().endswith((".jpg", ".jpeg", ".png")))
    frames = [decode_image(open(os.path.join(path, n), "rb").read(), n) for n in names]
    if len({f.shape for f in frames}) > 1:
      raise Skip("unreadable_image", f"{path}: frames differ in size")
    frames = np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)
  if len(frames) == 0:
    raise Skip("empty_video", path)
  check_image(frames[0])
  return frames


def _video_frames(record: dict, root: str) -> np.ndarray:
  if "video" in record:
    return read_video(_relative(root, record["video"]))
  if "frames" in record:
    folder = _relative(root, record["frames"])
    if folder.endswith(".npy"):
      raise Skip("invalid_json", f"'frames' must be a folder, got {folder}")
    return read_video(folder)
  raise Skip("invalid_json", "needs 'video' (.npy) or 'frames' (folder)")


def _video_text(record: dict, root: str) -> dict:
  if "text" not in record:
    raise Skip("invalid_json", "needs 'text'")
  fps = record.get("fps")
  if not isinstance(fps, (int, float)) or fps <= 0:
    raise Skip("invalid_json", f"fps {fps!r}")
  text = _text(record["text"]).strip()
  if not text:
    raise Skip("empty_text")
  return {"frames": _video_frames(record, root), "fps": float(fps), "text": text}


def _tar_pairs(path: str, shard: str) -> Iterator[tuple[str, dict | Skip]]:
  """webdataset: members grouped by KEY (the name up to the first dot)."""
  groups = collections.OrderedDict()
  try:
    with tarfile.open(path) as tar:
      for member in tar:
        if member.isfile():
          key, _, ext = os.path.basename(member.name).partition(".")
          groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError) as e:        # a truncated shard keeps what it read
    yield f"{shard}:truncated", Skip("unreadable_image", f"{path}: {e}")
  for key, files in groups.items():
    name = f"{shard}:{key}"
    image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    if image is None or "txt" not in files:
      yield name, Skip("missing_file", f"{key}: needs an image and a .txt")
      continue
    try:
      text = files["txt"].decode("utf-8").strip()
      if not text:
        raise Skip("empty_text")
      yield name, {"image": check_image(decode_image(image, key)), "text": text}
    except Skip as skip:
      yield name, skip
    except UnicodeDecodeError as e:
      yield name, Skip("invalid_json", f"{key}.txt: {e}")


def read_source(kind: str, directory: str,
                counts: collections.Counter) -> Iterator[tuple[str, dict]]:
  """All usable examples of the raw files in `directory`, as (unique key, example).

  `counts` gets one entry per skipped example (and per dropped image in a document).
  """
  if kind not in SOURCE_KINDS:
    raise ValueError(f"source kind {kind!r}; expected one of {SOURCE_KINDS}")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{kind} source directory {directory!r} does not exist")
  jsonl = sorted(glob.glob(os.path.join(directory, "**", "*.jsonl"), recursive=True))
  tars = sorted(glob.glob(os.path.join(directory, "**", "*.tar"), recursive=True))
  if not jsonl and not (kind == "image_text" and tars):
    raise FileNotFoundError(f"{kind} source {directory!r} has no "
                            f"{'*.jsonl or *.tar' if kind == 'image_text' else '*.jsonl'} files")
  parse = {"interleaved": lambda r, root: _interleaved(r, root, counts),
           "image_text": _image_text, "video_text": _video_text}[kind]
  for path in jsonl:
    root = os.path.dirname(path)
    for key, record in _jsonl(path, os.path.relpath(path, directory)):
      try:
        if isinstance(record, Skip):
          raise record
        yield key, parse(record, root)
      except Skip as skip:
        counts[skip.reason] += 1
  if kind == "image_text":
    for path in tars:
      for key, example in _tar_pairs(path, os.path.relpath(path, directory)):
        if isinstance(example, Skip):
          counts[example.reason] += 1
        else:
          yield key, example
