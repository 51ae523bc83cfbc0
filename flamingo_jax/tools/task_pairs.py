r"""A benchmark's training split as fine-tuning data (docs/paper.md §8: "task data laid out like
the paired datasets"): one image_text row per example, the text its prompt with the answer
(docs/paper.md §6 formats: "Output: {caption}", "Question: {q} Answer: {a}", ...).

  python -m flamingo_jax.tools.task_pairs --task=vqav2 --data_dir=DIR --output=TASK_DIR
  python -m flamingo_jax.train --config=experiments/configs/finetune.py:80b \
      --config.data.streams.task.manual_dir=TASK_DIR --config.init_from=RUN ...

Writes TASK_DIR/pairs.jsonl ({"image": absolute path, "text"}); the answer is the example's
first reference (a caption, the first human answer). Image tasks only (evaluation/tasks.py);
examples whose image is missing are skipped and counted. Nothing is written on error.
"""

import json
import os
import sys

from absl import flags

from flamingo_jax import cli
from flamingo_jax.evaluation import tasks

_TASK = flags.DEFINE_string("task", None, "An image task of evaluation/tasks.py.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Its files.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for pairs.jsonl (created).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Examples to write (0: all).")


def write_pairs(task_name: str, data_dir: str, output: str, limit: int = 0) -> dict:
  task = tasks.get(task_name)
  if task.modality != "image":
    raise ValueError(f"task {task_name!r} is a {task.modality} task; fine-tuning pairs are "
                     f"image-text")
  split = task.load(data_dir)
  examples = split.support[:limit] if limit else split.support
  if not examples:
    raise ValueError(f"task {task_name!r} has no training examples in {data_dir}")
  os.makedirs(output, exist_ok=True)
  path = os.path.join(output, "pairs.jsonl")
  if os.path.exists(path):
    raise ValueError(f"{path} exists already; choose a new --output")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for example in examples:
      f.write(json.dumps({"image": os.path.abspath(example.media),
                          "text": task.fmt.text(example, with_answer=True)}) + "\n")
  os.replace(tmp, path)
  return {"task": task_name, "pairs": len(examples), "skipped": dict(split.skipped),
          "output": path}


def main(argv):
  del argv
  try:
    report = write_pairs(_TASK.value, _DATA_DIR.value, _OUTPUT.value, _LIMIT.value)
  except (ValueError, KeyError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(report))


if __name__ == "__main__":
  flags.mark_flags_as_required(["task", "data_dir", "output"])
  cli.run(main)
