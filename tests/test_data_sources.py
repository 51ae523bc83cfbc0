"""Raw formats -> canonical examples, and every class of bad input: skipped, counted, never fatal."""

import collections
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import builders
from flamingo_jax.data import sources
from data_helpers import BLUE, GREEN, RED, save_png, solid, write_jsonl


def read(kind, directory):
  counts = collections.Counter()
  examples = [example for _, example in sources.read_source(kind, str(directory), counts)]
  return examples, dict(counts)


def good_pair(tmp_path, name="good"):
  save_png(solid(RED), str(tmp_path / f"{name}.png"))
  return {"image": f"{name}.png", "text": "two red circles"}


def test_interleaved_jsonl_and_mmc4_give_the_same_document(tmp_path):
  for colour, name in ((RED, "a.png"), (BLUE, "b.png")):
    save_png(solid(colour), str(tmp_path / "j" / name))
    save_png(solid(colour), str(tmp_path / "m" / name))
  write_jsonl(str(tmp_path / "j" / "docs.jsonl"), [{"content": [
      {"text": "a page about shapes."}, {"image": "a.png"}, {"text": "two red circles"},
      {"image": "b.png"}, {"text": "one blue square"}]}])
  write_jsonl(str(tmp_path / "m" / "docs.jsonl"), [{
      "text_list": ["a page about shapes.", "two red circles", "one blue square"],
      "image_info": [{"image_name": "a.png", "matched_text_index": 1},
                     {"image_name": "b.png", "matched_text_index": 2}]}])
  for folder in ("j", "m"):
    (doc,), counts = read("interleaved", tmp_path / folder)
    assert counts == {}
    assert doc["texts"] == ["a page about shapes.", "two red circles", "one blue square"]
    assert doc["image_index"] == [1, 2]
    np.testing.assert_array_equal(doc["images"][0], solid(RED))
    np.testing.assert_array_equal(doc["images"][1], solid(BLUE))


def test_image_text_jsonl_and_webdataset_tar(tmp_path):
  write_jsonl(str(tmp_path / "j" / "pairs.jsonl"), [good_pair(tmp_path / "j")])
  (pair,), counts = read("image_text", tmp_path / "j")
  assert counts == {} and pair["text"] == "two red circles"
  np.testing.assert_array_equal(pair["image"], solid(RED))
  os.makedirs(tmp_path / "t")
  with tarfile.open(tmp_path / "t" / "shard-00000.tar", "w") as tar:
    for key, data in (("k1.png", _png(solid(GREEN))), ("k1.txt", b"one green circle"),
                      ("k2.txt", b"no image for this one")):
      info = tarfile.TarInfo(key)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  (pair,), counts = read("image_text", tmp_path / "t")
  assert pair["text"] == "one green circle" and counts == {"missing_file": 1}
  np.testing.assert_array_equal(pair["image"], solid(GREEN))


def test_video_npy_and_frame_folder(tmp_path):
  clip = np.stack([solid((10 * t, 0, 0)) for t in range(6)])
  os.makedirs(tmp_path / "clips")
  np.save(tmp_path / "clips" / "c.npy", clip)
  for t, frame in enumerate(clip):
    save_png(frame, str(tmp_path / "frames" / "c" / f"{t:03d}.png"))
  write_jsonl(str(tmp_path / "clips.jsonl"), [
      {"video": "clips/c.npy", "fps": 2.0, "text": "a red circle moving up"},
      {"frames": "frames/c", "fps": 2.0, "text": "a red circle moving up"}])
  videos, counts = read("video_text", tmp_path)
  assert counts == {} and len(videos) == 2
  for video in videos:
    np.testing.assert_array_equal(video["frames"], clip)
    assert video["fps"] == 2.0


def _png(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


# One test per bad-input class: a good example beside the bad one, which is skipped and counted.

def _pairs_with(tmp_path, bad_record, setup=None):
  if setup:
    setup(tmp_path)
  write_jsonl(str(tmp_path / "pairs.jsonl"), [good_pair(tmp_path), bad_record])
  examples, counts = read("image_text", tmp_path)
  assert len(examples) == 1 and examples[0]["text"] == "two red circles"
  return counts


def test_bad_json_line_is_skipped(tmp_path):
  assert _pairs_with(tmp_path, '{"image": "good.png", "text": ') == {"invalid_json": 1}
  assert _pairs_with(tmp_path, {"img": "good.png"}) == {"invalid_json": 1}   # wrong keys


def test_missing_image_file_is_skipped(tmp_path):
  assert _pairs_with(tmp_path, {"image": "nowhere.png", "text": "x"}) == {"missing_file": 1}


def test_truncated_image_is_skipped(tmp_path):
  def setup(root):
    data = _png(solid(BLUE, 100, 100))
    with open(root / "cut.png", "wb") as f:
      f.write(data[:len(data) // 2])
    with open(root / "junk.jpg", "wb") as f:
      f.write(b"not an image at all")
  assert _pairs_with(tmp_path, {"image": "cut.png", "text": "x"}, setup) == {"unreadable_image": 1}
  assert _pairs_with(tmp_path, {"image": "junk.jpg", "text": "x"}, setup) == {"unreadable_image": 1}


def test_small_image_is_skipped(tmp_path):
  setup = lambda root: save_png(solid(BLUE, 63, 200), str(root / "small.png"))
  assert _pairs_with(tmp_path, {"image": "small.png", "text": "x"}, setup) == {"image_too_small": 1}


def test_extreme_aspect_ratio_is_skipped(tmp_path):
  setup = lambda root: save_png(solid(BLUE, 400, 130), str(root / "wide.png"))    # 3.08 : 1
  assert _pairs_with(tmp_path, {"image": "wide.png", "text": "x"}, setup) == {"bad_aspect_ratio": 1}


def test_empty_caption_is_skipped(tmp_path):
  assert _pairs_with(tmp_path, {"image": "good.png", "text": "  "}) == {"empty_text": 1}


def test_empty_document_and_document_without_images_are_skipped(tmp_path):
  save_png(solid(RED), str(tmp_path / "a.png"))
  save_png(solid(RED, 20, 20), str(tmp_path / "tiny.png"))
  write_jsonl(str(tmp_path / "docs.jsonl"), [
      {"content": [{"text": "two red circles"}, {"image": "a.png"}]},
      {"content": []},                                                # empty
      {"content": [{"text": "   "}]},                                 # empty after stripping
      {"content": [{"text": "only words"}]},                          # no image
      {"content": [{"text": "all images bad"}, {"image": "tiny.png"}, {"image": "gone.png"}]},
      {"content": [{"text": "one good of two"}, {"image": "gone.png"}, {"image": "a.png"}]},
  ])
  docs, counts = read("interleaved", tmp_path)
  assert [d["texts"] for d in docs] == [["two red circles"], ["one good of two"]]
  assert docs[1]["image_index"] == [1]
  # Dropped images are counted too (2 missing, 1 small), besides the dropped documents.
  assert counts == {"empty_document": 2, "no_image": 2, "missing_file": 2, "image_too_small": 1}


def test_empty_or_missing_video_is_skipped(tmp_path):
  os.makedirs(tmp_path / "clips")
  np.save(tmp_path / "clips" / "ok.npy", np.zeros((2, 64, 64, 3), np.uint8))
  np.save(tmp_path / "clips" / "empty.npy", np.zeros((0, 64, 64, 3), np.uint8))
  np.save(tmp_path / "clips" / "float.npy", np.zeros((2, 64, 64, 3), np.float32))
  os.makedirs(tmp_path / "frames" / "none")
  write_jsonl(str(tmp_path / "clips.jsonl"), [
      {"video": "clips/ok.npy", "fps": 1, "text": "a clip"},
      {"video": "clips/empty.npy", "fps": 1, "text": "a clip"},
      {"frames": "frames/none", "fps": 1, "text": "a clip"},
      {"video": "clips/float.npy", "fps": 1, "text": "a clip"},
      {"video": "clips/gone.npy", "fps": 1, "text": "a clip"},
      {"video": "clips/ok.npy", "fps": 0, "text": "a clip"},
  ])
  videos, counts = read("video_text", tmp_path)
  assert len(videos) == 1
  assert counts == {"empty_video": 2, "unreadable_image": 1, "missing_file": 1, "invalid_json": 1}


def test_source_without_usable_examples_is_an_error_naming_it(tmp_path):
  raw = tmp_path / "raw"
  write_jsonl(str(raw / "pairs.jsonl"), [{"image": "gone.png", "text": "x"}, "not json"])
  with pytest.raises(ValueError, match=f"image_text source '{raw}' has no usable example"):
    builders.prepare("image_text", str(raw), str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
    builders.prepare("video_text", str(tmp_path / "tfds"), str(tmp_path / "tfds2"))


def test_builder_records_skip_counts_in_metadata(tmp_path):
  raw = tmp_path / "raw"
  write_jsonl(str(raw / "pairs.jsonl"), [good_pair(raw), {"image": "gone.png", "text": "x"}])
  builder = builders.prepare("image_text", str(raw), str(tmp_path / "tfds"))
  assert builder.info.metadata["skipped"] == {"missing_file": 1}
  assert builder.info.splits["train"].num_examples == 1
  example = builder.as_data_source(split="train")[0]
  np.testing.assert_allclose(sources.decode_image(example["image"]), solid(RED), atol=3)  # JPEG
