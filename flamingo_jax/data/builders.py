"""TFDS builders: raw files in a manual dir (sources.py formats) -> a prepared TFDS dataset.

One builder per source kind. Datasets are written as ArrayRecord so that the pipeline reads
them by index (`as_data_source`): per-process sharding by index and an exactly resumable
iterator follow from that (pipeline.py). Images (and video frames) are stored as JPEG bytes:
the source file itself when it is a plain upright RGB/greyscale JPEG, else encoded with PIL
(`encode_image`); decoded with PIL (`sources.decode_image`), so reading needs no TensorFlow ops; the skip counts of the build go into the dataset's `metadata.json`
(`info.metadata["skipped"]`).

    builder = builders.prepare("image_text", manual_dir="raw/laion", data_dir="tfds/laion")
    source = builder.as_data_source(split="train")   # built once; later calls reuse it
"""

import collections
import io
import os
import sys

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from flamingo_jax.data import sources

_JPEG_QUALITY = 95


class _RawSourceBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared logic: read sources.read_source(KIND, manual_dir) into the 'train' split."""

  KIND = ""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at the folder of raw files (sources.py)."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=self._features(),
                                 metadata=tfds.core.MetadataDict())

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _kept(self, example: dict) -> dict:
    """What of a read example is stored (all of it but for video)."""
    return example

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager.manual_dir)}

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
  # prepared": nothing is downloaded here, so `prepare` says what it builds instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _generate_examples(self, manual_dir):
    counts, skip_log = collections.Counter(), []
    usable = 0
    for key, example in sources.read_source(self.KIND, os.fspath(manual_dir), counts, skip_log):
      usable += 1
      yield key, _encoded(self._kept(example))
    skipped = {reason: counts[reason] for reason in sources.SKIP_REASONS if counts[reason]}
    self.info.metadata["skipped"] = skipped
    self.info.metadata["usable"] = usable
    self.info.metadata["skip_log"] = skip_log
    print(skip_table(f"{self.KIND} source {os.fspath(manual_dir)}", usable, skipped), flush=True)
    for line in skip_log[:5]:
      logging.warning("skipped %s", line)
    if not usable:
      raise ValueError(f"{self.KIND} source {os.fspath(manual_dir)!r} has no usable example "
                       f"(skipped: {skipped})")


def skip_table(what: str, usable: int, skipped: dict[str, int]) -> str:
  """"WHAT: N usable examples" and one line per skip reason."""
  lines = [f"{what}: {usable} usable examples" + ("" if skipped else ", nothing skipped")]
  width = max((len(reason) for reason in skipped), default=0)
  lines += [f"  skipped {reason:<{width}} {count:>8}" for reason, count in skipped.items()]
  if skipped:
    lines.append("  (file and line of each: metadata.json 'skip_log' in the dataset)")
  return "\n".join(lines)


def _image() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(), dtype=np.object_)     # JPEG bytes


def encode_image(image: np.ndarray) -> bytes:
  """JPEG bytes of `image`: its source file's when it is that file's unchanged decoding."""
  kept = sources.source_bytes(image)
  if kept is not None:
    return kept
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  return buffer.getvalue()


def _encoded(example: dict) -> dict:
  """Arrays of a canonical example (sources.py) -> JPEG bytes."""
  example = dict(example)
  for key in ("image",):
    if key in example:
      example[key] = encode_image(example[key])
  for key in ("images", "frames"):
    if key in example:
      example[key] = [encode_image(x) for x in example[key]]
  return example


class Interleaved(_RawSourceBuilder):
  """M3W-like documents: texts, images and where each image sits among the texts."""
  KIND = "interleaved"

  def _features(self):
    return tfds.features.FeaturesDict({
        "texts": tfds.features.Sequence(tfds.features.Text()),
        "images": tfds.features.Sequence(_image()),
        "image_index": tfds.features.Sequence(np.int32),
    })


class ImageText(_RawSourceBuilder):
  """ALIGN / LTIP-like image-caption pairs."""
  KIND = "image_text"

  def _features(self):
    return tfds.features.FeaturesDict({"image": _image(), "text": tfds.features.Text()})


class VideoText(_RawSourceBuilder):
  """VTP-like clips: frames, their rate and a caption. With `max_fps` (frames per second; 0:
  all), a faster clip keeps only frames `1 / max_fps` s apart, so that the stored dataset holds
  what training at that frame rate can use and reading decodes nothing it drops."""
  KIND = "video_text"
  max_fps = 0.0

  def _split_generators(self, dl_manager):
    self.info.metadata["max_fps"] = float(self.max_fps)
    return super()._split_generators(dl_manager)

  def _kept(self, example):
    fps, frames = float(example["fps"]), example["frames"]
    if not self.max_fps or fps <= self.max_fps:
      return example
    kept = subsampled_frames(len(frames), fps, self.max_fps)
    return dict(example, frames=[frames[i] for i in kept], fps=float(self.max_fps))

  def _features(self):
    return tfds.features.FeaturesDict({
        "frames": tfds.features.Sequence(_image()),
        "fps": np.float32,
        "text": tfds.features.Text(),
    })


def subsampled_frames(num_frames: int, fps: float, max_fps: float) -> list[int]:
  """Indices of the frames at times 0, 1/max_fps, 2/max_fps, ... of a clip at `fps` > max_fps."""
  count = max(1, int(np.ceil(num_frames * max_fps / fps - 1e-9)))
  return [min(num_frames - 1, int(np.floor(j * fps / max_fps + 1e-6))) for j in range(count)]


BUILDERS = {cls.KIND: cls for cls in (Interleaved, ImageText, VideoText)}


def make_builder(kind: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if kind not in BUILDERS:
    raise ValueError(f"source kind {kind!r}; expected one of {sorted(BUILDERS)}")
  return BUILDERS[kind](data_dir=data_dir, file_format="array_record")


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the builder's dataset is built (TFDS renames it into place whole, info last).
  (TFDS's own is_prepared warns about a folder that does not exist yet.)"""
  return (builder.data_path / "dataset_info.json").exists()


def prepare(kind: str, manual_dir: str, data_dir: str,
            max_fps: float = 0.0) -> tfds.core.DatasetBuilder:
  """Builds the dataset unless `data_dir` already holds it; returns the builder. `max_fps`:
  video datasets keep at most this frame rate (0: every frame).

  TFDS writes into a temporary folder and renames it when complete, so a dataset is either
  whole or absent; callers that may race (several runs on one data_dir) hold the dataset's
  build lease around this (prepare.prepare_stream)."""
  builder = make_builder(kind, data_dir)
  if kind == "video_text":
    builder.max_fps = float(max_fps)
  if is_prepared(builder):
    return builder
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()       # progress bars only on a terminal, not in logs
  print(f"building the {kind} dataset {builder.data_dir} from {manual_dir}", flush=True)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
