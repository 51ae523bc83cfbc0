"""Fine-tuning (docs/paper.md §8): a trained Flamingo on one task's data, the vision encoder
unfrozen at 480 px, the LM still frozen; the paper's per-task grid as `get_sweep()`.

  python -m flamingo_jax.train --config=experiments/configs/finetune.py:80b --workdir=runs/ft \
      --config.init_from=RUN_OR_PARAMS_DIR --config.data.streams.task.manual_dir=TASK_DIR
  python launch/sweep.py --config=experiments/configs/finetune.py:80b --workdir=runs/ft ...

`:BASE` is the model's config (tiny, the default, on CPU at 96 px; flamingo_3b, 9b, 80b).
`config.init_from` names the Flamingo to start from: a run's workdir or a parameter folder;
every parameter is taken from it and the optimizer starts fresh (training/param_sources.py: init_from).
The task data is one image_text stream ("task"): a folder of `*.jsonl` rows {"image",
"text"} (data/sources.py), e.g. written from a benchmark's training split by
`python -m flamingo_jax.tools.task_pairs --task=vqav2 --data_dir=DIR --output=TASK_DIR`.

Our readings where the paper is silent (docs/paper.md §9.14): AdamW as in pretraining; the
learning rate decays exponentially by 10x over the run; the vision encoder has its own
weight decay (0, `optim.vision_weight_decay`) and may have its own learning rate
(`optim.vision_learning_rate`; 0: the others'); 2000 steps at batch 16 on 80B.
"""

import os

from flamingo_jax import config_base

BASES = {"tiny": "tiny.py", "3b": "flamingo_3b.py", "9b": "flamingo_9b.py",
         "80b": "flamingo_80b.py"}
# docs/paper.md §8: the per-task grid.
LEARNING_RATES = (3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5)
BATCH_SIZES = (8, 16)


def get_config(arg=None):
  args = config_base.parse_arg(arg, "finetune.py", keys=("base",), positional="base")
  base = args.get("base", "tiny")
  if base not in BASES:
    raise ValueError(f"finetune.py:{arg}: base {base!r} unknown; known: {', '.join(BASES)}")
  config = config_base.load_config(os.path.join(os.path.dirname(__file__), BASES[base]))
  cpu = base == "tiny"
  config.model.vision.trainable = True            # docs/paper.md §8: the vision encoder unfrozen
  config.model.image_size = 96 if cpu else 480    # 480 px (tiny: larger than its 64)
  config.data.streams = {"task": dict(
      source="image_text", manual_dir="synthetic" if cpu else "", batch_size=16,
      weight=1.0, max_tokens=16 if cpu else 64, max_media=1, frames=1,
      resolution=config.model.image_size, frame_rate=1.0)}
  config.train.microbatches = {"task": 1}
  config.train.accumulate_in_place = False
  config.train.steps = 50 if cpu else 2000
  config.train.checkpoint_every = 25 if cpu else 500
  config.data.augment.update(config_base.PAPER_AUGMENT)
  if not cpu:
    config.model.vision.remat = True              # the trained F6 at 480 px: WORKSPACE.md
  optim = config.optim
  optim.learning_rate = 1e-4 if cpu else 1e-6
  optim.warmup_steps = 0
  optim.schedule, optim.decay_rate, optim.decay_steps = "exponential", 0.1, config.train.steps
  optim.vision_learning_rate = 0.0
  optim.vision_weight_decay = 0.0
  return config_base.apply_variant(config, args)


def get_sweep():
  """docs/paper.md §8: learning rate 3e-8 ... 1e-5 x batch 8 / 16 x augmentation on / off."""
  return [{"optim.learning_rate": lr, "data.streams.task.batch_size": batch,
           "data.augment.flip": augment,
           "data.augment.color_jitter": config_base.PAPER_AUGMENT["color_jitter"] * augment}
          for lr in LEARNING_RATES for batch in BATCH_SIZES for augment in (True, False)]
