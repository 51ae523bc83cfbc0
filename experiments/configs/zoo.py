"""The public Flamingo checkpoints' shapes, without their weights: to count, compile and fit
a model before downloading it (`param_count`, `aot_compile`), and the fine-tuning recipe we
compile for each.

  python -m flamingo_jax.tools.aot_compile --config=experiments/configs/zoo.py:idefics-80b \
      --mode=generate --topology=v4:2x2x4 --mesh=data=1,model=16 --gen_batch=8
  python -m flamingo_jax.tools.aot_compile --config=experiments/configs/zoo.py:idefics-80b \
      --topology=v4:4x4x4 --mesh=data=4,model=16

The fields are what `import_weights --kind=openflamingo | idefics` writes into model.json for
that checkpoint (weights/openflamingo.py, weights/idefics.py), from each one's published
config.json: run a real import to train or generate (docs/zoo.md). Argument: NAME (a key of
CHECKPOINTS), optionally ",runlocal".
"""

from flamingo_jax import config_base

# The CLIP towers: OpenAI's ViT-L/14 (OpenFlamingo; QuickGELU) and LAION's ViT-H/14 (IDEFICS;
# GELU, every token before post_layernorm).
_VIT_L14 = dict(kind="vit", pixel_stats="clip",
                vit=dict(width=1024, layers=24, heads=16, patch_size=14, mlp_ratio=4.0,
                         activation="quick_gelu"))
_VIT_H14 = dict(kind="vit", pixel_stats="clip",
                vit=dict(width=1280, layers=32, heads=16, patch_size=14, mlp_ratio=4.0,
                         activation="gelu", output="tokens", ln_eps=1e-5))
# OpenFlamingo 2.0.1's modules: resampler over the ViT's width (8 heads of 64), gated blocks
# of 8 heads of 64; its tokens after the GPT-NeoX tokenizer's 50277: <|endofchunk|> 50277,
# <image> 50278, <PAD> 50279 (the LM's table resized to 50280 rows).
_OF_RESAMPLER = dict(num_layers=6, dim=1024, num_heads=8, key_size=64, ffw_mult=4,
                     num_latents=64, num_time_embeddings=0, input_projection=False,
                     ffw_activation="gelu_exact")


def _of_xattn(every: int) -> dict:
  return dict(every=every, offset=every - 1, num_heads=8, key_size=64, ffw_mult=4,
              only_attend_immediate_media=True, media_norm=False, ffw_activation="gelu_exact")


_OF_TOKENS = dict(vocab_size=50304, image_token_id=50278, eoc_token_id=50277)
_MPT = dict(norm="layer", norm_eps=1e-5, ffw="mlp", activation="gelu_exact", num_kv_heads=0,
            rotary_fraction=0.0, parallel_residual=False, tied_embeddings=True,
            alibi_bias_max=8.0, valid_vocab_size=50280)


def _idefics(lm: dict, qk_layer_norms: bool) -> dict:
  dim, heads = lm["dim"], lm["num_heads"]
  return dict(
      vocab_size=32128, image_token_id=32001, eoc_token_id=2, new_token_ids=[32000, 32001],
      image_size=224, vision=_VIT_H14,
      lm=dict(lm, key_size=dim // heads, norm="rms", norm_eps=1e-6, norm_bias=False,
              ffw="gated", activation="silu", num_kv_heads=0, rotary_max_wavelength=10_000.0,
              rotary_fraction=1.0, tied_embeddings=False, valid_vocab_size=32002),
      xattn=dict(every=4, offset=0, num_heads=heads, key_size=dim // heads, ffw_mult=4,
                 only_attend_immediate_media=True, media_norm=False, ffw_activation="silu",
                 norm="rms", norm_eps=1e-6, ffw="gated", ffw_size=lm["ffw_size"],
                 gate="scalar", qk_norm="rms" if qk_layer_norms else "", no_media_after_id=2),
      resampler=dict(kind="perceiver", num_layers=6, dim=1280, num_heads=16, key_size=96,
                     ffw_mult=4, num_latents=64, num_time_embeddings=0, input_projection=False,
                     ffw_activation="relu", qk_norm=""))


CHECKPOINTS = {
    # OpenFlamingo-3B-vitl-mpt1b (and -langinstruct): MPT-1B-RedPajama-200b (MosaicGPT).
    "openflamingo-3b": dict(
        _OF_TOKENS, image_size=224, vision=_VIT_L14, resampler=_OF_RESAMPLER,
        xattn=_of_xattn(1),
        lm=dict(_MPT, num_layers=24, dim=2048, num_heads=16, key_size=128, ffw_size=8192,
                norm_bias=True, qkv_bias=True, output_bias=True, ffw_bias=True, qk_norm=True)),
    # OpenFlamingo-4B-vitl-rpj3b (and -langinstruct): RedPajama-INCITE-3B (GPT-NeoX).
    "openflamingo-4b": dict(
        _OF_TOKENS, image_size=224, vision=_VIT_L14, resampler=_OF_RESAMPLER,
        xattn=_of_xattn(2),
        lm=dict(num_layers=32, dim=2560, num_heads=32, key_size=80, ffw_size=10240,
                norm="layer", norm_eps=1e-5, norm_bias=True, ffw="mlp",
                activation="gelu_exact", num_kv_heads=0, rotary_fraction=1.0,
                qkv_bias=True, output_bias=True, ffw_bias=True, parallel_residual=False,
                tied_embeddings=False, valid_vocab_size=50280)),
    # OpenFlamingo-9B-vitl-mpt7b: MPT-7B.
    "openflamingo-9b": dict(
        _OF_TOKENS, image_size=224, vision=_VIT_L14, resampler=_OF_RESAMPLER,
        xattn=_of_xattn(4),
        lm=dict(_MPT, num_layers=32, dim=4096, num_heads=32, key_size=128, ffw_size=16384,
                norm_bias=False, qkv_bias=False, output_bias=False, ffw_bias=False,
                qk_norm=False)),
    # IDEFICS-9B (and -instruct): LLaMA-7B, ViT-H/14, a gated layer every 4.
    "idefics-9b": _idefics(dict(num_layers=32, dim=4096, num_heads=32, ffw_size=11008),
                           qk_layer_norms=False),
    # IDEFICS-80B (and -instruct): LLaMA-65B.
    "idefics-80b": _idefics(dict(num_layers=80, dim=8192, num_heads=64, ffw_size=22016),
                            qk_layer_norms=True),
}


def get_config(arg=None):
  args = config_base.parse_arg(arg, "zoo.py", keys=("name",), positional="name")
  name = args.get("name", "")
  if name not in CHECKPOINTS:
    raise ValueError(f"zoo.py:{name or '?'}: known checkpoints: {', '.join(CHECKPOINTS)}")
  fields = CHECKPOINTS[name]
  model = config_base.model_config(
      vocab_size=fields["vocab_size"], image_size=fields["image_size"], vision_variant="tiny",
      lm=config_base.paper_lm(num_layers=1, dim=1, num_heads=1, ffw_size=1),
      xattn_every=1, xattn_num_heads=1)
  model = config_base.with_imported_flamingo(model, fields)
  model.remat = "dots"
  # Fine-tuning as the paper trains Flamingo (frozen LM and ViT, bf16): interleaved pages and
  # image-text pairs (docs/paper.md §3; batch per step here, not the paper's pretraining sizes).
  streams = {
      "m3w": dict(source="interleaved", manual_dir="synthetic", batch_size=32, weight=1.0,
                  max_tokens=256, max_media=5, frames=1),
      "align": dict(source="image_text", manual_dir="synthetic", batch_size=64, weight=0.2,
                    max_tokens=64, max_media=1, frames=1),
  }
  config = config_base.base_config(model, streams=streams, image_size=fields["image_size"],
                                   steps=10_000)
  config.model.attention_impl = "auto"      # cuDNN flash on a GPU, else our einsums
  return config_base.apply_variant(config, args)
