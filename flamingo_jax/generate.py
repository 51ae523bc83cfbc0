r"""Generate text with a Flamingo model (docs/design.md §7).

  python -m flamingo_jax.generate (--workdir=RUN | --params=DIR) [--config=FILE] \
      --prompt='<image>Output:' --image=a.jpg [--image=b.jpg] [--video=DIR_OR_NPY] \
      [--beam=3 | --temperature=T --top_p=P --top_k=K --seed=S] [--max_new_tokens=32]
  python -m flamingo_jax.generate ... --batch_file=prompts.jsonl [--batch_size=8]

Each `<image>` in the prompt takes the next media item: the --image files in order, then
the --video (a .npy uint8 [T, H, W, 3] or a folder of frames, `--frames` of them evenly
spaced, 30 by default: the paper's evaluation length, through the resampler's temporal
interpolation). Images are resized and padded as the training pipeline does. A prompt starts
with BOS, as training sequences do. Decoding: greedy by default; `--beam=N` beam search;
`--temperature` (with --top_p/--top_k) sampling. Generation stops at `<EOC>` or EOS.

stdout: each continuation on its own line, text only, cut at `<EOC>`. With --batch_file
(JSONL rows {"prompt": ..., "images": [...], "video": ...}; paths relative to the file),
one line per row in order; a row that cannot run (a missing image, more `<image>` tokens
than media, too long) prints an empty line, is named on stderr and counted.

--mesh=data=D,model=M shards parameters (training's partition rules), the batch and the
caches over the devices; with --coordinator_address/--num_processes/--process_id every
process runs the same command and process 0 prints (gloo collectives on CPU).
"""

import json
import os
import sys

from absl import flags
from absl import logging
import jax
import numpy as np

from flamingo_jax import cli
from flamingo_jax import inference
from flamingo_jax import weights
from flamingo_jax.data import pipeline
from flamingo_jax.data import preprocessing
from flamingo_jax.data import sources
from flamingo_jax.data import tokenizer as tok
from flamingo_jax.training import param_sources

_CONFIG = cli.define_config(run_flags=("workdir", "params"))
_WORKDIR = cli.define_workdir("A training run's workdir (its config is the default).")
_PARAMS = cli.define_params()
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text; <image> marks each media item.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file(s), in <image> order.")
_VIDEO = flags.DEFINE_string("video", "", "A video: .npy [T, H, W, 3] uint8 or a frames folder.")
_FRAMES = flags.DEFINE_integer("frames", 30, "Frames taken from --video (evenly spaced).")
_BATCH_FILE = flags.DEFINE_string("batch_file", "", "JSONL of prompts (see the docstring).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
_BEAM = flags.DEFINE_integer("beam", 0, "Beam width (0: greedy or sampling).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.0, "Beam score: log-prob / len^this.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "> 0: sample at this temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "New tokens at most.")
_STREAM = flags.DEFINE_integer("stream_every", 0, "With --prompt (greedy or sampling): print "
                               "the continuation as it grows, every this many tokens (0: at "
                               "the end).")
_MESH = cli.define_mesh()
cli.define_start()

class BadRow(ValueError):
  """A prompt row that cannot run; the message says why."""


def load_media(images, video, size: int, frames: int) -> list[np.ndarray]:
  """Media items as uint8 [T, size, size, 3] (T = 1 for images), preprocessed as in training."""
  items = []
  try:
    for path in images:
      items.append(preprocessing.load_image(path, size)[None])
    if video:
      items.append(preprocessing.load_video(video, size, frames))
  except sources.Skip as e:
    raise BadRow(str(e)) from None
  return items


def stack_media(rows: list[list[np.ndarray]]) -> np.ndarray | None:
  """Per-row media items -> uint8 [B, N, T, H, W, 3] (zero-padded slots), or None."""
  n = max((len(r) for r in rows), default=0)
  if n == 0:
    return None
  t = {item.shape[0] for r in rows for item in r}
  if len(t) > 1:
    raise BadRow(f"media with different frame counts {sorted(t)} in one batch")
  shape = next(item.shape for r in rows for item in r)
  out = np.zeros((len(rows), n, *shape), np.uint8)
  for i, r in enumerate(rows):
    for j, item in enumerate(r):
      out[i, j] = item
  return out


def decode_options() -> dict:
  if _BEAM.value and _TEMPERATURE.value:
    raise BadRow("--beam and --temperature exclude each other")
  if _BEAM.value:
    return dict(method="beam", beam_width=_BEAM.value, length_penalty=_LENGTH_PENALTY.value)
  if _TEMPERATURE.value:
    return dict(method="sample", temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                top_k=_TOP_K.value, seed=_SEED.value)
  return dict(method="greedy")


def read_rows(path: str) -> list[dict]:
  rows, root = [], os.path.dirname(os.path.abspath(path))
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
          raise ValueError("needs a string 'prompt'")
        rows.append({"prompt": record["prompt"],
                     "images": [os.path.join(root, p) for p in record.get("images", [])],
                     "video": os.path.join(root, record["video"]) if record.get("video") else ""})
      except (ValueError, TypeError) as e:
        rows.append({"error": f"line {number}: {e}"})
  return rows


def main(argv):
  del argv
  cli.start()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if bool(_WORKDIR.value) == bool(_PARAMS.value):
    sys.exit("error: give exactly one of --workdir and --params")
  if bool(_PROMPT.value) == bool(_BATCH_FILE.value):
    sys.exit("error: give exactly one of --prompt and --batch_file")
  try:
    options = decode_options()
    tokenizer = pipeline.load_tokenizer(config)
    if _BATCH_FILE.value:
      if not os.path.isfile(_BATCH_FILE.value):
        raise BadRow(f"--batch_file {_BATCH_FILE.value} not found")
      rows = read_rows(_BATCH_FILE.value)
    else:
      rows = [{"prompt": _PROMPT.value, "images": list(_IMAGE.value), "video": _VIDEO.value}]
    params, _ = param_sources.load(config, _WORKDIR.value or _PARAMS.value)
    params, mesh = param_sources.place(config, params, _MESH.value)
  except (BadRow, ValueError, FileNotFoundError, weights.CheckpointError) as e:
    sys.exit(f"error: {e}")
  size = config.model.image_size
  prepared = []                  # (row index, ids, media items) or (row index, error)
  for i, row in enumerate(rows):
    try:
      if "error" in row:
        raise BadRow(row["error"])
      ids = tok.encode_with_markers(row["prompt"], tokenizer)
      items = load_media(row["images"], row["video"], size, _FRAMES.value)
      images = ids.count(tokenizer.special.image)
      if images != len(items):
        raise BadRow(f"the prompt has {images} <image> token(s) but {len(items)} media "
                     f"item(s) were given")
      prepared.append((i, ids, items))
    except BadRow as e:
      prepared.append((i, str(e)))
  good = [p for p in prepared if len(p) == 3]
  longest = max((len(p[1]) for p in good), default=1)
  slots = -(-(inference.bucket(longest) + _MAX_NEW.value) // 64) * 64
  engine = inference.Engine(config.model, params, max_slots=slots, mesh=mesh)
  outputs, errors = {}, {i: e for i, e in (p for p in prepared if len(p) == 2)}
  stop = (tokenizer.special.eoc, tokenizer.special.eos)
  main_process = jax.process_index() == 0
  progress = cli.Progress(len(good), "generate", unit="rows",
                          enabled=bool(_BATCH_FILE.value) and main_process)
  # Rows with the same frame count decode together (one media array per batch).
  by_frames = {}
  for p in good:
    by_frames.setdefault(p[2][0].shape[0] if p[2] else 0, []).append(p)
  if _STREAM.value and good and not _BATCH_FILE.value and "beam_width" not in options:
    stream_one(engine, good[0], stop, options, tokenizer, main_process)
    return
  for group in by_frames.values():
    for start in range(0, len(group), _BATCH_SIZE.value):
      batch = group[start:start + _BATCH_SIZE.value]
      try:
        results = inference.generate(
            engine, [p[1] for p in batch], stack_media([p[2] for p in batch]),
            max_new_tokens=_MAX_NEW.value, stop_ids=stop, **options)
        for p, result in zip(batch, results):
          outputs[p[0]] = tok.decode_until_stop(result[0].tokens, tokenizer)
      except (BadRow, ValueError) as e:
        for p in batch:
          errors[p[0]] = str(e)
      progress.update(len(batch))
  if not main_process:
    return
  for i in range(len(rows)):
    print(outputs.get(i, ""), flush=True)
  for i, e in sorted(errors.items()):
    print(f"skipped row {i + 1}: {e}", file=sys.stderr)
  if errors:
    print(f"{len(errors)} of {len(rows)} row(s) skipped", file=sys.stderr)
    if not _BATCH_FILE.value:
      sys.exit(1)


def stream_one(engine, prepared, stop, options, tokenizer, printing: bool) -> None:
  """One prompt's continuation printed as it grows (inference.stream), then its newline."""
  _, ids, items = prepared
  shown = ""
  for partial in inference.stream(engine, [ids], stack_media([items]), every=_STREAM.value,
                                  max_new_tokens=_MAX_NEW.value, stop_ids=stop, **options):
    text = tok.decode_until_stop(partial[0], tokenizer)
    if printing and text.startswith(shown):     # (a partial character may decode otherwise)
      print(text[len(shown):], end="", flush=True)
      shown = text
  if printing:
    print(text[len(shown):] if text.startswith(shown) else "\n" + text, flush=True)


if __name__ == "__main__":
  cli.run(main)
