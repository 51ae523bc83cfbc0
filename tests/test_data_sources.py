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
  assert counts == {"empty_video": 2, "unreadable_image": 1, "missing_file": 1, "invalid_field": 1}


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


# -- every field type-checked: each bad record a counted skip with file and line ------------

def _write_lines(path, lines: list[bytes]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")


def test_bad_mmc4_records_drop_the_image_or_document_and_are_counted_with_file_and_line(tmp_path):
  save_png(solid(RED), str(tmp_path / "a.png"))
  texts = ["first", "second"]
  good = {"text_list": texts, "image_info": [{"image_name": "a.png", "matched_text_index": 1}]}
  bad_index = [None, "1", 1.5, True, -1, 2]          # null, string, float, bool, out of range
  records = [good] + [
      {"text_list": texts, "image_info": [{"image_name": "a.png", "matched_text_index": i},
                                          {"image_name": "a.png", "matched_text_index": 0}]}
      for i in bad_index] + [
      {"text_list": texts, "image_info": [{"image_name": 7, "matched_text_index": 0}]},
      {"text_list": "not a list", "image_info": []},
      {"content": [{"text": "x"}, {"image": ["a.png"]}, {"image": "a.png"}]},
      {"content": [{"text": "x", "image": "a.png"}]},
      {"content": [5]},
  ]
  write_jsonl(str(tmp_path / "docs.jsonl"), records)
  counts, log = collections.Counter(), []
  docs = [d for _, d in sources.read_source("interleaved", str(tmp_path), counts, log)]
  # The good one, the six whose other image survives, and the content one with a good image.
  assert len(docs) == 1 + len(bad_index) + 1
  assert [d["image_index"] for d in docs[1:7]] == [[0]] * 6
  # Bad indices and the bad name drop their image (the name's document then has none).
  assert dict(counts) == {"invalid_field": len(bad_index) + 1 + 1 + 1 + 1 + 1, "no_image": 1}
  assert log[0].startswith("docs.jsonl:2: invalid_field: matched_text_index is None")
  assert any(line.startswith("docs.jsonl:8: invalid_field: image_name is 7") for line in log)
  assert any(line.startswith("docs.jsonl:12: invalid_field: entry") for line in log)


def test_bad_video_fields_are_counted_and_never_reach_training(tmp_path):
  os.makedirs(tmp_path / "clips")
  np.save(tmp_path / "clips" / "ok.npy", np.zeros((4, 64, 64, 3), np.uint8))
  lines = [b'{"video": "clips/ok.npy", "fps": 25.0, "text": "a clip"}',
           b'{"video": "clips/ok.npy", "fps": NaN, "text": "a clip"}',       # json allows NaN
           b'{"video": "clips/ok.npy", "fps": 1e300, "text": "a clip"}',
           b'{"video": "clips/ok.npy", "fps": Infinity, "text": "a clip"}',
           b'{"video": "clips/ok.npy", "fps": "25", "text": "a clip"}',
           b'{"video": "clips/ok.npy", "fps": true, "text": "a clip"}',
           b'{"video": "clips/ok.npy", "fps": -3, "text": "a clip"}',
           b'{"video": 3, "fps": 25, "text": "a clip"}',
           b'{"video": "clips/ok.npy", "fps": 25, "text": 3}']
  _write_lines(str(tmp_path / "clips.jsonl"), lines)
  counts, log = collections.Counter(), []
  videos = [v for _, v in sources.read_source("video_text", str(tmp_path), counts, log)]
  assert len(videos) == 1 and videos[0]["fps"] == 25.0
  assert dict(counts) == {"invalid_field": 8}
  assert [line.split(":")[1] for line in log] == [str(i) for i in range(2, 10)]


def test_invalid_utf8_is_an_invalid_text_skip_in_every_format(tmp_path):
  pair = good_pair(tmp_path)
  _write_lines(str(tmp_path / "pairs.jsonl"), [
      json_bytes(pair),
      b'{"image": "good.png", "text": "caf\xe9 au lait"}',                  # Latin-1 byte
      b'{"image": "good.png", "text": "lone \\udc80 surrogate"}'])          # escaped, invalid
  with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
    for name, data in (("k1.png", png_bytes(solid(RED))), ("k1.txt", b"fine caption"),
                       ("k2.png", png_bytes(solid(RED))), ("k2.txt", b"bad \xff\xfe text")):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  examples, counts = read("image_text", tmp_path)
  assert sorted(e["text"] for e in examples) == ["fine caption", "two red circles"]
  assert counts == {"invalid_text": 3}
  docs_dir = tmp_path / "docs"
  _write_lines(str(docs_dir / "docs.jsonl"), [b'{"content": [{"text": "\xc3"}]}'])
  assert read("interleaved", docs_dir)[1] == {"invalid_text": 1}


def test_a_build_over_every_bad_record_kind_does_not_raise_and_counts_each(tmp_path, capsys):
  raw = tmp_path / "raw"
  save_png(solid(RED), str(raw / "good.png"))
  save_png(solid(RED, 40, 40), str(raw / "small.png"))
  save_png(solid(RED, 300, 80), str(raw / "wide.png"))
  with open(raw / "truncated.png", "wb") as f:
    f.write(png_bytes(solid(RED))[:60])
  good = b'{"image": "good.png", "text": "two red circles"}'
  _write_lines(str(raw / "pairs.jsonl"), [
      good,
      b'{"image": "good.png", "text": ',                        # invalid_json
      b'{"image": 5, "text": "x"}',                             # invalid_field
      b'{"image": "good.png", "text": "\xff"}',                 # invalid_text
      b'{"image": "gone.png", "text": "x"}',                    # missing_file
      b'{"image": "truncated.png", "text": "x"}',               # unreadable_image
      b'{"image": "small.png", "text": "x"}',                   # image_too_small
      b'{"image": "wide.png", "text": "x"}',                    # bad_aspect_ratio
      b'{"image": "good.png", "text": "   "}'])                 # empty_text
  builder = builders.prepare("image_text", str(raw), str(tmp_path / "tfds"))
  expected = {reason: 1 for reason in ("invalid_json", "invalid_field", "invalid_text",
                                        "missing_file", "unreadable_image", "image_too_small",
                                        "bad_aspect_ratio", "empty_text")}
  assert builder.info.metadata["skipped"] == expected
  assert builder.info.splits["train"].num_examples == 1
  assert len(builder.info.metadata["skip_log"]) == 8
  assert builder.info.metadata["skip_log"][0].startswith("pairs.jsonl:2: invalid_json")
  table = capsys.readouterr().out
  assert "1 usable examples" in table
  for reason in expected:
    assert f"skipped {reason}" in table


# -- images decode as they look --------------------------------------------------------------

def json_bytes(record) -> bytes:
  import json  # pylint: disable=g-import-not-at-top
  return json.dumps(record).encode()


def png_bytes(array_or_image, **save_args) -> bytes:
  image = (array_or_image if isinstance(array_or_image, Image.Image)
           else Image.fromarray(array_or_image))
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", **save_args)
  return buffer.getvalue()


def test_exif_orientation_is_applied():
  # 2 x 3 image, stored unrotated, tagged "rotate 90° clockwise to display" (orientation 6).
  stored = np.zeros((2, 3, 3), np.uint8)
  stored[0, 0] = (255, 0, 0)                           # top-left red
  exif = Image.Exif()
  exif[0x0112] = 6
  decoded = sources.decode_image(png_bytes(stored, exif=exif.tobytes()))
  assert decoded.shape == (3, 2, 3)                    # displayed: 3 rows, 2 columns
  np.testing.assert_array_equal(decoded, np.rot90(stored, k=-1))
  assert tuple(decoded[0, 1]) == (255, 0, 0)           # top-left went to top-right


def test_alpha_is_composited_over_the_padding_colour():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (200, 100, 0, 255)                      # opaque
  rgba[0, 1] = (200, 100, 0, 0)                        # transparent
  rgba[1, 0] = (200, 100, 0, 128)                      # half
  rgba[1, 1] = (0, 0, 0, 0)
  decoded = sources.decode_image(png_bytes(rgba))
  pad = sources.PAD_RGB.astype(np.float64)
  half = np.round((np.array([200, 100, 0]) * 128 + pad * 127) / 255)
  np.testing.assert_array_equal(decoded[0, 0], [200, 100, 0])
  np.testing.assert_array_equal(decoded[0, 1], sources.PAD_RGB)
  np.testing.assert_allclose(decoded[1, 0], half, atol=1)
  np.testing.assert_array_equal(decoded[1, 1], sources.PAD_RGB)
  # Greyscale + alpha, and a palette with a transparent index.
  la = Image.fromarray(np.array([[[10, 255], [10, 0]]], np.uint8), mode="LA")
  np.testing.assert_array_equal(sources.decode_image(png_bytes(la))[0],
                                [[10, 10, 10], sources.PAD_RGB])
  palette = Image.new("P", (2, 1))
  palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
  palette.putpixel((0, 0), 0)
  palette.putpixel((1, 0), 1)
  np.testing.assert_array_equal(sources.decode_image(png_bytes(palette, transparency=1))[0],
                                [[255, 0, 0], sources.PAD_RGB])


def test_sixteen_bit_and_palette_images_convert_properly():
  values = np.array([[0, 257, 32896], [65535, 1000, 65280]], np.uint16)
  image16 = Image.fromarray(values)
  data = png_bytes(image16)
  assert Image.open(io.BytesIO(data)).mode.startswith("I")   # stored as 16-bit
  decoded = sources.decode_image(data)
  expected = np.round(values / 257).astype(np.uint8)          # 0, 1, 128, 255, 4, 254
  np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, axis=-1))
  palette = Image.new("P", (3, 1))
  palette.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
  for x in range(3):
    palette.putpixel((x, 0), x)
  np.testing.assert_array_equal(sources.decode_image(png_bytes(palette))[0],
                                [[255, 0, 0], [0, 255, 0], [10, 20, 30]])


def test_large_jpegs_decode_at_a_reduced_scale_that_covers_the_fitted_size():
  from flamingo_jax.data import preprocessing  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[0:800, 0:1200]
  image = np.stack([x // 5 % 256, y // 4 % 256, (x + y) // 7 % 256], -1).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  full = sources.decode_image(buffer.getvalue())
  assert full.shape == (800, 1200, 3)
  # Fitted into 320: 320 x 213 is covered by the 1/2 scale (600 x 400), not by 1/4.
  assert sources.decode_image(buffer.getvalue(), fit=320).shape == (400, 600, 3)
  assert sources.decode_image(buffer.getvalue(), fit=200).shape == (200, 300, 3)   # 1/4
  assert sources.decode_image(buffer.getvalue(), fit=140).shape == (100, 150, 3)   # 1/8
  assert sources.decode_image(buffer.getvalue(), fit=700).shape == (800, 1200, 3)  # no gain
  # After the resize the model sees almost the same pixels.
  reduced = preprocessing.resize_and_pad(sources.decode_image(buffer.getvalue(), fit=320), 320)
  reference = preprocessing.resize_and_pad(full, 320)
  assert np.abs(reduced.astype(float) - reference).mean() < 0.5
  # PNG (no DCT scales) decodes whole.
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG")
  assert sources.decode_image(png.getvalue(), fit=320).shape == (800, 1200, 3)


def test_plain_jpeg_sources_are_stored_as_they_are(tmp_path):
  y, x = np.mgrid[0:96, 0:128]
  pixels = np.stack([x * 2, y * 2, x + y], -1).astype(np.uint8)
  plain, rotated, png = (str(tmp_path / n) for n in ("plain.jpg", "rotated.jpg", "image.png"))
  Image.fromarray(pixels).save(plain, quality=90)
  exif = Image.Exif()
  exif[0x0112] = 6                                   # stored sideways, shown rotated
  Image.fromarray(pixels).save(rotated, quality=90, exif=exif)
  Image.fromarray(pixels).save(png)
  with open(plain, "rb") as f:
    assert builders.encode_image(sources.read_image(plain)) == f.read()   # the file itself
  upright = sources.read_image(rotated)
  assert upright.shape == (128, 96, 3) and sources.source_bytes(upright) is None
  for path in (rotated, png):                        # pixels changed or not a JPEG: encoded
    stored = builders.encode_image(sources.read_image(path))
    assert Image.open(io.BytesIO(stored)).format == "JPEG"
  # Pixels derived from a kept JPEG are not that JPEG any more.
  image = sources.read_image(plain)
  assert sources.source_bytes(image[:, ::-1]) is None and sources.source_bytes(image + 1) is None
