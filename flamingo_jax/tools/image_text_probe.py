r"""Does the trained model look at the images? Caption loss on held-out synthetic pairs with
their own images vs with the images shuffled across the batch (a benchmark-style report),
and captions generated for held-out images (greedy, cached decoding, stop at <EOC>): the
fraction that equal the true caption exactly. Writes the first held-out image to
WORKDIR/example.png (launch/local.sh captions it with `flamingo_jax.generate`).

  python -m flamingo_jax.tools.image_text_probe --config=experiments/configs/tiny.py --workdir=runs/local

The pairs are drawn from a seed the training sources never use; the stream is the config's
first image_text stream (its max_tokens), no leading space.
"""

import json

from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from flamingo_jax import cli
from flamingo_jax.data import pipeline
from flamingo_jax.data import preprocessing
from flamingo_jax.data import synthetic
from flamingo_jax import inference
from flamingo_jax.training import losses
from flamingo_jax.training import param_sources
from flamingo_jax.training import precision
from flamingo_jax.training import sharding
from flamingo_jax.training import tasks

_CONFIG = cli.define_config(run_flags=("workdir",))
_WORKDIR = cli.define_workdir("The trained run.", required=True)
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Held-out pairs.")
_SEED = flags.DEFINE_integer("seed", 987_654, "Held-out seed (training uses 1000*seed + i).")
_CAPTIONS = flags.DEFINE_integer("captions", 64, "Held-out images to caption (0: none).")
_JSON = cli.define_json()


def held_out_scenes(config, count: int, seed: int):
  """[(uint8 image, caption)] that the training sources never draw (their own seed)."""
  rng = np.random.default_rng(seed)
  return [synthetic.scene(rng, int(config.data.synthetic_image_size)) for _ in range(count)]


def held_out_batch(config, count: int, seed: int) -> dict:
  name, spec = next((n, s) for n, s in config.data.streams.items() if s.source == "image_text")
  tokenizer = pipeline.load_tokenizer(config)
  rows = []
  for image, attrs in held_out_scenes(config, count, seed):
    row = preprocessing.to_arrays(
        preprocessing.pair_tokens(synthetic.caption(attrs), tokenizer.encode, False,
                                  tokenizer.special),
        int(spec.max_tokens), tokenizer.special)
    row["media"] = preprocessing.resize_and_pad(image, config.model.image_size)[None, None]
    row["media_mask"] = np.ones(1, bool)
    rows.append(row)
  return name, {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def probe(config, workdir: str, count: int, seed: int, captions: int = 0) -> dict:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  setup = tasks.make_train_setup(config, mesh)
  # The frozen towers as the run had them: its frozen/ or its init checkpoints.
  params, step = param_sources.restore_run(config, workdir, setup.mesh)
  params = precision.cast(params, precision.dtype(config.precision.compute))

  @jax.jit
  def mean_nll(batch):
    logits = setup.model.apply(params, None, batch["input_ids"], batch["media"])
    total, count_ = losses.masked_nll_sum(logits, batch["target_ids"], batch["loss_mask"])
    return total / count_

  _, batch = held_out_batch(config, count, seed)
  shuffled = dict(batch, media=np.roll(batch["media"], 1, axis=0))
  right, wrong = float(mean_nll(batch)), float(mean_nll(shuffled))
  report = {"step": step, "examples": count, "caption_nll_right_images": right,
            "caption_nll_shuffled_images": wrong, "gap": wrong - right}
  if captions:
    report |= caption_images(config, params, captions, seed, workdir)
  return report


def caption_images(config, params, count: int, seed: int, workdir: str) -> dict:
  """Greedy captions of held-out images, prompt `<BOS><image>` (the pairs' layout)."""
  tokenizer = pipeline.load_tokenizer(config)
  special = tokenizer.special
  scenes = held_out_scenes(config, count, seed)
  media = np.stack([preprocessing.resize_and_pad(image, config.model.image_size)[None, None]
                    for image, _ in scenes])                                  # [B, 1, 1, H, W, 3]
  spec = next(s for s in config.data.streams.values() if s.source == "image_text")
  engine = inference.Engine(config.model, params, max_slots=inference.bucket(spec.max_tokens + 2))
  results = inference.generate(engine, [[special.bos, special.image]] * count, media,
                               max_new_tokens=int(spec.max_tokens), stop_ids=(special.eoc,
                                                                            special.eos))
  pairs = []
  for (_, attrs), result in zip(scenes, results):
    tokens = result[0].tokens
    tokens = tokens[:tokens.index(special.eoc)] if special.eoc in tokens else tokens
    pairs.append((synthetic.caption(attrs), tokenizer.decode(tokens).strip()))
  Image.fromarray(scenes[0][0]).save(f"{workdir}/example.png")
  exact = sum(truth == got for truth, got in pairs) / count
  # Per attribute: "<count> <colour> <shape>[s]" word by word.
  words = [(t.split(), g.split()) for t, g in pairs]
  attribute = {name: sum(len(g) > i and g[i].rstrip("s") == t[i].rstrip("s") for t, g in words)
               / count for i, name in enumerate(("count", "colour", "shape"))}
  return {"captions": count, "caption_exact_match": exact, "caption_attribute_accuracy": attribute,
          "caption_examples": [{"truth": t, "generated": g} for t, g in pairs[:3]]}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)     # orbax logs every file it reads at INFO
  report = probe(_CONFIG.value, _WORKDIR.value, _EXAMPLES.value, _SEED.value, _CAPTIONS.value)
  if _JSON.value:
    print(json.dumps(report))
  else:
    print(f"held-out captions (step {report['step']}, {report['examples']} pairs): loss "
          f"{report['caption_nll_right_images']:.4f} with their images, "
          f"{report['caption_nll_shuffled_images']:.4f} with shuffled images")
    if "caption_exact_match" in report:
      example = report["caption_examples"][0]
      print(f"generated captions ({report['captions']} held-out images, greedy): "
            f"{report['caption_exact_match']:.0%} exactly right (count "
            f"{report['caption_attribute_accuracy']['count']:.0%}, colour "
            f"{report['caption_attribute_accuracy']['colour']:.0%}, shape "
            f"{report['caption_attribute_accuracy']['shape']:.0%}); e.g. "
            f"{example['generated']!r} (truth {example['truth']!r})")


if __name__ == "__main__":
  cli.run(main)
