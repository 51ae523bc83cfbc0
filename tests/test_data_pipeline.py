"""The input pipeline end to end: hand-written raw files -> TFDS -> batches (docs/design.md §4)."""

import copy
import os

import numpy as np
import pytest

from flamingo_jax.data import pipeline
from flamingo_jax.data import schema
from data_helpers import BLUE, RED, ids, save_png, solid, tokenizer, write_jsonl

BOS, EOS, IMG, EOC, PAD = "<s>", "</s>", "<image>", "<EOC>", "<pad>"


def make_config(tiny_config, tmp_path, streams: dict, **data):
  config = copy.deepcopy(tiny_config)
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.streams = streams
  config.data.update(data)
  return config


def stream(source, manual_dir, **kw):
  spec = dict(source=source, manual_dir=str(manual_dir), batch_size=1, weight=1.0,
              max_tokens=24, max_media=2, frames=1, frame_rate=1.0, resolution=64)
  spec.update(kw)
  return spec


def one_row(config, name):
  """Stream `name`'s first example, with every random draw coming out as configured."""
  pipe = pipeline.InputPipeline(config, prefetch=1, workers=1)
  try:
    batch = next(pipe)[name]
  finally:
    pipe.close()
  return {k: v[0] for k, v in batch.items()}


def expected_ids(tk, pieces, length):
  seq = ids(tk, *pieces)
  seq += [0] * (length + 1 - len(seq))
  return np.array(seq[:-1]), np.array(seq[1:])


def check_row(row, tk, pieces, length):
  inputs, targets = expected_ids(tk, pieces, length)
  np.testing.assert_array_equal(row["input_ids"], inputs)
  np.testing.assert_array_equal(row["target_ids"], targets)
  np.testing.assert_array_equal(row["loss_mask"], (targets != 0) & (targets != 4))


def write_doc(root):
  save_png(solid(RED), str(root / "red.png"))
  save_png(solid(BLUE), str(root / "blue.png"))
  write_jsonl(str(root / "docs.jsonl"), [{"content": [
      {"text": "a page about shapes."}, {"image": "red.png"}, {"text": "two red circles"},
      {"image": "blue.png"}, {"text": "one blue square"}]}])


@pytest.mark.parametrize("p_next", [0.0, 1.0])
def test_interleaved_document_exact_arrays(tiny_config, tmp_path, p_next):
  write_doc(tmp_path / "raw")
  config = make_config(tiny_config, tmp_path, {"m3w": stream("interleaved", tmp_path / "raw")},
                       p_next=p_next)
  row = one_row(config, "m3w")
  tk = tokenizer()
  if p_next:
    pieces = [BOS, IMG, "a", "▁page", "▁about", "▁shapes", ".", EOC, IMG, "two", "▁red",
              "▁circles", "▁one", "▁blue", "▁square", EOC, EOS]     # one chunk after image 1
  else:
    pieces = [BOS, "a", "▁page", "▁about", "▁shapes", ".", EOC, IMG, "two", "▁red",
              "▁circles", EOC, IMG, "one", "▁blue", "▁square", EOC, EOS]
  check_row(row, tk, pieces, 24)
  np.testing.assert_array_equal(row["media_mask"], [True, True])
  assert row["media"].shape == (2, 1, 64, 64, 3)
  # Slot 0 = the first image (red), slot 1 = the second (blue); JPEG-stored, so within 3.
  np.testing.assert_allclose(row["media"][0, 0], solid(RED, 64, 64), atol=3)
  np.testing.assert_allclose(row["media"][1, 0], solid(BLUE, 64, 64), atol=3)


def test_interleaved_window_and_media_padding(tiny_config, tmp_path):
  write_doc(tmp_path / "raw")
  # 18 tokens > window of 11 + 1: the window is random, at most 2 markers, padded slots.
  config = make_config(tiny_config, tmp_path, {"m3w": stream("interleaved", tmp_path / "raw",
                                                              max_tokens=11, max_media=3)},
                       p_next=0.0)
  row = one_row(config, "m3w")
  tk = tokenizer()
  full = ids(tk, BOS, "a", "▁page", "▁about", "▁shapes", ".", EOC, IMG, "two", "▁red",
             "▁circles", EOC, IMG, "one", "▁blue", "▁square", EOC, EOS)
  seq = list(row["input_ids"]) + [int(row["target_ids"][-1])]
  start = next(s for s in range(len(full) - 11) if full[s:s + 12] == seq)   # a real window
  markers = full[start:start + 12].count(4)
  np.testing.assert_array_equal(row["media_mask"], np.arange(3) < markers)
  assert not row["media"][markers:].any()


@pytest.mark.parametrize("leading", [0.0, 1.0])
def test_image_text_pair_exact_arrays(tiny_config, tmp_path, leading):
  raw = tmp_path / "raw"
  save_png(solid(RED, 120, 80), str(raw / "a.png"))          # 3:2, padded top and bottom
  write_jsonl(str(raw / "pairs.jsonl"), [{"image": "a.png", "text": "two red circles"}])
  config = make_config(tiny_config, tmp_path,
                       {"align": stream("image_text", raw, max_tokens=10, max_media=1)},
                       leading_space_prob=leading)
  row = one_row(config, "align")
  first = "▁two" if leading else "two"
  check_row(row, tokenizer(), [BOS, IMG, first, "▁red", "▁circles", EOC, EOS], 10)
  np.testing.assert_array_equal(row["media_mask"], [True])
  image = row["media"][0, 0]                                   # 120x80 -> 64x43, rows 10..52
  np.testing.assert_allclose(image[11:52], solid(RED, 64, 41), atol=3)
  np.testing.assert_array_equal(image[:10], np.broadcast_to([124, 116, 104], (10, 64, 3)))


def test_video_text_exact_arrays_and_frames_subsampled_when_built(tiny_config, tmp_path):
  raw = tmp_path / "raw"
  os.makedirs(raw / "clips")
  clip = np.stack([solid((20 * t, 0, 0), 64, 64) for t in range(10)])   # frame t: red = 20t
  np.save(raw / "clips" / "c.npy", clip)
  write_jsonl(str(raw / "clips.jsonl"),
              [{"video": "clips/c.npy", "fps": 2.0, "text": "a green circle moving up"}])
  config = make_config(tiny_config, tmp_path,
                       {"vtp": stream("video_text", raw, max_tokens=12, max_media=1, frames=4)},
                       leading_space_prob=0.0)
  config.data.streams.vtp.frame_rate = 1.0
  pipe = pipeline.InputPipeline(config, prefetch=1, workers=1)
  row = {k: v[0] for k, v in next(pipe)["vtp"].items()}
  # The dataset keeps the clip at the stream's 1 fps: frames 0, 2, 4, 6, 8.
  stored = pipe.streams["vtp"].source[0]
  assert len(stored["frames"]) == 5 and float(stored["fps"]) == 1.0
  pipe.close()
  check_row(row, tokenizer(), [BOS, IMG, "a", "▁green", "▁circle", "▁moving", "▁up", EOC, EOS], 12)
  assert row["media"].shape == (1, 4, 64, 64, 3)
  # 4 frames 1 s apart = every 2nd frame of the 2 fps clip, from a random start in [0, 1] s.
  reds = row["media"][0, :, 32, 32, 0].astype(int) // 20
  assert reds[0] in (0, 2) and list(np.diff(reds)) == [2, 2, 2], reds
  # A faster frame rate than the dataset kept needs a new build: said, not silently wrong.
  config.data.streams.vtp.frame_rate = 2.0
  with pytest.raises(ValueError, match="keeps frames at 1 fps, but frame_rate is 2"):
    pipeline.InputPipeline(config)


def test_subsampled_frames_by_hand():
  from flamingo_jax.data import builders
  assert builders.subsampled_frames(10, 2.0, 1.0) == [0, 2, 4, 6, 8]
  assert builders.subsampled_frames(7, 3.0, 1.0) == [0, 3, 6]
  assert builders.subsampled_frames(10, 25.0, 3.0) == [0, 8]          # 0 s and 1/3 s
  assert builders.subsampled_frames(1, 30.0, 1.0) == [0]


@pytest.mark.slow
def test_p_next_and_leading_space_rates(tiny_config, tmp_path):
  write_doc(tmp_path / "docs")
  raw = tmp_path / "pairs"
  save_png(solid(RED), str(raw / "a.png"))
  write_jsonl(str(raw / "pairs.jsonl"), [{"image": "a.png", "text": "two red circles"}])
  config = make_config(tiny_config, tmp_path, {
      "m3w": stream("interleaved", tmp_path / "docs", batch_size=500),
      "align": stream("image_text", raw, batch_size=500, max_tokens=10)})
  pipe = pipeline.InputPipeline(config, prefetch=1)
  tk = tokenizer()
  nexts, leads = [], []
  for _ in range(20):                                           # 10k samples each
    batch = next(pipe)
    nexts.append(batch["m3w"]["input_ids"][:, 1] == 4)          # <BOS><image>: markers moved
    leads.append(batch["align"]["input_ids"][:, 2] == tk.piece_to_id("▁two"))
  pipe.close()
  assert abs(np.mean(nexts) - 0.5) < 0.02, np.mean(nexts)
  assert abs(np.mean(leads) - 0.5) < 0.02, np.mean(leads)


def synthetic_config(tiny_config, tmp_path, examples=40, batch=8):
  config = copy.deepcopy(tiny_config)
  config.data.data_dir = str(tmp_path / "data")
  config.data.synthetic_examples = examples
  for spec in config.data.streams.values():
    spec.batch_size = batch
  return config


def test_data_shards_read_disjoint_examples_and_any_process_split_gives_one_batch(
    tiny_config, tmp_path):
  config = synthetic_config(tiny_config, tmp_path, examples=40, batch=4)
  # 4 data shards fed by two processes of two shards each, and by a third that shares
  # shards 1 and 2 with them (a model group spanning hosts).
  pipes = {shards: pipeline.InputPipeline(config, shards=shards, num_shards=4, prefetch=1)
           for shards in [(0, 1), (2, 3), (1, 2)]}
  whole = pipeline.InputPipeline(config, shards=(0, 1, 2, 3), num_shards=4, prefetch=1)
  for name in config.data.streams:
    stream = whole.streams[name]
    seen = [[stream.example_index(d, k) for k in range(10)] for d in range(4)]
    assert sorted(sum(seen, [])) == list(range(40))        # disjoint, covering the split
  batches = {shards: [next(pipe) for _ in range(3)] for shards, pipe in pipes.items()}
  batches_whole = [next(whole) for _ in range(3)]
  for step in range(3):
    for name in config.data.streams:
      for key, rows in batches_whole[step][name].items():
        # 1 row per shard: process (0, 1) holds rows 0-1, (2, 3) rows 2-3, (1, 2) rows 1-2.
        np.testing.assert_array_equal(batches[(0, 1)][step][name][key], rows[0:2])
        np.testing.assert_array_equal(batches[(2, 3)][step][name][key], rows[2:4])
        np.testing.assert_array_equal(batches[(1, 2)][step][name][key], rows[1:3])
  # The rows are the examples the shards index.
  source, tk = whole.streams["align"].source, tokenizer()
  for d in range(4):
    caption = source[whole.streams["align"].example_index(d, 0)]["text"].decode()
    assert caption in tk.decode(batches_whole[0]["align"]["input_ids"][d])
  # The states of the processes merge into the whole pipeline's; any split resumes from it.
  merged = pipeline.merge_states([pipe.state() for pipe in pipes.values()])
  assert merged == whole.state()
  resumed = pipeline.InputPipeline(config, shards=(3,), num_shards=4, prefetch=1)
  resumed.restore(merged)
  np.testing.assert_array_equal(next(resumed)["m3w"]["input_ids"],
                                next(whole)["m3w"]["input_ids"][3:4])
  with pytest.raises(ValueError, match="iterator state is for 4 data shards, this pipeline has 2"):
    pipeline.InputPipeline(config, shards=(0,), num_shards=2, prefetch=1).restore(merged)
  for pipe in [*pipes.values(), whole, resumed]:
    pipe.close()


@pytest.mark.slow
def test_restored_iterator_repeats_the_next_100_batches(tiny_config, tmp_path):
  # 40 examples, 8 per batch: an epoch every 5 batches, so the 100 cross 20 epochs.
  config = synthetic_config(tiny_config, tmp_path, examples=40, batch=8)
  pipe = pipeline.InputPipeline(config)
  for _ in range(7):                                            # mid-epoch (epoch 1, batch 2)
    next(pipe)
  state = pipe.state()
  expected = [next(pipe) for _ in range(100)]
  pipe.close()
  restored = pipeline.InputPipeline(config)
  restored.restore(state)
  for i, want in enumerate(expected):
    got = next(restored)
    for name in want:
      for key in want[name]:
        np.testing.assert_array_equal(got[name][key], want[name][key], err_msg=f"{i} {name} {key}")
  restored.close()


@pytest.mark.slow
def test_worker_processes_give_the_batches_of_threads_and_resume_alike(tiny_config, tmp_path):
  """grain worker processes make the same batches as threads of this process, including
  across an epoch boundary and after a restore into a pipeline with other workers."""
  config = synthetic_config(tiny_config, tmp_path, examples=20, batch=8)
  with pipeline.InputPipeline(config, workers=0) as threads:
    expected = [next(threads) for _ in range(5)]                # 40 examples: 2 epochs
  with pipeline.InputPipeline(config, workers=2) as processes:
    got = [next(processes) for _ in range(3)]
    state = processes.state()
  with pipeline.InputPipeline(config, workers=3) as resumed:
    resumed.restore(state)
    got += [next(resumed) for _ in range(2)]
  for i, (want, have) in enumerate(zip(expected, got)):
    for name in want:
      for key in want[name]:
        np.testing.assert_array_equal(have[name][key], want[name][key], err_msg=f"{i} {name} {key}")


def test_same_seed_same_batches_other_seed_other_batches(tiny_config, tmp_path):
  config = synthetic_config(tiny_config, tmp_path)
  first = [next(p) for p in [pipeline.InputPipeline(config)] for _ in range(2)]
  again = [next(p) for p in [pipeline.InputPipeline(config)] for _ in range(2)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["m3w"]["input_ids"], b["m3w"]["input_ids"])
  config.seed = 1
  other = next(pipeline.InputPipeline(config))
  assert not np.array_equal(other["m3w"]["input_ids"], first[0]["m3w"]["input_ids"])


def test_batches_match_the_schema_and_truncate_long_captions(tiny_config, tmp_path):
  raw = tmp_path / "raw"
  save_png(solid(RED), str(raw / "a.png"))
  long_caption = " ".join(["two red circles"] * 5)
  write_jsonl(str(raw / "pairs.jsonl"), [{"image": "a.png", "text": "two red circles"},
                                         {"image": "a.png", "text": long_caption},
                                         {"image": "gone.png", "text": "x"}])
  config = make_config(tiny_config, tmp_path,
                       {"align": stream("image_text", raw, batch_size=4, max_tokens=10)})
  pipe = pipeline.InputPipeline(config)
  batch = next(pipe)["align"]
  shapes = schema.stream_shapes(config.data.streams.align, config.model.image_size)
  for key, shape in shapes.items():
    assert batch[key].shape == shape.shape and batch[key].dtype == shape.dtype, key
  # Both captions are used; the long one cut to the 10 + 1 tokens (its end markers too).
  texts = [tokenizer().decode(r) for r in batch["input_ids"]]
  assert any(t.count("two") > 1 for t in texts) and any(t.count("two") == 1 for t in texts)
  long_rows = [r for r, t in zip(batch["loss_mask"], texts) if t.count("two") > 1]
  assert all(r.sum() == 10 - 1 for r in long_rows)      # every target real but the <image>
  assert pipe.skipped()["align"] == {"missing_file": 1}
  pipe.close()


def test_augmentation_draws_once_per_clip(tiny_config):
  """Flip and colour jitter on: the frames of one clip change together (a per-frame draw
  would make it flicker), and different clips get different draws."""
  from flamingo_jax.data import builders  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(tiny_config)
  config.data.augment.flip = True
  config.data.augment.color_jitter = 0.4
  frame = np.zeros((64, 64, 3), np.uint8)
  frame[:, :32] = (200, 40, 40)                     # left half red, right half blue
  frame[:, 32:] = (40, 40, 200)
  raw = {"frames": [builders.encode_image(frame)] * 8, "fps": 1.0, "text": "a clip"}
  spec = config.data.streams.vtp
  outputs = []
  for seed in range(6):
    row = pipeline.process_example("video_text", raw, spec, config.data, tokenizer(),
                                   config.model.image_size, np.random.default_rng(seed))
    clip = row["media"][0, :int(spec.frames)]
    for f in range(1, len(clip)):
      np.testing.assert_array_equal(clip[f], clip[0])
    outputs.append(clip[0])
  assert len({o.tobytes() for o in outputs}) == len(outputs)
  flipped = [o[32, 8, 2] > o[32, 8, 0] for o in outputs]     # blue on the left: flipped
  assert any(flipped) and not all(flipped)


@pytest.mark.parametrize("name", ["flamingo_3b", "flamingo_9b", "flamingo_80b"])
def test_paper_configs_augment_and_decode_in_worker_processes_and_tiny_does_not(
    name, tiny_config):
  from conftest import config_path  # pylint: disable=g-import-not-at-top
  from flamingo_jax import config_base  # pylint: disable=g-import-not-at-top
  data = config_base.load_config(config_path(name)).data
  assert data.augment.flip and data.augment.color_jitter > 0 and data.workers == -1
  assert not tiny_config.data.augment.flip and tiny_config.data.augment.color_jitter == 0
  assert tiny_config.data.workers == 0
