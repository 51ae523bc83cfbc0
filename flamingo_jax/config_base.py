"""Building blocks for experiments/configs/*.py. Imports only ml_collections (cheap).

Every number that comes from the paper cites docs/paper.md; the rest are our defaults.
"""

import errno
import importlib.util
import json
import os
from typing import Optional, Sequence

import ml_collections

# Token ids of the special tokens (docs/paper.md §10.1): one id each, fixed for all tokenizers.
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID, EOC_ID = 0, 1, 2, 3, 4, 5

# docs/paper.md §1.3 / Table 13: identical resampler for 3B, 9B and 80B.
PAPER_RESAMPLER = dict(num_layers=6, dim=1536, num_heads=16, key_size=128, ffw_mult=4,
                       num_latents=64, num_time_embeddings=8, max_frames=32)
# Resampler variants (models/perceiver.py), the paper's by default; OpenFlamingo's: no input
# projection (its ViT's width is the resampler's), exact-GELU feed-forward, no time
# embeddings (num_time_embeddings=0).
# IDEFICS' resampler: a LayerNorm per head on its queries and keys (qk_norm="layer"),
# ReLU feed-forward; kind="none": no resampler, the encoder's tokens go to xattn as they are.
RESAMPLER_OPTIONS = dict(input_projection=True, ffw_activation="squared_relu",
                         kind="perceiver", qk_norm="")

# Gated xattn variants (models/gated_xattn.py), the paper's by default. OpenFlamingo's:
# media_norm=False, ffw_activation="gelu_exact". IDEFICS': RMSNorms (norm="rms", norm_eps),
# a SwiGLU feed-forward of ffw_size (ffw="gated", ffw_activation="silu"), gates of one value
# per channel (gate="vector"), an RMSNorm per head on queries and keys (qk_norm="rms"), and
# tokens after an end-of-document token attend to no image until the next <image>
# (no_media_after_id: the EOS id; -1: never).
XATTN_OPTIONS = dict(media_norm=True, ffw_activation="squared_relu", norm="layer",
                     norm_eps=1e-5, ffw="mlp", ffw_size=0, gate="scalar", qk_norm="",
                     no_media_after_id=-1)

# The ViT's features for the resampler: "patches" (OpenFlamingo: the patch grid after
# ln_post) or "tokens" (IDEFICS: every token, the class token first, before ln_post).
VIT_OPTIONS = dict(output="patches", ln_eps=1e-5)

# The SentencePiece model of the tiny configs (synthetic captions; tools/train_tokenizer.py).
SYNTHETIC_TOKENIZER = os.path.join(os.path.dirname(__file__), "data", "assets", "synthetic_sp.model")

# docs/paper.md §3.3: random horizontal flip and colour augmentation, parameters unspecified; the
# jitter strength (brightness, contrast, saturation factors in [0.9, 1.1]) is ours. Tiny and
# CPU configs keep augmentation off (their synthetic captions say "moving left").
PAPER_AUGMENT = dict(flip=True, color_jitter=0.1)


def paper_input(config: ml_collections.ConfigDict) -> None:
  """The paper configs' input: PAPER_AUGMENT, and one grain worker process per CPU of the
  host, up to 16 (a TPU host has cores to spare, and processes scale past the GIL; the tiny
  configs decode in threads of the trainer, which on 2 cores is faster: WORKSPACE.md)."""
  config.data.augment.update(PAPER_AUGMENT)
  config.data.workers = -1

# docs/paper.md §3, §4: per-stream weights λ and the ablation batch sizes. `source` is the kind of
# raw data (data/sources.py): interleaved | image_text | video_text.
PAPER_STREAMS = {
    "m3w": dict(source="interleaved", batch_size=256, weight=1.0, max_tokens=256, max_media=5, frames=1),
    "align": dict(source="image_text", batch_size=512, weight=0.2, max_tokens=32, max_media=1, frames=1),
    "ltip": dict(source="image_text", batch_size=512, weight=0.2, max_tokens=64, max_media=1, frames=1),
    "vtp": dict(source="video_text", batch_size=64, weight=0.03, max_tokens=64, max_media=1,
                frames=8, frame_rate=1.0),  # 8 frames at 1 fps (evaluation: 30 at 3 fps)
}


# config.model.lm options that public checkpoints need (models/language_model.py,
# DecoderOptions); the defaults are Chinchilla's, i.e. the paper's LM.
LM_OPTIONS = dict(
    norm="rms", norm_eps=1e-6, norm_bias=False,         # norm: rms | layer
    ffw="mlp", activation="gelu",                       # ffw: mlp | gated (SwiGLU, GeGLU)
    num_kv_heads=0,                                     # 0: = num_heads; fewer: GQA / MQA
    rotary_max_wavelength=10_000.0, rotary_fraction=1.0, rotary_layout="half",
    qkv_bias=False, output_bias=False, ffw_bias=False,
    parallel_residual=False, sliding_window=0,
    tied_embeddings=False, embed_multiplier=1.0,
    valid_vocab_size=0,                                 # 0: all ids; else ids past it are padding
    # MPT (rotary_fraction 0 turns rotary off): ALiBi slopes' maximum (0: none), q/k/v
    # clamp (0: none), a norm over all heads' queries and keys, the logits' scale (0:
    # 1/sqrt(key_size)), the output logits' scale.
    alibi_bias_max=0.0, clip_qkv=0.0, qk_norm=False, attention_scale=0.0, logit_scale=1.0,
)


def vision_config(variant: str) -> dict:
  """config.model.vision: an NFNet `variant` (or, with kind="vit", a CLIP ViT), frozen."""
  return dict(kind="nfnet",       # | "vit": a CLIP ViT (models/vision/vit.py)
              variant=variant, activation="gelu", stochdepth_rate=0.1,
              numerics="deepmind",  # | "timm": weights imported from timm (nfnet.py)
              # kind="vit": its shape (default ViT-L/14, OpenFlamingo's encoder)
              vit=dict(width=1024, layers=24, heads=16, patch_size=14, mlp_ratio=4.0,
                       activation="quick_gelu") | VIT_OPTIONS,
              # The encoder's input normalisation: "imagenet" | "clip" (CLIP weights;
              # the import sets it). models/flamingo.py PIXEL_STATS.
              pixel_stats="imagenet",
              trainable=False,    # True: the paper's fine-tuning recipe (docs/paper.md §8)
              remat=False,        # NFNet: recompute each block in the backward pass (a
                                  # trained tower: contrastive stage, fine-tuning)
              init_checkpoint="")


def model_config(*, vocab_size: int, image_size: int, vision_variant: str, lm: dict,
                 xattn_every: int, xattn_num_heads: int, xattn_key_size: int = 128,
                 resampler: Optional[dict] = None) -> ml_collections.ConfigDict:
  """config.model: vision encoder, resampler, LM and gated xattn shapes."""
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      image_token_id=IMAGE_ID,
      eoc_token_id=EOC_ID,
      image_size=image_size,          # pixels, square (320 training, 480 fine-tuning)
      remat="none",                   # per LM / xattn block: none | full | dots (language_model.py)
      attention_impl="einsum",        # einsum | xla | cudnn | splash | auto (models/attention.py)
      vision=vision_config(vision_variant),
      resampler=RESAMPLER_OPTIONS | dict(resampler or PAPER_RESAMPLER),
      # lm.trainable: False (docs/paper.md), True: the "LM unfrozen" ablation (Table 3 xiii).
      lm=dict(LM_OPTIONS, init_checkpoint="", trainable=False) | lm,
      xattn=dict(every=xattn_every, num_heads=xattn_num_heads, key_size=xattn_key_size,
                 ffw_mult=4,
                 offset=0,            # xattn before LM blocks offset, offset + every, ...
                                      #   (OpenFlamingo: every - 1; language_model.py)
                 only_attend_immediate_media=True,  # False: attend to all earlier media
                 ) | XATTN_OPTIONS,
      # Ids with trainable embedding rows and logit columns (IDEFICS: its decoupled extra
      # vocabulary); empty: <image> and <EOC>.
      new_token_ids=(),
  ))


# Option tables by config section: a run's config.json written before an option existed
# implies its default (workdir.check_config; tools that rebuild a run's config).
OPTION_DEFAULTS = {"model.lm": LM_OPTIONS, "model.xattn": XATTN_OPTIONS,
                   "model.resampler": RESAMPLER_OPTIONS, "model.vision.vit": VIT_OPTIONS,
                   "model": {"new_token_ids": ()}, "": {"task": "flamingo"}}
ABSENT = "<absent>"


def implied_default(key: str):
  """The value a config that lacks dotted `key` implies: the option's default for keys of the
  option tables, else ABSENT."""
  section, _, leaf = key.rpartition(".")
  value = OPTION_DEFAULTS.get(section, {}).get(leaf, ABSENT)
  return list(value) if isinstance(value, tuple) else value


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a run's config.json) with the options it predates at their defaults, so
  that it builds what it built (and `config.task` is set)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for section, options in OPTION_DEFAULTS.items():
    node = config
    for part in [p for p in section.split(".") if p]:
      node = node.get(part) if node is not None else None
    if node is None:
      continue
    for key, value in options.items():
      if key not in node:
        node[key] = value
  return config


def with_imported_lm(model: ml_collections.ConfigDict, fields: dict,
                     init_checkpoint: str = "") -> ml_collections.ConfigDict:
  """`model` with the LM an import describes (its `model.json`: vocab, special ids, lm options,
  xattn.every) and, if given, `lm.init_checkpoint` pointing at its `params/`."""
  model = model.copy_and_resolve_references()
  for key in ("vocab_size", "image_token_id", "eoc_token_id"):
    model[key] = fields[key]
  if "new_token_ids" in fields:
    model.new_token_ids = tuple(fields["new_token_ids"])
  model.lm.update(fields["lm"])
  model.xattn.update(fields.get("xattn", {}))
  if init_checkpoint:
    model.lm.init_checkpoint = init_checkpoint
  return model


def with_imported_vision(model: ml_collections.ConfigDict, fields: dict,
                         init_checkpoint: str = "") -> ml_collections.ConfigDict:
  """`model` with the vision tower an import describes (its `model.json`: the `vision` fields,
  and the image size a ViT's positions are for) and, if given, `vision.init_checkpoint`
  pointing at its `params/`."""
  model = model.copy_and_resolve_references()
  model.vision.update(fields["vision"])
  if "image_size" in fields:
    model.image_size = fields["image_size"]
  if init_checkpoint:
    model.vision.init_checkpoint = init_checkpoint
  return model


def with_imported_flamingo(model: ml_collections.ConfigDict, fields: dict,
                           params_dir: str = "") -> ml_collections.ConfigDict:
  """`model` as a whole-model import describes it (an OpenFlamingo import's `model.json`:
  LM, vision, resampler and xattn fields) and, if given, the LM and vision towers read
  from `params_dir` (which also holds the trainable parameters the run starts from)."""
  model = with_imported_lm(model, fields, init_checkpoint=params_dir)
  model = with_imported_vision(model, fields, init_checkpoint=params_dir)
  model.resampler.update(fields["resampler"])
  return model


def imported_flamingo_config(arg: Optional[str], kind: str) -> ml_collections.ConfigDict:
  """The recipe around a whole-model import (`import_weights --kind=openflamingo | idefics`):
  IMPORT_DIR/model.json fixes the model, IMPORT_DIR/params holds every parameter (the frozen
  towers are read from it and a fresh run starts its trainable ones from it),
  IMPORT_DIR/tokenizer.json tokenises the data; the rest is sized for a CPU run (synthetic
  streams at the ViT's resolution, float32): override any of it on the command line."""
  args = parse_arg(arg, f"{kind}.py", keys=("dir",), positional="dir")
  if "dir" not in args:
    raise ValueError(f"{kind}.py needs the import folder: "
                     f"--config=experiments/configs/{kind}.py:IMPORT_DIR[,runlocal]")
  directory = os.path.abspath(args["dir"])
  model_json = os.path.join(directory, "model.json")
  if not os.path.exists(model_json):
    raise ValueError(f"{model_json} not found: is {directory} an import_weights "
                     f"--kind={kind} output folder?")
  with open(model_json) as f:
    fields = json.load(f)
  if kind not in fields:
    raise ValueError(f"{directory} is not an {kind} import (its model.json has no {kind!r} "
                     "entry); LM imports use experiments/configs/pretrained.py")
  size = fields["image_size"]
  model = model_config(
      vocab_size=fields["vocab_size"], image_size=size, vision_variant="tiny",
      lm=paper_lm(num_layers=1, dim=1, num_heads=1, ffw_size=1),       # from the import
      xattn_every=1, xattn_num_heads=1)
  model = with_imported_flamingo(model, fields, os.path.join(directory, "params"))
  streams = {
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=8, weight=1.0,
                  max_tokens=48, max_media=3, frames=1),
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=8, weight=0.2,
                    max_tokens=24, max_media=1, frames=1),
  }
  config = base_config(model, streams=streams, image_size=size, steps=300)
  config.data.tokenizer_path = os.path.join(directory, "tokenizer.json")
  return apply_variant(cpu_run(config), args)


def base_config(model: ml_collections.ConfigDict, *, streams: dict, image_size: int,
                steps: int = 500_000) -> ml_collections.ConfigDict:
  """The whole recipe around a model config: data, optimisation, mesh, precision."""
  config = ml_collections.ConfigDict()
  config.task = "flamingo"            # training/tasks: flamingo | contrastive
  config.seed = 0
  # A fresh run's parameters, all of them, from a run's workdir or a parameter folder
  # (fine-tuning; param_sources.init_from); the optimizer starts fresh. Read at step 0 only.
  config.init_from = ""
  config.model = model
  config.data = ml_collections.ConfigDict(dict(
      # Per stream: manual_dir = folder of raw files, or "synthetic" (data/synthetic.py).
      streams={name: dict(resolution=image_size, manual_dir="", frame_rate=1.0) | spec
               for name, spec in streams.items()},
      data_dir="",                    # prepared TFDS datasets (one folder per stream)
      tokenizer_path="",              # SentencePiece .model with our special ids
      p_next=0.5,                     # docs/paper.md §3.1 (App. A.1.2)
      leading_space_prob=0.5,         # docs/paper.md §3.3
      augment=dict(flip=False, color_jitter=0.0),
      synthetic_examples=2000,        # per stream, when manual_dir == "synthetic"
      synthetic_image_size=96,        # their pixels (square; video frames too)
      synthetic_in_context=0.5,       # share of interleaved documents that name each image's
      synthetic_naming="shape",       #   shape | colour with made-up words (synthetic.py);
      synthetic_pairs=(2, 4),         #   image-text pairs per document
      prefetch=2,                     # batches queued ahead of the step
      workers=0,                      # grain worker processes that decode; 0: threads
                                      #   of the trainer process; -1: one per CPU (<= 16)
  ))
  config.train = ml_collections.ConfigDict(dict(
      steps=steps, log_every=100, checkpoint_every=1000, keep_checkpoints=3,
      mixing="accumulate",            # "accumulate" (docs/paper.md §4) | "round_robin" (ablation)
      microbatches={name: 1 for name in streams},
      # Add each stream's scaled gradients into one running sum as they arrive (its token
      # count comes from the mask first) instead of a per-stream accumulator and a scaled
      # copy: -3.4 GiB per chip for 80B on v4:8x12x16, but +3.9 GiB for the 3B's
      # data-parallel step and nothing for the 9B's (tools/aot_compile; WORKSPACE.md).
      accumulate_in_place=False,
      zero1=True,                     # shard optimizer state over 'data' (ZeRO stage 1)
      max_consecutive_nonfinite=20,   # skipped (NaN/Inf) updates in a row: divergence
      on_nonfinite="stop",            # then "stop" (exit 1) | "rollback" (to the last good
      max_rollbacks=3,                #   checkpoint, at most this often; guards.py)
      skip_batches=0,                 # batches per stream a resumed run drops first (once)
      profile_steps=(),               # (first, last): a jax.profiler trace of those steps
      peak_tflops_per_device=0.0,     # for MFU; 0 = known chips by device_kind (metrics_log.py)
      # The workdir's lease (flamingo_jax/lease.py): a second trainer on the workdir is
      # refused while the holder renews it; a holder that died blocks a new start for at
      # most this long (on its own machine, not at all).
      lease_seconds=60.0,
  ))
  config.optim = ml_collections.ConfigDict(dict(   # docs/paper.md §4
      learning_rate=1e-4, warmup_steps=5000, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.1, resampler_weight_decay=0.0, clip_global_norm=1.0,
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # -1: all remaining devices
  config.precision = ml_collections.ConfigDict(dict(
      compute="bfloat16",             # activations and gradients
      frozen_params="bfloat16",       # storage of the frozen towers (docs/paper.md §4)
  ))
  return config


# docs/paper.md §5: the contrastive stage's streams (ALIGN + LTIP, one gradient computation each)
# and optimisation. Per-stream batch 16,384 (the paper does not say whether its 16,384 is per
# dataset or in total, docs/paper.md §9.11; ALIGN trained at 16,384 per step).
PAPER_CONTRASTIVE_STREAMS = {
    "align": dict(source="image_text", batch_size=16_384, weight=1.0, max_tokens=32, max_media=1, frames=1),
    "ltip": dict(source="image_text", batch_size=16_384, weight=1.0, max_tokens=64, max_media=1, frames=1),
}
# BERT's size is unspecified (docs/paper.md §9.11): BERT-Large, as ALIGN (whose tokenizer the
# paper uses) pairs with its image tower.
BERT_LARGE = dict(num_layers=24, dim=1024, num_heads=16, ffw_size=4096)


def contrastive_config(*, vocab_size: int, image_size: int, vision_variant: str, text: dict,
                       streams: dict, steps: int, embed_dim: int = 1376,
                       ) -> ml_collections.ConfigDict:
  """The contrastive vision-pretraining recipe (docs/paper.md §5; training/tasks/contrastive.py): an
  NFNet and a BERT-style text encoder trained from scratch, every parameter trainable."""
  contrastive_model = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, image_token_id=IMAGE_ID, eoc_token_id=EOC_ID,
      image_size=image_size, attention_impl="einsum",
      embed_dim=embed_dim,                    # docs/paper.md §5: 1376
      vision=vision_config(vision_variant) | dict(trainable=True),
      # max_length: position embeddings (>= every stream's max_tokens)
      text=dict(max_length=max(s["max_tokens"] for s in streams.values())) | text,
  ))
  config = base_config(contrastive_model, streams=streams, image_size=image_size, steps=steps)
  config.task = "contrastive"
  config.train.label_smoothing = 0.1          # docs/paper.md §5
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="linear_to_zero", warmup_steps=0, decay_steps=steps,
      b1=0.9, b2=0.999, eps=1e-8,             # Adam; β and ε unspecified (docs/paper.md §9.8)
      agc_clipping=1e-2,                      # AGC on the NFNet
      text_clip_global_norm=10.0,             # global-norm clipping on the text tower
  ))
  config.precision.frozen_params = "float32"  # nothing is frozen
  return config


def cpu_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training recipe of the CPU configs (tiny, pretrained): a few hundred quick steps."""
  config.train.log_every = 10
  config.train.checkpoint_every = 100
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 20
  config.precision.compute = "float32"       # bf16 matmuls are slow on CPU
  config.precision.frozen_params = "float32"
  return config


def paper_lm(num_layers: int, dim: int, num_heads: int, ffw_size: int) -> dict:
  """Chinchilla-style LM shape; key size 128 everywhere (docs/paper.md §1.5)."""
  return dict(num_layers=num_layers, dim=dim, num_heads=num_heads, key_size=128,
              ffw_size=ffw_size)


def parse_arg(arg: Optional[str], name: str, keys: Sequence[str] = (),
              switches: Sequence[str] = ("runlocal",),
              positional: Optional[str] = None) -> dict:
  """The one grammar of `--config=FILE:ARG`: comma-separated `key=value` pairs and bare
  switches, combinable (`pretrained.py:lm=DIR,runlocal`). A bare word that is not a switch
  is the value of `positional` (`bench.py:1b` = `size=1b`). Returns {key: value} for the keys
  given and {switch: bool} for every switch; anything else is a one-line error naming `name`
  and what it takes."""
  parsed = {switch: False for switch in switches}
  words = [] if arg is None else [w.strip() for w in arg.split(",") if w.strip()]
  takes = ", ".join([f"{k}=..." for k in keys] + list(switches)) or "no argument"
  for word in words:
    key, eq, value = word.partition("=")
    if eq and key in keys:
      parsed[key] = value
    elif not eq and word in switches:
      parsed[word] = True
    elif not eq and positional is not None and positional not in parsed:
      parsed[positional] = word
    else:
      raise ValueError(f"unexpected {word!r}; {name} takes {takes}")
  return parsed


def apply_variant(config: ml_collections.ConfigDict, args: dict) -> ml_collections.ConfigDict:
  """`runlocal` (parse_arg's switch): same model, batch 8 per stream and a few steps (a
  quick look)."""
  if not args.get("runlocal"):
    return config
  for stream in config.data.streams.values():
    stream.batch_size = 8
  config.train.steps = 10
  config.train.log_every = 1
  return config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way `--config=` does (for tests and tools)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
  module_spec = importlib.util.spec_from_file_location("flamingo_config", path)
  if module_spec is None:
    raise ValueError(f"cannot load config file {path!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
