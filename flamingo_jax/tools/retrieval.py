r"""Zero-shot retrieval of a contrastive run (docs/paper.md §5): image->text and text->image
R@1 / R@5, on held-out synthetic pairs (default) or a captioning benchmark's test split.

  python -m flamingo_jax.tools.retrieval --config=experiments/configs/contrastive_tiny.py \
      --workdir=runs/clip [--examples=500 --seed=987654] [--json]
  ... --task=coco --data_dir=DIR [--limit=5000]        # Karpathy test split (tasks.py)
  ... --task=flickr30k --data_dir=DIR

Synthetic pairs come from a seed the training sources never use (as image_text_probe's).
Images are prepared as training prepares them; captions are tokenised as the contrastive
stage trains on them, at the longest stream's max_tokens. Missing images are skipped and
counted.
"""

import json
import sys

from absl import flags
from absl import logging

from flamingo_jax import cli
from flamingo_jax.data import pipeline
from flamingo_jax.evaluation import retrieval
from flamingo_jax.evaluation import tasks
from flamingo_jax import inference
from flamingo_jax.training import checkpointing
from flamingo_jax.training import param_sources
from flamingo_jax.training import tasks as train_tasks

_CONFIG = cli.define_config(run_flags=("workdir",))
_WORKDIR = cli.define_workdir("The contrastive run.", required=True)
_TASK = flags.DEFINE_enum("task", "synthetic", ["synthetic", "coco", "flickr30k"],
                          "Which pairs.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "--task=coco|flickr30k: its files (tasks.py).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Benchmark images to use (0: all).")
_EXAMPLES = flags.DEFINE_integer("examples", 500, "Synthetic held-out pairs.")
_SEED = flags.DEFINE_integer("seed", 987_654, "Synthetic held-out seed (training uses "
                             "1000*seed + i).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Rows per forward pass.")
_JSON = cli.define_json()


def run(config, workdir: str, task: str = "synthetic", data_dir: str = "", limit: int = 0,
        examples: int = 500, seed: int = 987_654, batch_size: int = 64,
        progress: bool = False) -> dict:
  if train_tasks.task_of(config).name != "contrastive":
    raise ValueError("--config is not a contrastive config (config.task != 'contrastive')")
  if task == "synthetic":
    pairs = retrieval.synthetic_pairs(examples, seed, int(config.data.synthetic_image_size))
  else:
    if not data_dir:
      raise ValueError(f"--task={task} needs --data_dir")
    pairs = retrieval.karpathy_pairs(tasks.get(task).load(data_dir), limit)
  params = param_sources.restore_run(config, workdir)[0]
  embedder = inference.Embedder(config.model, params, batch_size=batch_size)
  bar = cli.Progress(len(pairs.images), f"retrieval {task}", unit="images", enabled=progress)
  max_tokens = max(s.max_tokens for s in config.data.streams.values())
  report = retrieval.evaluate(embedder, pipeline.load_tokenizer(config), pairs,
                              image_size=config.model.image_size, max_tokens=max_tokens,
                              progress=bar.update)
  return {"task": task, "workdir": workdir, **report}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # orbax logs every file it reads at INFO
  try:
    report = run(_CONFIG.value, _WORKDIR.value, _TASK.value, _DATA_DIR.value, _LIMIT.value,
                 _EXAMPLES.value, _SEED.value, _BATCH.value, progress=not _JSON.value)
  except (ValueError, FileNotFoundError, checkpointing.NoLoadableCheckpointError) as e:
    sys.exit(f"error: {e}")
  if _JSON.value:
    print(json.dumps(report))
    return
  i2t, t2i, chance = report["image_to_text"], report["text_to_image"], report["chance_R@1"]
  print(f"{report['task']}: {report['images']} images, {report['texts']} texts")
  print(f"  image->text R@1 {i2t['R@1']:.1%}  R@5 {i2t['R@5']:.1%}  (chance R@1 "
        f"{chance['image_to_text']:.1%})")
  print(f"  text->image R@1 {t2i['R@1']:.1%}  R@5 {t2i['R@5']:.1%}  (chance R@1 "
        f"{chance['text_to_image']:.1%})")
  if report["skipped"]:
    print(f"  skipped: {report['skipped']}")


if __name__ == "__main__":
  cli.run(main)
