"""Procedural sources for smoke runs and tests, written in the real on-disk formats (sources.py)
so that they go through the same TFDS builders and pipeline as user data.

Captions are read off the pixels (shape, colour, count; direction of motion for video), so a
model lowers its loss on them only by looking. Interleaved documents chain several such
image-caption pairs; in the *in-context* variant (a fraction of documents) each shape (or, by
config, colour) is named by a made-up word that only that document defines ("a dax is a
circle" is never said: the word is shown with earlier images of the same shape), so
predicting it needs few-shot reading.
"""

import json
import os
import tarfile
import io

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NONCE_WORDS = ("dax", "wug", "blicket", "toma", "fep", "zorp")


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour):
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  else:
    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _background(rng: np.random.Generator) -> tuple:
  return tuple(int(v) for v in rng.integers(200, 256, 3))


def scene(rng: np.random.Generator, size: int = 96, colours=None):
  """(uint8 [size, size, 3] image, attributes): `count` shapes of one colour and kind (the
  colour among `colours` when given)."""
  colour = str(rng.choice(list(COLOURS) if colours is None else list(colours)))
  shape = str(rng.choice(SHAPES))
  count = int(rng.integers(1, 4))
  image = Image.new("RGB", (size, size), _background(rng))
  draw = ImageDraw.Draw(image)
  r = size / 9
  slots = rng.permutation(9)[:count]              # a 3x3 grid, so shapes never overlap
  for slot in slots:
    cx = (slot % 3 + 0.5) * size / 3 + rng.uniform(-r / 3, r / 3)
    cy = (slot // 3 + 0.5) * size / 3 + rng.uniform(-r / 3, r / 3)
    _draw(draw, shape, cx, cy, r, COLOURS[colour])
  return np.asarray(image), dict(colour=colour, shape=shape, count=count)


def caption(attrs: dict) -> str:
  plural = "s" if attrs["count"] > 1 else ""
  return f"{COUNT_WORDS[attrs['count'] - 1]} {attrs['colour']} {attrs['shape']}{plural}"


def clip(rng: np.random.Generator, frames: int, size: int = 64):
  """(uint8 [frames, size, size, 3], caption): one shape crossing the frame in one direction."""
  colour = str(rng.choice(list(COLOURS)))
  shape = str(rng.choice(SHAPES))
  direction = str(rng.choice(list(DIRECTIONS)))
  dx, dy = DIRECTIONS[direction]
  background = _background(rng)
  r = size / 8
  out = []
  for t in range(frames):
    progress = (t + 0.5) / frames                # 0 -> 1 across the clip
    offset = (progress - 0.5) * (size - 3 * r)
    image = Image.new("RGB", (size, size), background)
    _draw(ImageDraw.Draw(image), shape, size / 2 + dx * offset, size / 2 + dy * offset, r,
          COLOURS[colour])
    out.append(np.asarray(image))
  return np.stack(out), f"a {colour} {shape} moving {direction}"


def _save_png(array: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


# What the made-up words of in-context documents name: each attribute and its values (a
# document binds three of them, one word each).
NAMED_ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS)}


def write_attribute_task(directory: str, seed: int, attribute: str = "shape",
                         support: int = 64, queries: int = 100, size: int = 96) -> str:
  """The few-shot attribute benchmark (evaluation/tasks.py "attributes"): scenes whose
  `attribute` (colour, shape or count) is the answer, scored among the values of every
  attribute, so a prompt without shots does not say which attribute is asked. Writes
  `attributes.json` {"attribute", "candidates", "support": [...], "queries": [...]} (rows
  {"image", "answer"}) and images/."""
  if attribute not in REPORTED_ATTRIBUTES:
    raise ValueError(f"attribute {attribute!r}; expected one of {REPORTED_ATTRIBUTES}")
  rng = np.random.default_rng(seed)
  out = {"attribute": attribute,
         "candidates": list(COLOURS) + list(SHAPES) + list(COUNT_WORDS)}
  return _write_task(directory, "attributes.json", out, support, queries,
                     lambda: scene(rng, size),
                     lambda attrs: {"answer": attribute_value(attrs, attribute)})


def _write_task(directory: str, filename: str, out: dict, support: int, queries: int,
                draw, fields) -> str:
  """A synthetic benchmark: `support` and `queries` scenes from `draw()` saved under images/,
  their rows {"image", **fields(attrs)} added to `out`, written (atomically) as `filename`."""
  for split, count in (("support", support), ("queries", queries)):
    rows = []
    for k in range(count):
      image, attrs = draw()
      name = f"images/{split}_{k:05d}.png"
      _save_png(image, os.path.join(directory, name))
      rows.append({"image": name, **fields(attrs)})
    out[split] = rows
  path = os.path.join(directory, filename)
  with open(path + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
  os.replace(path + ".tmp", path)
  return path


def _binding(rng: np.random.Generator, attribute: str) -> dict:
  """{value: made-up word} for three values of `attribute` (all three shapes; three of the
  five colours)."""
  if attribute not in NAMED_ATTRIBUTES:
    raise ValueError(f"naming attribute {attribute!r}; expected one of {sorted(NAMED_ATTRIBUTES)}")
  values = SHAPES if attribute == "shape" else [str(v) for v in
                                                 rng.permutation(list(COLOURS))[:3]]
  return dict(zip(values, (str(w) for w in rng.permutation(NONCE_WORDS)[:len(values)])))


def _named_scene(rng: np.random.Generator, size: int, attribute: str, names: dict):
  return scene(rng, size, colours=list(names) if attribute == "colour" else None)


# In-context documents of kind "attribute" report one attribute of each image, the same one
# throughout the document: "this is red." ... or "this is circle." ... or "this is two." ...
REPORTED_ATTRIBUTES = ("colour", "shape", "count")


def attribute_value(attrs: dict, attribute: str) -> str:
  return COUNT_WORDS[attrs["count"] - 1] if attribute == "count" else attrs[attribute]


def attribute_text(value: str) -> str:
  return f"this is {value}."


def document(rng: np.random.Generator, size: int = 96, in_context: float = 0.5,
             pairs: tuple[int, int] = (2, 4), naming: str = "shape"):
  """An interleaved document: list of {"text"} / {"image": array} entries, `pairs` (low,
  high) image-text pairs. An `in_context` fraction of documents are in-context ones: for
  `naming` "shape" or "colour" they name that attribute of each image with made-up words
  (`naming_text`); for "attribute" they report one attribute, drawn per document, of every
  image (`attribute_text`)."""
  count = int(rng.integers(pairs[0], pairs[1] + 1))
  entries = [{"text": "a page about shapes."}] if rng.random() < 0.5 else []
  if naming == "attribute" and rng.random() < in_context:
    attribute = str(rng.choice(REPORTED_ATTRIBUTES))
    for _ in range(count):
      image, attrs = scene(rng, size)
      entries += [{"image": image}, {"text": attribute_text(attribute_value(attrs, attribute))}]
  elif naming != "attribute" and rng.random() < in_context:       # in-context naming
    names = _binding(rng, naming)
    for _ in range(count):
      image, attrs = _named_scene(rng, size, naming, names)
      entries += [{"image": image}, {"text": naming_text(names[attrs[naming]])}]
  else:
    for _ in range(count):
      image, attrs = scene(rng, size)
      entries += [{"image": image}, {"text": f"a picture of {caption(attrs)}."}]
  return entries


def naming_text(word: str) -> str:
  return f"this is a {word}."


def write_naming_task(directory: str, seed: int, support: int = 64, queries: int = 100,
                      size: int = 96, attribute: str = "shape") -> str:
  """The few-shot naming benchmark (evaluation/tasks.py "naming"): one binding of made-up
  words to three values of `attribute` (shape or colour), drawn from `seed`, a support set and
  queries of new scenes named by it. Training documents bind words afresh per document, so
  only the shots of a prompt tell the model this binding. Writes `naming.json`
  {"attribute", "names": {value: word}, "support": [...], "queries": [...]} (rows {"image",
  "name", "value"}) and images/."""
  rng = np.random.default_rng(seed)
  names = _binding(rng, attribute)
  out = {"attribute": attribute, "names": names}
  return _write_task(directory, "naming.json", out, support, queries,
                     lambda: _named_scene(rng, size, attribute, names),
                     lambda attrs: {"name": names[attrs[attribute]], "value": attrs[attribute]})


def write_interleaved(directory: str, count: int, seed: int, layout: str = "jsonl",
                      size: int = 96, in_context: float = 0.5,
                      pairs: tuple[int, int] = (2, 4), naming: str = "shape") -> str:
  """`count` documents (`document`) as `docs.jsonl` (layout "jsonl") or MMC4-style
  `docs.jsonl` ("mmc4")."""
  rng = np.random.default_rng(seed)
  path = os.path.join(directory, "docs.jsonl")
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    for d in range(count):
      entries = document(rng, size, in_context, pairs, naming)
      content, texts, infos = [], [], []
      for i, entry in enumerate(entries):
        if "image" in entry:
          name = f"images/doc{d:06d}_{i}.png"
          _save_png(entry["image"], os.path.join(directory, name))
          content.append({"image": name})
          infos.append({"image_name": name, "matched_text_index": len(texts)})
        else:
          content.append({"text": entry["text"]})
          texts.append(entry["text"])
      if layout == "mmc4":
        # MMC4 matches each image to a sentence; ours sits before the text that follows it.
        infos = [dict(info, matched_text_index=min(info["matched_text_index"], len(texts) - 1))
                 for info in infos]
        f.write(json.dumps({"text_list": texts, "image_info": infos}) + "\n")
      else:
        f.write(json.dumps({"content": content}) + "\n")
  return path


def write_image_text(directory: str, count: int, seed: int, layout: str = "jsonl",
                     size: int = 96, shard_size: int = 64) -> str:
  """`count` pairs as `pairs.jsonl` + images/ ("jsonl") or webdataset tar shards ("tar")."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  if layout == "tar":
    for shard in range(-(-count // shard_size)):
      with tarfile.open(os.path.join(directory, f"shard-{shard:05d}.tar"), "w") as tar:
        for k in range(shard * shard_size, min(count, (shard + 1) * shard_size)):
          image, attrs = scene(rng, size)
          buffer = io.BytesIO()
          Image.fromarray(image).save(buffer, format="JPEG", quality=95)
          for name, data in ((f"{k:08d}.jpg", buffer.getvalue()),
                             (f"{k:08d}.txt", caption(attrs).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return directory
  path = os.path.join(directory, "pairs.jsonl")
  with open(path, "w") as f:
    for k in range(count):
      image, attrs = scene(rng, size)
      name = f"images/{k:08d}.png"
      _save_png(image, os.path.join(directory, name))
      f.write(json.dumps({"image": name, "text": caption(attrs)}) + "\n")
  return path


def write_video_text(directory: str, count: int, seed: int, layout: str = "npy",
                     frames: int = 8, fps: float = 1.0, size: int = 64) -> str:
  """`count` clips as `clips.jsonl` with an `.npy` per clip ("npy") or a folder of frames."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "clips.jsonl")
  with open(path, "w") as f:
    for k in range(count):
      video, text = clip(rng, frames, size)
      if layout == "npy":
        name = f"clips/{k:06d}.npy"
        os.makedirs(os.path.join(directory, "clips"), exist_ok=True)
        np.save(os.path.join(directory, name), video)
        f.write(json.dumps({"video": name, "fps": fps, "text": text}) + "\n")
      else:
        name = f"frames/{k:06d}"
        for t, frame in enumerate(video):
          _save_png(frame, os.path.join(directory, name, f"{t:04d}.png"))
        f.write(json.dumps({"frames": name, "fps": fps, "text": text}) + "\n")
  return path


def corpus(seed: int = 0, count: int = 2000) -> list[str]:
  """Sentences the synthetic sources can produce (trains the tiny tokenizer)."""
  rng = np.random.default_rng(seed)
  out = ["a page about shapes."]
  for _ in range(count):
    attrs = dict(colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)),
                 count=int(rng.integers(1, 4)))
    out += [caption(attrs), " " + caption(attrs), f"a picture of {caption(attrs)}.",
            naming_text(rng.choice(NONCE_WORDS)),
            f"a {attrs['colour']} {attrs['shape']} moving {rng.choice(list(DIRECTIONS))}",
            f" a {attrs['colour']} {attrs['shape']} moving {rng.choice(list(DIRECTIONS))}"]
  return out
