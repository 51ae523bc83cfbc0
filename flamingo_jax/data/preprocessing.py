"""The paper's preprocessing (docs/paper.md §3), one example at a time, in numpy.

Token layouts (ids: tokenizer.py):

  interleaved  <BOS> text <EOC> <image> text <EOC> ... <EOS> (the texts between two images
               are one chunk with one <EOC>), then a random window of L+1
               tokens keeping the first `max_media` <image> markers in it (later markers are
               dropped from the window, their images unused)
  pairs/video  <BOS> <image> caption <EOC> <EOS>; the caption gets a leading space with
               probability `leading_space_prob`; captions that do not fit are truncated

input_ids = seq[:L], target_ids = seq[1:L+1]; loss_mask is 1 where the target is a real token
other than <image> (where the next image goes is not text to predict) and 0 on padding.

p_next (docs/paper.md §3.1, App. A.1.2): with probability p_next per document, text attends to the
*next* image instead of the previous one. We keep the model's single rule (a token sees the
image of the last <image> at or before it) and move the markers instead: each <image> goes to
the start of the run of text that precedes it, so that text now follows "its" next image.
Text after the last image keeps that last image (docs/paper.md §9.4 leaves this open); markers
never reorder, so slot i still holds the i-th image of the window.

Images: resized to fit `size` x `size` keeping the aspect ratio, centred, padded with the
model's pixel mean (so padding normalises to 0); optional horizontal flip and colour jitter.
The pipeline ships uint8.
"""

import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from flamingo_jax.data import sources
from flamingo_jax.data import tokenizer as tok

PAD_RGB = sources.PAD_RGB
_IMAGE = object()               # an image's place among a document's texts


def color_factors(jitter: float, rng: np.random.Generator) -> np.ndarray | None:
  """(brightness, contrast, saturation) factors in [1 - jitter, 1 + jitter]; None when 0.
  Drawn once per image or video, so that the frames of a clip get the same colours."""
  return rng.uniform(1 - jitter, 1 + jitter, 3) if jitter > 0 else None


def resize_and_pad(image: np.ndarray, size: int, *, flip: bool = False,
                   colors: np.ndarray | None = None) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]; `flip` mirrors; `colors` (color_factors)
  scale brightness, contrast and saturation."""
  h, w = image.shape[:2]
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  if flip:
    image = image[:, ::-1]
  if colors is not None:
    x = image.astype(np.float32) * colors[0]                                    # brightness
    x = (x - x.mean()) * colors[1] + x.mean()                                    # contrast
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * colors[2] + gray[..., None]                     # saturation
    image = np.clip(np.round(x), 0, 255).astype(np.uint8)
  out = np.empty((size, size, 3), np.uint8)
  out[:] = PAD_RGB
  top, left = (size - nh) // 2, (size - nw) // 2
  out[top:top + nh, left:left + nw] = image
  return out


def load_image(path: str, size: int) -> np.ndarray:
  """An image file -> uint8 [size, size, 3] as training sees it (no augmentation): decoded
  (a large JPEG at a reduced DCT scale), fitted and padded. Raises sources.Skip for a
  missing or unreadable file."""
  if not os.path.isfile(path):
    raise sources.Skip("missing_file", path)
  with open(path, "rb") as f:
    return resize_and_pad(sources.decode_image(f.read(), path, fit=size), size)


def load_video(path: str, size: int, frames: int) -> np.ndarray:
  """A clip (.npy uint8 [T, H, W, 3] or a folder of frames) -> uint8 [frames, size, size, 3]:
  frames evenly spaced over it (a shorter clip repeats frames: every clip of a batch has the
  same length), fitted and padded as training does. Raises sources.Skip for a missing or
  unreadable clip."""
  clip = sources.read_video(path)
  index = np.linspace(0, len(clip) - 1, frames).round().astype(int)
  return np.stack([resize_and_pad(clip[i], size) for i in index])


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
  """The whole document as ids (docs/paper.md §2): <BOS> chunk <EOC> <image> chunk <EOC> … <EOS>.

  The texts between two images form one chunk (joined by a space); each chunk ends with one
  <EOC>: before the <image> that follows it, or before <EOS>. One <image> per image, in image
  order.
  """
  # Elements in document order: _IMAGE or a text.
  elements, j = [], 0
  for t, text in enumerate(list(texts) + [None]):
    while j < len(image_index) and image_index[j] == t:
      elements.append(_IMAGE)
      j += 1
    if text is not None:
      elements.append(text)
  if p_next:
    moved, run_start = [], 0                  # run_start: where the current text run began
    for element in elements:
      if element is _IMAGE:
        moved.insert(run_start, element)
        run_start = len(moved)
      else:
        moved.append(element)
    elements = moved
  seq, chunk = [special.bos], []
  for element in elements + [_IMAGE]:         # a final _IMAGE ends the last chunk
    if element is not _IMAGE:
      chunk.append(element)
      continue
    if chunk:
      seq += encode(" ".join(chunk)) + [special.eoc]
      chunk = []
    end = len(seq)                            # (the final _IMAGE's tokens are cut off)
    seq += tok.image_tokens(special, seq[-1])
  return seq[:end] + [special.eos]


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
                special: tok.SpecialIds = tok.SENTENCEPIECE_IDS,
                max_tokens: int | None = None) -> list[int]:
  """<BOS> <image> caption <EOC> <EOS>, cut to `max_tokens` + 1 tokens when longer: a long
  caption is truncated (its end markers go with it, so that the model never learns an end
  that is not there), not dropped, which would bias the data towards short captions."""
  seq = ([special.bos, *tok.image_tokens(special, special.bos)]
         + encode((" " if leading_space else "") + text) + [special.eoc, special.eos])
  return seq if max_tokens is None else seq[:max_tokens + 1]


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
