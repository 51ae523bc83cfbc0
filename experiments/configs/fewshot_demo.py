"""The miniature Figure 2: a tiny Flamingo that learns from its prompt, on CPU.

  bash launch/fewshot_demo.sh [WORKDIR]     # trains this config, evaluates 0-8 shots, plots

Training data (data/synthetic.py): interleaved documents of shapes, most of which report one
attribute of every image, the same one throughout the document and drawn per document
("this is red." ... or "this is circle." ... or "this is two."), plus captioned pairs.
Evaluation (evaluation/tasks.py "attributes"): new scenes whose shape is the answer, scored
among the eleven values of all three attributes, so without shots nothing says which
attribute is asked (the model then mostly names the colour, the attribute it reads best);
the shots (other scenes with their shapes) do.

Nothing is pretrained, so the LM trains with the Flamingo modules (the paper's "LM unfrozen,
random init" ablation, docs/paper.md Table 3 xiii); the vision encoder stays frozen and random
(training it too makes a step ~3.5x slower here). Documents put each image before its text
and p_next is 0: a text attends to the image it describes, as in the evaluation prompts.
Images are 32 pixels: steps take half the time of 64.

Measured alternatives (WORKSPACE.md "Evaluation"): words bound to shapes or colours per
document (the `naming` task) stayed at chance after 1000-1500 steps: the model learned to
repeat a word the document had used, not which one goes with the image.
"""

from flamingo_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, "fewshot_demo.py")
  model = config_base.model_config(
      vocab_size=512, image_size=32, vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=4, dim=96, num_heads=4, ffw_size=384)
      | dict(key_size=24, trainable=True),
      xattn_every=1, xattn_num_heads=4, xattn_key_size=16,
      resampler=dict(num_layers=1, dim=32, num_heads=4, key_size=8, ffw_mult=4,
                     num_latents=4, num_time_embeddings=4, max_frames=12))
  streams = {
      # 8 shots + the query: documents of up to 9 described images.
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=16, weight=1.0,
                  max_tokens=80, max_media=9, frames=1),
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=8, weight=0.2,
                    max_tokens=16, max_media=1, frames=1),
  }
  config = config_base.base_config(model, streams=streams, image_size=32, steps=1500)
  config.data.tokenizer_path = config_base.SYNTHETIC_TOKENIZER
  config.data.synthetic_examples = 4000
  config.data.synthetic_image_size = 64       # the smallest the sources accept
  config.data.synthetic_in_context = 0.75
  config.data.synthetic_naming = "attribute"
  config.data.synthetic_pairs = (2, 9)
  config.data.p_next = 0.0
  config_base.cpu_run(config)
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  return config_base.apply_variant(config, args)
