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
under one of SKIP_REASONS, and noted with its file and line (or shard and key) for the skip
log. Every field is type-checked (`invalid_field`: a path that is not a string, an MMC4
`matched_text_index` that is not an integer in range, an `fps` that is not a finite number
in (0, MAX_FPS]); text that is not valid UTF-8 is `invalid_text`. The paper's image filters
(docs/paper.md §3.1): a side < 64 px or an aspect ratio > 3 drops the image; documents left
without images are dropped.

Images decode as they look: EXIF orientation applied, transparency composited over PAD_RGB
(the colour the model normalises to 0, which also pads), 16-bit greyscale scaled to 8 bits,
palette and CMYK images converted.
"""

import collections
import glob
import io
import json
import math
import os
import tarfile
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from PIL import ImageOps

MIN_IMAGE_SIDE = 64
MAX_ASPECT_RATIO = 3.0
MAX_FPS = 1000.0
MAX_SKIP_LOG = 1000                 # skip-log lines kept per dataset (the counts are complete)
# round(255 * ImageNet mean): the model subtracts this mean (models/flamingo.py, PIXEL_MEAN).
PAD_RGB = np.array([124, 116, 104], np.uint8)
SKIP_REASONS = ("invalid_json", "invalid_field", "invalid_text", "missing_file",
                "unreadable_image", "image_too_small", "bad_aspect_ratio", "empty_document",
                "no_image", "empty_text", "empty_video", "text_too_long")
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


_EXIF_ORIENTATION = 0x0112


def _to_rgb(image: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3], as the image looks."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    # 16-bit (PNG) greyscale: 0..65535 -> 0..255; convert("RGB") would clip at 255 (white).
    values = np.asarray(image, np.float64)
    grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if image.mode == "F":
    raise ValueError("floating-point image")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, tuple(int(c) for c in PAD_RGB) + (255,))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
  return np.asarray(image.convert("RGB"))


class DecodedJpeg(np.ndarray):
  """A decoded image that is exactly its source JPEG's content (RGB or greyscale, upright):
  `source_bytes` holds that file, so that dataset building stores it as it is instead of
  encoding the pixels again (no second quality loss, no encoding time). Arrays derived from
  it (slices, arithmetic) are plain pixels: they do not carry the bytes."""

  source_bytes: bytes | None = None

  def __array_finalize__(self, obj):
    self.source_bytes = None


def source_bytes(image: np.ndarray) -> bytes | None:
  """The source JPEG an image is the unchanged decoding of, else None."""
  return getattr(image, "source_bytes", None)


def decode_image(data: bytes, what: str = "", fit: int = 0) -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, 3]; a truncated or corrupt file raises Skip.

  `fit`: the square the image will be resized into (0: full size). A JPEG then decodes at
  the smallest DCT scale (1/2, 1/4 or 1/8) whose size still covers the fitted size, which
  skips most of the decoding work for sources much larger than the model's input."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      if fit and image.format == "JPEG":
        w, h = image.size
        scale = fit / max(w, h)
        if scale < 0.5:
          image.draft(image.mode, (max(1, round(w * scale)), max(1, round(h * scale))))
      image.load()                    # decodes fully: truncated files fail here
      pixels = _to_rgb(image)
      if (not fit and image.format == "JPEG" and image.mode in ("RGB", "L")
          and image.getexif().get(_EXIF_ORIENTATION, 1) == 1):
        pixels = pixels.view(DecodedJpeg)
        pixels.source_bytes = data
      return pixels
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise Skip("unreadable_image", f"{what}: {e}") from None


def read_image(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise Skip("missing_file", path)
  with open(path, "rb") as f:
    return check_image(decode_image(f.read(), path))


def _relative(root: str, path, field: str = "path") -> str:
  if not isinstance(path, str) or not path:
    raise Skip("invalid_field", f"{field} is {path!r:.60}, not a file name")
  return os.path.join(root, path)


def _text(value) -> str:
  if not isinstance(value, str):
    raise Skip("invalid_field", f"text is {type(value).__name__}, not a string")
  try:
    value.encode("utf-8")           # a JSON "\udc80" escape gives an unpaired surrogate
  except UnicodeEncodeError as e:
    raise Skip("invalid_text", str(e)) from None
  return value


def _integer(value, field: str, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise Skip("invalid_field", f"{field} is {value!r:.40}, not an integer in [{low}, {high}]")
  return value


def _fps(value) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or not 0 < value <= MAX_FPS):
    raise Skip("invalid_field", f"fps is {value!r:.40}, not a number in (0, {MAX_FPS:g}]")
  return float(value)


def _jsonl(path: str, name: str) -> Iterator[tuple[str, dict | Skip]]:
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      key = f"{name}:{line_no}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield key, Skip("invalid_text", f"not UTF-8: {e}")
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        yield key, Skip("invalid_json", str(e))
        continue
      yield key, record if isinstance(record, dict) else Skip("invalid_json", "not an object")


def _interleaved(record: dict, root: str, drop: Callable[[Skip], None]) -> dict:
  """`drop(skip)` counts an image dropped from the document (the document stays)."""
  if "content" in record:
    entries = record["content"]
    if not isinstance(entries, list):
      raise Skip("invalid_field", "content is not a list")
  elif "text_list" in record:                       # MMC4
    texts = record["text_list"]
    infos = record.get("image_info", [])
    if not isinstance(texts, list) or not isinstance(infos, list):
      raise Skip("invalid_field", "text_list / image_info are not lists")
    before = collections.defaultdict(list)
    for info in infos:
      if not isinstance(info, dict):
        raise Skip("invalid_field", f"image_info entry {info!r:.40} is not an object")
      try:
        index = _integer(info.get("matched_text_index"), "matched_text_index", 0,
                         max(0, len(texts) - 1))
        before[index].append(_relative(root, info.get("image_name"), "image_name"))
      except Skip as skip:                          # that image goes, the document stays
        drop(skip)
    entries = []
    for i, text in enumerate(texts):
      entries += [{"image_path": path} for path in before.pop(i, [])] + [{"text": text}]
    entries += [{"image_path": path} for i in sorted(before) for path in before[i]]
  else:
    raise Skip("invalid_json", "neither 'content' nor 'text_list'")
  if not entries:
    raise Skip("empty_document")
  texts, images, image_index = [], [], []
  for entry in entries:      # {"text"} | {"image": name} (content) | {"image_path"} (MMC4)
    if (not isinstance(entry, dict)
        or ("text" in entry) == ("image" in entry or "image_path" in entry)):
      raise Skip("invalid_field", f"entry {entry!r:.60} is not one of {{text}} / {{image}}")
    if "text" in entry:
      text = _text(entry["text"]).strip()
      if text:
        texts.append(text)
      continue
    try:
      images.append(read_image(entry.get("image_path")
                               or _relative(root, entry.get("image"), "image")))
      image_index.append(len(texts))
    except Skip as skip:            # a bad image drops that image, not the document
      drop(skip)
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
  return {"image": read_image(_relative(root, record["image"], "image")), "text": text}


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
    return read_video(_relative(root, record["video"], "video"))
  if "frames" in record:
    folder = _relative(root, record["frames"], "frames")
    if folder.endswith(".npy"):
      raise Skip("invalid_field", f"'frames' must be a folder, got {folder}")
    return read_video(folder)
  raise Skip("invalid_json", "needs 'video' (.npy) or 'frames' (folder)")


def _video_text(record: dict, root: str) -> dict:
  if "text" not in record:
    raise Skip("invalid_json", "needs 'text'")
  fps = _fps(record.get("fps"))
  text = _text(record["text"]).strip()
  if not text:
    raise Skip("empty_text")
  return {"frames": _video_frames(record, root), "fps": fps, "text": text}


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
      yield name, Skip("invalid_text", f"{key}.txt is not UTF-8: {e}")


def source_files(kind: str, directory: str) -> tuple[list[str], list[str]]:
  """(the *.jsonl files, the *.tar shards) of a raw `kind` folder; FileNotFoundError naming
  the folder when it does not exist or holds neither."""
  if kind not in SOURCE_KINDS:
    raise ValueError(f"source kind {kind!r}; expected one of {SOURCE_KINDS}")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{kind} source directory {directory!r} does not exist")
  jsonl = sorted(glob.glob(os.path.join(directory, "**", "*.jsonl"), recursive=True))
  tars = sorted(glob.glob(os.path.join(directory, "**", "*.tar"), recursive=True))
  if not jsonl and not (kind == "image_text" and tars):
    raise FileNotFoundError(f"{kind} source {directory!r} has no "
                            f"{'*.jsonl or *.tar' if kind == 'image_text' else '*.jsonl'} files")
  return jsonl, tars


def read_source(kind: str, directory: str, counts: collections.Counter,
                skip_log: list[str] | None = None) -> Iterator[tuple[str, dict]]:
  """All usable examples of the raw files in `directory`, as (unique key, example).

  `counts` gets one entry per skipped example (and per dropped image in a document);
  `skip_log`, if given, a line "file:line: reason: detail" for each (the first
  MAX_SKIP_LOG).
  """
  jsonl, tars = source_files(kind, directory)

  def count(where: str, skip: Skip) -> None:
    counts[skip.reason] += 1
    if skip_log is not None and len(skip_log) < MAX_SKIP_LOG:
      skip_log.append(f"{where}: {skip}")

  parse = {"image_text": _image_text, "video_text": _video_text}.get(kind)
  for path in jsonl:
    root = os.path.dirname(path)
    for key, record in _jsonl(path, os.path.relpath(path, directory)):
      try:
        if isinstance(record, Skip):
          raise record
        if parse is None:             # interleaved: a dropped image is counted under its line
          yield key, _interleaved(record, root, lambda skip, where=key: count(where, skip))
        else:
          yield key, parse(record, root)
      except Skip as skip:
        count(key, skip)
  if kind == "image_text":
    for path in tars:
      for key, example in _tar_pairs(path, os.path.relpath(path, directory)):
        if isinstance(example, Skip):
          count(key, example)
        else:
          yield key, example
