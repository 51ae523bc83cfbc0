"""Benchmark tasks: each reads its official files from a local directory (no downloads).

    task = tasks.get("vqav2")
    split = task.load("/data/vqav2")          # Split(support, queries, candidates, skipped)
    split.queries[0]                          # prompts.Example: media = image path,
                                              # fields {"question"}, references = 10 answers

A task is one registry entry: how to load, the prompt format (docs/paper.md §6), the decoding mode
("generate": open-ended, beam search; "score": rank `candidates` by log-likelihood) and the
metric (metrics.py). Support examples come from the training split, queries from the
evaluation split. An item whose image file is missing is skipped and counted
(`split.skipped`); a missing annotation file is an error naming it.

Files each task expects under its directory (the official names):

| task | files |
|---|---|
| coco | `dataset_coco.json` (Karpathy splits), images at `<filepath>/<filename>` |
| flickr30k | `dataset_flickr30k.json` (Karpathy splits), images in `flickr30k-images/` |
| vqav2 | `v2_OpenEnded_mscoco_{train,val}2014_questions.json`, `v2_mscoco_{train,val}2014_annotations.json`, `{train,val}2014/COCO_{split}2014_<id:012>.jpg` |
| okvqa | `OpenEnded_mscoco_{train,val}2014_questions.json`, `mscoco_{train,val}2014_annotations.json`, COCO images as vqav2 |
| textvqa | `TextVQA_0.5.1_{train,val}.json`, `train_images/<image_id>.jpg` |
| vizwiz | `{train,val}.json` (Annotations), images in `train/`, `val/` |
| hateful_memes | `train.jsonl`, `dev_seen.jsonl` (`img` paths relative to the directory) |
| imagenet | `classnames.txt` (`<folder> <class name>` per line), `train/<folder>/*`, `val/<folder>/*` |
| msvd_qa | `train_qa.json`, `test_qa.json` (rows `{id, video_id, question, answer}`), clips `videos/vid<video_id>` |
| msrvtt_qa | `train_qa.json`, `test_qa.json` (as msvd_qa), clips `videos/video<video_id>` |
| vatex | `vatex_training_v1.0.json`, `vatex_validation_v1.0.json` (rows `{videoID, enCap}`), clips `videos/<videoID>` |
| youcook2 | `youcookii_annotations_trainval.json` (`database`: per video its subset and segments), clips `videos/<video>_<segment id>` |
| naming | `naming.json` (data/synthetic.py `write_naming_task`: made-up words bound in context) |
| attributes | `attributes.json` (data/synthetic.py `write_attribute_task`: the few-shot demo's task) |

A clip is a folder of frames or a `.npy` uint8 [T, H, W, 3] (`<name>.npy`, else the folder
`<name>`): videos are decoded to frames beforehand (e.g. `ffmpeg -i v.mp4 -r 3 d/%05d.jpg`),
so evaluation needs no video codec.

Adding a task: a loader `data_dir -> Split` and one `register(Task(...))` line (WORKSPACE.md).
"""

import dataclasses
import json
import os
from typing import Callable, Sequence

from flamingo_jax.evaluation import prompts

Example = prompts.Example
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class Split:
  support: list            # Examples the shots are drawn from (the training split)
  queries: list            # Examples evaluated
  candidates: tuple = ()   # "score" tasks: the answers ranked for every query
  skipped: dict = dataclasses.field(default_factory=dict)   # {"missing_image": n}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  load: Callable[[str], Split]
  fmt: prompts.PromptFormat
  mode: str                # "generate" | "score"
  metric: str              # "cider" | "vqa" | "roc_auc" | "top1"
  modality: str = "image"


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
  if task.mode not in ("generate", "score"):
    raise ValueError(f"task {task.name}: mode {task.mode!r}")
  _REGISTRY[task.name] = task
  return task


def get(name: str) -> Task:
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


# -- reading ----------------------------------------------------------------------------------

def _read_json(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file {path} is missing")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file {path} is missing")
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{number} is not valid JSON ({e.msg})") from None
  return rows


def _keep_present(examples: Sequence[Example], skipped: dict) -> list[Example]:
  """Examples whose media (an image file, a clip folder or .npy) exist; the others counted
  as missing_image."""
  kept = []
  for example in examples:
    if os.path.exists(example.media):
      kept.append(example)
    else:
      skipped["missing_image"] = skipped.get("missing_image", 0) + 1
  return kept


def _split(support, queries, candidates=()) -> Split:
  skipped = {}
  return Split(_keep_present(support, skipped), _keep_present(queries, skipped),
               tuple(candidates), skipped)


# -- captions: Karpathy splits -------------------------------------------------------------

def _karpathy(json_name: str, image_dir: Callable[[dict], str]) -> Callable[[str], Split]:
  def load(data_dir: str) -> Split:
    images = _read_json(os.path.join(data_dir, json_name))["images"]
    by_split = {"train": [], "test": []}
    for image in images:
      split = "train" if image["split"] in ("train", "restval") else image["split"]
      if split in by_split:
        by_split[split].append(Example(
            str(image.get("cocoid", image.get("imgid", image["filename"]))),
            os.path.join(data_dir, image_dir(image), image["filename"]),
            references=[s["raw"].strip() for s in image["sentences"]]))
    return _split(by_split["train"], by_split["test"])
  return load


register(Task("coco", _karpathy("dataset_coco.json", lambda image: image["filepath"]),
              prompts.CAPTION, "generate", "cider"))
register(Task("flickr30k", _karpathy("dataset_flickr30k.json", lambda image: "flickr30k-images"),
              prompts.CAPTION, "generate", "cider"))


# -- VQA ----------------------------------------------------------------------------------

def _coco_vqa(questions: str, annotations: str) -> Callable[[str], Split]:
  """VQAv2 / OKVQA: official question and annotation files, COCO 2014 images."""
  def examples(data_dir: str, split: str) -> list[Example]:
    asked = _read_json(os.path.join(data_dir, questions.format(split=split)))["questions"]
    answered = {a["question_id"]: a for a in _read_json(
        os.path.join(data_dir, annotations.format(split=split)))["annotations"]}
    out = []
    for q in asked:
      annotation = answered.get(q["question_id"])
      if annotation is None:
        raise ValueError(f"question {q['question_id']} of the {split} split has no annotation")
      out.append(Example(
          str(q["question_id"]),
          os.path.join(data_dir, f"{split}2014", f"COCO_{split}2014_{q['image_id']:012d}.jpg"),
          {"question": q["question"]}, [a["answer"] for a in annotation["answers"]]))
    return out
  return lambda data_dir: _split(examples(data_dir, "train"), examples(data_dir, "val"))


register(Task("vqav2", _coco_vqa("v2_OpenEnded_mscoco_{split}2014_questions.json",
                                 "v2_mscoco_{split}2014_annotations.json"),
              prompts.QA, "generate", "vqa"))
register(Task("okvqa", _coco_vqa("OpenEnded_mscoco_{split}2014_questions.json",
                                 "mscoco_{split}2014_annotations.json"),
              prompts.QA, "generate", "vqa"))


def _textvqa(data_dir: str) -> Split:
  def examples(split):
    rows = _read_json(os.path.join(data_dir, f"TextVQA_0.5.1_{split}.json"))["data"]
    return [Example(str(r["question_id"]),
                    os.path.join(data_dir, "train_images", f"{r['image_id']}.jpg"),
                    {"question": r["question"]}, list(r["answers"])) for r in rows]
  return _split(examples("train"), examples("val"))


def _vizwiz(data_dir: str) -> Split:
  def examples(split):
    rows = _read_json(os.path.join(data_dir, f"{split}.json"))
    return [Example(r["image"], os.path.join(data_dir, split, r["image"]),
                    {"question": r["question"]}, [a["answer"] for a in r["answers"]])
            for r in rows]
  return _split(examples("train"), examples("val"))


register(Task("textvqa", _textvqa, prompts.QA, "generate", "vqa"))
register(Task("vizwiz", _vizwiz, prompts.QA, "generate", "vqa"))


# -- close-ended ----------------------------------------------------------------------------

def _hateful_memes(data_dir: str) -> Split:
  def examples(name):
    return [Example(str(r["id"]), os.path.join(data_dir, r["img"]), {"text": r["text"]},
                    ["yes" if int(r["label"]) else "no"])
            for r in _read_jsonl(os.path.join(data_dir, name))]
  return _split(examples("train.jsonl"), examples("dev_seen.jsonl"), candidates=("yes", "no"))


def _image_folder(data_dir: str) -> Split:
  """classnames.txt: `<folder> <class name>` per line; train/<folder>/*, val/<folder>/*."""
  path = os.path.join(data_dir, "classnames.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file {path} is missing")
  classes = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      folder, _, name = line.strip().partition(" ")
      if line.strip() and not name:
        raise ValueError(f"{path}:{number}: expected '<folder> <class name>'")
      if name:
        classes.append((folder, name.strip()))

  def examples(split):
    out = []
    for folder, name in classes:
      directory = os.path.join(data_dir, split, folder)
      if not os.path.isdir(directory):
        raise FileNotFoundError(f"class folder {directory} is missing")
      out += [Example(f"{folder}/{file}", os.path.join(directory, file), references=[name])
              for file in sorted(os.listdir(directory))
              if file.lower().endswith(_IMAGE_SUFFIXES)]
    return out
  return _split(examples("train"), examples("val"), candidates=[name for _, name in classes])


register(Task("hateful_memes", _hateful_memes, prompts.HATEFUL_MEMES, "score", "roc_auc"))
register(Task("imagenet", _image_folder, prompts.CAPTION, "score", "top1"))


# -- video ---------------------------------------------------------------------------------

def _clip(directory: str, name: str) -> str:
  """A clip's path: `<name>.npy` when present, else the frame folder `<name>`."""
  path = os.path.join(directory, name)
  return path + ".npy" if os.path.isfile(path + ".npy") else path


def _video_qa(prefix: str) -> Callable[[str], Split]:
  """MSVD-QA / MSRVTT-QA (Xu et al. 2017): {train,test}_qa.json; top-1 of the generated answer."""
  def load(data_dir: str) -> Split:
    def examples(split):
      return [Example(str(r["id"]), _clip(os.path.join(data_dir, "videos"),
                                          f"{prefix}{r['video_id']}"),
                      {"question": r["question"]}, [r["answer"]])
              for r in _read_json(os.path.join(data_dir, f"{split}_qa.json"))]
    return _split(examples("train"), examples("test"))
  return load


def _vatex(data_dir: str) -> Split:
  def examples(name):
    return [Example(r["videoID"], _clip(os.path.join(data_dir, "videos"), r["videoID"]),
                    references=[c.strip() for c in r["enCap"]])
            for r in _read_json(os.path.join(data_dir, name))]
  return _split(examples("vatex_training_v1.0.json"), examples("vatex_validation_v1.0.json"))


def _youcook2(data_dir: str) -> Split:
  database = _read_json(os.path.join(data_dir, "youcookii_annotations_trainval.json"))["database"]
  by_subset = {"training": [], "validation": []}
  for video, entry in sorted(database.items()):
    for segment in entry["annotations"]:
      name = f"{video}_{segment['id']}"
      if entry["subset"] in by_subset:
        by_subset[entry["subset"]].append(Example(
            name, _clip(os.path.join(data_dir, "videos"), name),
            references=[segment["sentence"].strip()]))
  return _split(by_subset["training"], by_subset["validation"])


register(Task("msvd_qa", _video_qa("vid"), prompts.QA, "generate", "top1", "video"))
register(Task("msrvtt_qa", _video_qa("video"), prompts.QA, "generate", "top1", "video"))
register(Task("vatex", _vatex, prompts.CAPTION, "generate", "cider", "video"))
register(Task("youcook2", _youcook2, prompts.CAPTION, "generate", "cider", "video"))


# -- the synthetic few-shot naming task ------------------------------------------------------

def _naming(data_dir: str) -> Split:
  """Made-up words bound to three shapes or colours (data/synthetic.py write_naming_task): a
  query is named by scoring each bound word; only the shots tell the binding (chance: one in
  three)."""
  spec = _read_json(os.path.join(data_dir, "naming.json"))

  def examples(split):
    return [Example(f"{split}_{k}", os.path.join(data_dir, r["image"]), references=[r["name"]])
            for k, r in enumerate(spec[split])]
  return _split(examples("support"), examples("queries"), candidates=sorted(spec["names"].values()))


register(Task("naming", _naming, prompts.NAMING, "score", "top1"))


def _attributes(data_dir: str) -> Split:
  """Scenes whose colour, shape or count is the answer (data/synthetic.py
  write_attribute_task), scored among the values of all three attributes: only shots tell
  which attribute is asked (chance: one in eleven)."""
  spec = _read_json(os.path.join(data_dir, "attributes.json"))

  def examples(split):
    return [Example(f"{split}_{k}", os.path.join(data_dir, r["image"]), references=[r["answer"]])
            for k, r in enumerate(spec[split])]
  return _split(examples("support"), examples("queries"), candidates=spec["candidates"])


register(Task("attributes", _attributes, prompts.ATTRIBUTE, "score", "top1"))
