"""The paper's preprocessing (PAPER.md §3), one example at a time, in numpy.

Token layouts (ids: tokenizer.py):

  interleaved  <BOS> text <EOC> <image> text <EOC> ... <EOS>, then a random window of L+1
               tokens keeping the first `max_media` <image> markers in it (later markers are
               dropped from the window, their images unused)
  pairs/video  <BOS> <image> caption <EOC> <EOS>; the caption gets a leading space with
               probability `leading_space_prob`; captions that do not fit are skipped
               ("text_too_long")

input_ids = seq[:L], target_ids = seq[1:L+1]; loss_mask is 1 where the target is a real token
other than <image> (where the next image goes is not text to predict) and 0 on padding.

p_next (PAPER.md §3.1, App. A.1.2): with probability p_next per document, text attends to the
*next* image instead of the previous one. We keep the model's single rule (a token sees the
image of the last <image> at or before it) and move the markers instead: each <image> goes to
the start of the run of text that precedes it, so that text now follows "its" next image.
Text after the last image keeps that last image (PAPER.md §9.4 leaves this open); markers
never reorder, so slot i still holds the i-th image of the window.

Images: resized to fit `size` x `size` keeping the aspect ratio, centred, padded with the
model's pixel mean (so padding normalises to 0); optional horizontal flip and colour jitter.
The pipeline ships uint8.
"""

from typing import Callable, Sequence

import numpy as np
from PIL import Image

from flamingo_jax.data import sources
from flamingo_jax.data import tokenizer as tok

PAD_RGB = sources.PAD_RGB


def resize_and_pad(image: np.ndarray, size: int, *, flip: bool = False,
                   jitter: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]; `flip` mirrors; `jitter` > 0 scales
  brightness, contrast and saturation by factors in [1 - jitter, 1 + jitter] (needs rng)."""
  h, w = image.shape[:2]
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  if flip:
    image = image[:, ::-1]
  if jitter > 0:
    factors = rng.uniform(1 - jitter, 1 + jitter, 3)
    x = image.astype(np.float32) * factors[0]                                   # brightness
    x = (x - x.mean()) * factors[1] + x.mean()                                   # contrast
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * factors[2] + gray[..., None]                    # saturation
    image = np.clip(np.round(x), 0, 255).astype(np.uint8)
  out = np.empty((size, size, 3), np.uint8)
  out[:] = PAD_RGB
  top, left = (size - nh) // 2, (size - nw) // 2
  out[top:top + nh, left:left + nw] = image
  return out


def frame_indices(num_frames: int, fps: float, frames: int, frame_rate: float,
                  rng: np.random.Generator | None) -> np.ndarray:
  """Indices of `frames` frames `1/frame_rate` s apart in a clip of `num_frames` at `fps`.

  A random start (rng given) or the centred one (rng None); past the end, the last frame.
  """
  duration = num_frames / fps
  span = (frames - 1) / frame_rate
  slack = max(0.0, duration - span - 1.0 / fps)
  start = rng.uniform(0.0, slack) if rng is not None else slack / 2
  times = start + np.arange(frames) / frame_rate
  return np.minimum(np.floor(times * fps + 1e-6).astype(np.int64), num_frames - 1)


def interleaved_tokens(texts: Sequence[str], image_index: Sequence[int],
                       encode: Callable[[str], list[int]], p_next: bool,
                       special: tok.SpecialIds = tok.SENTENCEPIECE_IDS) -> list[int]:
  """The whole document as ids: <BOS> ... <EOS>, one <image> per image, in image order."""
  # Elements in document order: ("image", None) or ("text", ids + <EOC>).
  elements, j = [], 0
  for t, text in enumerate(list(texts) + [None]):
    while j < len(image_index) and image_index[j] == t:
      elements.append(("image", None))
      j += 1
    if text is not None:
      elements.append(("text", encode(text) + [special.eoc]))
  if p_next:
    moved, run_start = [], 0                  # run_start: where the current text run began
    for kind, ids in elements:
      if kind == "image":
        moved.insert(run_start, (kind, ids))
        run_start = len(moved)
      else:
        moved.append((kind, ids))
    elements = moved
  seq = [special.bos]
  for kind, ids in elements:
    seq += [special.image] if kind == "image" else ids
  return seq + [special.eos]


def window(seq: Sequence[int], length: int, max_media: int, rng: np.random.Generator,
           image_id: int = tok.IMAGE_ID) -> tuple[list[int], list[int]]:
  """A random window of `length` + 1 tokens; returns (tokens, indices of the kept images).

  The first `max_media` markers of the window stay; later markers are removed.
  """
  seq = np.asarray(seq)
  marker_positions = np.flatnonzero(seq == image_id)       # marker i <-> image i
  start = int(rng.integers(0, max(0, len(seq) - (length + 1)) + 1))
  stop = start + length + 1
  inside = [i for i, p in enumerate(marker_positions) if start <= p < stop]
  kept, dropped = inside[:max_media], set(marker_positions[inside[max_media:]].tolist())
  tokens = [int(t) for p, t in enumerate(seq[start:stop], start) if p not in dropped]
  return tokens, kept


def pair_tokens(text: str, encode: Callable[[str], list[int]], leading_space: bool,
                special: tok.SpecialIds = tok.SENTENCEPIECE_IDS) -> list[int]:
  return ([special.bos, special.image] + encode((" " if leading_space else "") + text)
          + [special.eoc, special.eos])


def to_arrays(seq: Sequence[int], length: int,
              special: tok.SpecialIds = tok.SENTENCEPIECE_IDS) -> dict[str, np.ndarray]:
  """`seq` (at most length + 1 tokens) -> input_ids, target_ids, loss_mask, padded.

  The mask comes from the length, not from the pad id (a tokenizer's pad may be its EOS)."""
  if len(seq) > length + 1:
    raise sources.Skip("text_too_long", f"{len(seq)} tokens > {length + 1}")
  padded = np.full(length + 1, special.pad, np.int32)
  padded[:len(seq)] = seq
  targets = padded[1:]
  real = np.arange(length) < len(seq) - 1
  return {"input_ids": padded[:-1], "target_ids": targets,
          "loss_mask": (real & (targets != special.image)).astype(np.float32)}
