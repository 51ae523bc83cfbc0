"""Task loaders on a handful of items written in each benchmark's official file format
(tests/data/eval_tasks), with the image files made here."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from flamingo_jax.data import synthetic
from flamingo_jax.evaluation import prompts
from flamingo_jax.evaluation import tasks

FIXTURES = os.path.join(REPO, "tests", "data", "eval_tasks")
IMAGES = {
    "coco": ["train2014/COCO_train2014_000000000011.jpg", "val2014/COCO_val2014_000000000012.jpg",
             "val2014/COCO_val2014_000000000014.jpg"],          # 15 (a test image) is missing
    "flickr30k": ["flickr30k-images/100.jpg", "flickr30k-images/200.jpg"],
    "vqav2": ["train2014/COCO_train2014_000000000021.jpg", "val2014/COCO_val2014_000000000022.jpg",
              "val2014/COCO_val2014_000000000023.jpg"],
    "textvqa": ["train_images/a0001.jpg", "train_images/b0002.jpg"],
    "vizwiz": ["train/VizWiz_train_00000001.jpg", "val/VizWiz_val_00000002.jpg"],
    "hateful_memes": ["img/42953.png", "img/23058.png", "img/08291.png"],
    "imagenet": ["train/n01440764/a.JPEG", "train/n01443537/b.JPEG", "val/n01440764/c.JPEG",
                 "val/n01443537/d.JPEG", "val/n01443537/notes.txt"],
}
IMAGES["okvqa"] = IMAGES["vqav2"]
# Clips: "<name>.npy" files or frame folders "<name>/" (made here, 3 frames).
CLIPS = {
    "msvd_qa": ["videos/vid1.npy", "videos/vid1201/", "videos/vid1202.npy"],
    "msrvtt_qa": ["videos/video0/", "videos/video7010.npy"],          # video7011 is missing
    "vatex": ["videos/Ptf_2VRj-V0_000122_000132.npy", "videos/G9zN5TTuGO4_000179_000189/"],
    "youcook2": ["videos/GLd3aX16zBg_0.npy", "videos/GLd3aX16zBg_1.npy", "videos/xHr8X2Wpmno_0/"],
}


def task_dir(tmp_path, name):
  root = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), root)
  for relative in IMAGES.get(name, []):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path, format="PNG")
  for relative in CLIPS.get(name, []):
    path = root / relative
    frames = np.random.default_rng(0).integers(0, 256, (3, 24, 32, 3)).astype(np.uint8)
    if relative.endswith("/"):
      path.mkdir(parents=True)
      for t, frame in enumerate(frames):
        Image.fromarray(frame).save(path / f"{t:05d}.png")
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.save(path, frames)
  return str(root)


def test_every_task_is_registered_with_a_known_mode_and_metric():
  assert tasks.names() == ["attributes", "coco", "flickr30k", "hateful_memes", "imagenet",
                           "msrvtt_qa", "msvd_qa", "naming", "okvqa", "textvqa", "vatex",
                           "vizwiz", "vqav2", "youcook2"]
  for name in tasks.names():
    task = tasks.get(name)
    assert task.metric in ("cider", "vqa", "roc_auc", "top1") and task.mode in ("generate",
                                                                                  "score")
  with pytest.raises(ValueError, match="unknown task 'vqa3'; known: attributes, coco"):
    tasks.get("vqa3")


def test_karpathy_captions(tmp_path):
  root = task_dir(tmp_path, "coco")
  split = tasks.get("coco").load(root)
  assert [e.id for e in split.support] == ["11", "12"]              # train + restval
  assert [e.id for e in split.queries] == ["14"]                    # test; 15's image missing
  assert split.skipped == {"missing_image": 1}
  assert split.queries[0].references == ["A green triangle.", "One green triangle."]
  assert split.queries[0].media == os.path.join(root, "val2014", "COCO_val2014_000000000014.jpg")
  flickr = tasks.get("flickr30k").load(task_dir(tmp_path, "flickr30k"))
  assert [e.references for e in flickr.queries] == [["A cat sits.", "A cat."]]
  assert prompts.build(prompts.CAPTION, flickr.support, flickr.queries[0]).text == \
      "<image>Output: A dog runs.<EOC><image>Output:"


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_coco_vqa_official_files(tmp_path, name):
  root = task_dir(tmp_path, name)
  split = tasks.get(name).load(root)
  assert [(e.id, e.fields["question"]) for e in split.queries] == [("2", "How many?"),
                                                                   ("3", "What shape?")]
  assert split.queries[0].references == ["2"] * 6 + ["two"] * 4
  assert split.queries[0].media == os.path.join(root, "val2014", "COCO_val2014_000000000022.jpg")
  assert [e.id for e in split.support] == ["1"] and split.skipped == {}


def test_textvqa_and_vizwiz(tmp_path):
  text = tasks.get("textvqa").load(task_dir(tmp_path, "textvqa"))
  assert text.queries[0].fields == {"question": "what brand is it?"}
  assert text.queries[0].references == ["coca cola"] * 7 + ["coke"] * 3
  assert text.queries[0].media.endswith(os.path.join("train_images", "b0002.jpg"))
  wiz = tasks.get("vizwiz").load(task_dir(tmp_path, "vizwiz"))
  assert wiz.queries[0].id == "VizWiz_val_00000002.jpg"
  assert wiz.queries[0].references == ["blue"] * 8 + ["unanswerable"] * 2


def test_close_ended_tasks(tmp_path):
  memes = tasks.get("hateful_memes").load(task_dir(tmp_path, "hateful_memes"))
  assert memes.candidates == ("yes", "no")
  assert [(e.id, e.references) for e in memes.support] == [("42953", ["no"]), ("23058", ["yes"])]
  assert prompts.build(prompts.HATEFUL_MEMES, [], memes.queries[0]).text == \
      '<image>is an image with written: "white people is this a joke" on it. Is it hateful? Answer:'
  folder = tasks.get("imagenet").load(task_dir(tmp_path, "imagenet"))
  assert folder.candidates == ("tench", "goldfish")
  assert [(e.id, e.references) for e in folder.queries] == [("n01440764/c.JPEG", ["tench"]),
                                                            ("n01443537/d.JPEG", ["goldfish"])]


def test_bad_task_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"annotation file .*v2_OpenEnded_mscoco_train2014_"
                                              r"questions.json is missing"):
    tasks.get("vqav2").load(str(tmp_path))
  root = task_dir(tmp_path, "coco")
  with open(os.path.join(root, "dataset_coco.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=r"dataset_coco.json is not valid JSON"):
    tasks.get("coco").load(root)
  root = task_dir(tmp_path, "imagenet")
  shutil.rmtree(os.path.join(root, "val", "n01443537"))
  with pytest.raises(FileNotFoundError, match=r"class folder .*val/n01443537 is missing"):
    tasks.get("imagenet").load(root)


def test_video_tasks_read_clips_as_npy_or_frame_folders(tmp_path):
  root = task_dir(tmp_path, "msvd_qa")
  split = tasks.get("msvd_qa").load(root)
  assert tasks.get("msvd_qa").modality == "video"
  assert [(e.id, e.fields["question"], e.references) for e in split.queries] == [
      ("30933", "what is running across the yard?", ["dog"]),
      ("30934", "what is the dog doing?", ["run"]), ("30935", "who is cooking?", ["woman"])]
  assert split.queries[0].media == os.path.join(root, "videos", "vid1201")          # a folder
  assert split.queries[2].media == os.path.join(root, "videos", "vid1202.npy")
  assert [e.id for e in split.support] == ["0", "1"]
  msrvtt = tasks.get("msrvtt_qa").load(task_dir(tmp_path, "msrvtt_qa"))
  assert [e.id for e in msrvtt.queries] == ["158581"] and msrvtt.skipped == {"missing_image": 1}
  vatex = tasks.get("vatex").load(task_dir(tmp_path, "vatex"))
  assert vatex.queries[0].references == ["A woman is slicing a cucumber in a kitchen.",
                                         "Someone cuts vegetables on a board."]
  assert vatex.support[0].references[1] == "A person plays an acoustic guitar."
  assert vatex.skipped == {"missing_image": 1}
  cook = tasks.get("youcook2").load(task_dir(tmp_path, "youcook2"))
  assert [(e.id, e.references) for e in cook.support] == [
      ("GLd3aX16zBg_0", ["spread margarine on two slices of white bread"]),
      ("GLd3aX16zBg_1", ["place a slice of cheese on the bread"])]
  assert [(e.id, e.references) for e in cook.queries] == [("xHr8X2Wpmno_0", ["add oil to the pan"])]
  assert prompts.build(prompts.CAPTION, cook.support[:1], cook.queries[0]).text == \
      "<image>Output: spread margarine on two slices of white bread<EOC><image>Output:"


def test_naming_task_binds_words_to_shapes(tmp_path):
  synthetic.write_naming_task(str(tmp_path), seed=3, support=6, queries=9, size=32,
                              attribute="colour")
  split = tasks.get("naming").load(str(tmp_path))
  assert len(split.support) == 6 and len(split.queries) == 9 and len(split.candidates) == 3
  with open(tmp_path / "naming.json") as f:
    spec = __import__("json").load(f)
  assert sorted(spec["names"].values()) == list(split.candidates)
  assert spec["attribute"] == "colour" and len(spec["names"]) == 3
  for example, row in zip(split.queries, spec["queries"]):
    assert example.references == [spec["names"][row["value"]]]
    # The scene's pixels are of the bound colour (the background is near-white).
    pixels = np.asarray(Image.open(os.path.join(str(tmp_path), row["image"])))
    assert (np.abs(pixels.astype(int) - synthetic.COLOURS[row["value"]]).sum(-1) < 30).any()
  assert prompts.build(prompts.NAMING, split.support[:1], split.queries[0]).text == \
      f"<image>this is a {split.support[0].references[0]}.<EOC><image>this is a"


def test_attributes_task_asks_one_attribute_among_all_values(tmp_path):
  synthetic.write_attribute_task(str(tmp_path), seed=4, attribute="count", support=5, queries=7,
                                 size=64)
  split = tasks.get("attributes").load(str(tmp_path))
  assert len(split.candidates) == 11 and set(synthetic.COUNT_WORDS) <= set(split.candidates)
  assert {e.references[0] for e in split.queries + split.support} <= set(synthetic.COUNT_WORDS)
  assert prompts.build(prompts.ATTRIBUTE, split.support[:1], split.queries[0]).text == \
      f"<image>this is {split.support[0].references[0]}.<EOC><image>this is"
  with pytest.raises(ValueError, match="attribute 'size'"):
    synthetic.write_attribute_task(str(tmp_path), seed=4, attribute="size")
