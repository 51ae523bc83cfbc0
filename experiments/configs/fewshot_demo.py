"""The miniature Figure 2: a tiny Flamingo that learns to learn in context, on CPU.

  bash launch/fewshot_demo.sh [WORKDIR]     # trains this config, evaluates 0-8 shots, plots

Training data (data/synthetic.py): interleaved documents of shapes, most of which name each
shape by a made-up word that only that document binds ("this is a dax." under every circle
of the page), plus captioned pairs. Evaluation (evaluation/tasks.py "naming"): one binding
the documents never fixed, a query image named by scoring the three bound words, so only the
shots can tell the answer; zero shots sit at chance (1/3).

The tiny LM has no pretraining, so it trains with the Flamingo modules (the paper's "LM
unfrozen, random init" ablation, PAPER.md Table 3 xiii); the vision encoder stays frozen
(random). Documents put each image before its text and p_next is 0: a text attends to the
image it names, as in the evaluation prompts.
"""

from flamingo_jax import config_base


def get_config(arg=None):
  model = config_base.model_config(
      vocab_size=512, image_size=64, vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=4, dim=96, num_heads=4, ffw_size=384)
      | dict(key_size=24, trainable=True),
      xattn_every=1, xattn_num_heads=4, xattn_key_size=16,
      resampler=dict(num_layers=1, dim=32, num_heads=4, key_size=8, ffw_mult=4,
                     num_latents=4, num_time_embeddings=4, max_frames=12))
  streams = {
      # 8 shots + the query: documents of up to 9 named images.
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=16, weight=1.0,
                  max_tokens=80, max_media=9, frames=1),
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=8, weight=0.2,
                    max_tokens=16, max_media=1, frames=1),
  }
  config = config_base.base_config(model, streams=streams, image_size=64, steps=1500)
  config.data.tokenizer_path = config_base.SYNTHETIC_TOKENIZER
  config.data.synthetic_examples = 4000
  config.data.synthetic_in_context = 0.75
  config.data.synthetic_pairs = (2, 9)
  config.data.p_next = 0.0
  config_base.cpu_run(config)
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  return config_base.apply_variant(config, arg)
