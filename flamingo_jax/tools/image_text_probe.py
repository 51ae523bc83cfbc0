r"""Does the trained model look at the images? Caption loss on held-out synthetic pairs with
their own images vs with the images shuffled across the batch (a benchmark-style report).

  python -m flamingo_jax.tools.image_text_probe --config=experiments/configs/tiny.py --workdir=runs/local

The pairs are drawn from a seed the training sources never use; the stream is the config's
first image_text stream (its max_tokens), no leading space.
"""

import json

from absl import app
from absl import flags
from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from flamingo_jax.data import preprocessing
from flamingo_jax.data import synthetic
from flamingo_jax.data import pipeline
from flamingo_jax.training import checkpointing
from flamingo_jax.training import losses
from flamingo_jax.training import precision
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run.", required=True)
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Held-out pairs.")
_SEED = flags.DEFINE_integer("seed", 987_654, "Held-out seed (training uses 1000*seed + i).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def held_out_batch(config, count: int, seed: int) -> dict:
  name, spec = next((n, s) for n, s in config.data.streams.items() if s.source == "image_text")
  tokenizer = pipeline.load_tokenizer(config)
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    image, attrs = synthetic.scene(rng, int(config.data.synthetic_image_size))
    row = preprocessing.to_arrays(
        preprocessing.pair_tokens(synthetic.caption(attrs), tokenizer.encode, False,
                                  tokenizer.special),
        int(spec.max_tokens), tokenizer.special)
    row["media"] = preprocessing.resize_and_pad(image, config.model.image_size)[None, None]
    row["media_mask"] = np.ones(1, bool)
    rows.append(row)
  return name, {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def probe(config, workdir: str, count: int, seed: int) -> dict:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  setup = train_step.make_train_setup(config, mesh)
  ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  restored, frozen = ckpt.restore(setup), ckpt.restore_frozen(setup)
  ckpt.close()
  if restored is None or frozen is None:
    raise ValueError(f"no checkpoint (or frozen towers) in {workdir}")
  state, _ = restored
  compute = precision.dtype(config.precision.compute)
  params = hk.data_structures.merge(precision.cast(state.params, compute),
                                    precision.cast(frozen, compute))

  @jax.jit
  def mean_nll(batch):
    logits = setup.model.apply(params, None, batch["input_ids"], batch["media"])
    total, count_ = losses.masked_nll_sum(logits, batch["target_ids"], batch["loss_mask"])
    return total / count_

  _, batch = held_out_batch(config, count, seed)
  shuffled = dict(batch, media=np.roll(batch["media"], 1, axis=0))
  right, wrong = float(mean_nll(batch)), float(mean_nll(shuffled))
  return {"step": int(state.step), "examples": count, "caption_nll_right_images": right,
          "caption_nll_shuffled_images": wrong, "gap": wrong - right}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # orbax logs every file it reads at INFO
  report = probe(_CONFIG.value, _WORKDIR.value, _EXAMPLES.value, _SEED.value)
  if _JSON.value:
    print(json.dumps(report))
  else:
    print(f"held-out captions (step {report['step']}, {report['examples']} pairs): loss "
          f"{report['caption_nll_right_images']:.4f} with their images, "
          f"{report['caption_nll_shuffled_images']:.4f} with shuffled images")


if __name__ == "__main__":
  app.run(main)
