"""Analytic FLOPs of one train step (2 FLOPs per multiply-add; matmuls and convs only).

What a train step must compute, no more:
  * forward through everything;
  * the frozen NFNet: forward only (stop_gradient);
  * trainable layers (resampler, gated xattn): forward + activation grads + weight grads (3x),
    except that nothing needs gradients w.r.t. the frozen vision features (resampler input
    projection: 2x);
  * frozen LM blocks and the unembedding: forward + activation grads (2x) — all of them, since
    the first gated xattn block sits before LM block 0;
  * attention cores (QK^T, AV; no weights): forward + 2 backward matmuls (3x).
Rematerialisation would add a forward of the remat'd blocks on top: that is waste this count
does not include.
"""

from typing import Any

from flamingo_jax.models.vision import nfnet


def nfnet_forward_flops(variant: str, image_size: int, final_conv_mult: int = 2) -> float:
  """Forward FLOPs of one frame through the NFNet feature extractor (no classifier)."""
  spec = nfnet.NFNET_VARIANTS[variant]
  flops, size, ch = 0.0, image_size, 3

  def conv(out_ch, k, stride=1, groups=1):
    nonlocal flops, size, ch
    size = -(-size // stride)
    flops += 2.0 * size * size * k * k * (ch // groups) * out_ch
    ch = out_ch

  for out_ch, k, stride in ((16, 3, 2), (32, 3, 1), (64, 3, 1), (spec["width"][0] // 2, 3, 2)):
    conv(out_ch, k, stride)
  for width, depth, stride in zip(spec["width"], spec["depth"], nfnet.STAGE_STRIDES):
    for block in range(depth):
      s = stride if block == 0 else 1
      in_ch = ch
      mid = max(1, int(width * 0.5) // spec["group_size"]) * spec["group_size"]
      groups = mid // spec["group_size"]
      conv(mid, 1)
      conv(mid, 3, s, groups)
      conv(mid, 3, 1, groups)
      conv(width, 1)
      if s > 1 or in_ch != width:  # shortcut conv, on the pooled input when strided
        out_size = size
        flops += 2.0 * out_size * out_size * in_ch * width
      hidden = max(1, int(width * 0.5))
      flops += 2.0 * (width * hidden + hidden * width)  # squeeze-excite
  conv(final_conv_mult * spec["width"][-1], 1)
  return flops


def _linear(tokens, d_in, d_out):
  return 2.0 * tokens * d_in * d_out


def vit_forward_flops(v: Any, image_size: int) -> float:
  """Forward FLOPs of one frame through the ViT (config.model.vision.vit) up to its tokens."""
  grid = image_size // v.patch_size
  s, d, mlp = grid * grid + 1, v.width, int(v.width * v.mlp_ratio)
  patches = _linear(grid * grid, 3 * v.patch_size ** 2, d)
  attention = _linear(s, d, 3 * d) + 2 * 2.0 * s * s * d + _linear(s, d, d)   # qkv, QK/AV, out
  per_layer = attention + 2 * _linear(s, d, mlp)
  return patches + v.layers * per_layer


def vision_encoder_shape(model: Any, image_size: int) -> tuple[int, int, float]:
  """(tokens per frame, their channels, forward FLOPs per frame) of the vision encoder."""
  if model.vision.get("kind", "nfnet") == "vit":
    v = model.vision.vit
    return (image_size // v.patch_size) ** 2, v.width, vit_forward_flops(v, image_size)
  grid = (-(-image_size // nfnet.TOTAL_STRIDE)) ** 2
  return (grid, 2 * nfnet.NFNET_VARIANTS[model.vision.variant]["width"][-1],
          nfnet_forward_flops(model.vision.variant, image_size))


def stream_train_flops(model: Any, batch_size: int, tokens: int, media: int, frames: int,
                       image_size: int | None = None) -> dict[str, float]:
  """Analytic train-step FLOPs of one stream's batch, by component."""
  m, b, length = model, batch_size, tokens
  image_size = image_size or m.image_size
  grid, vision_ch, frame_flops = vision_encoder_shape(m, image_size)
  items = b * media
  vision_mult = 3.0 if m.vision.trainable else 1.0
  vision = vision_mult * items * frames * frame_flops

  r = m.resampler
  hk_r, n_kv = r.num_heads * r.key_size, frames * grid + r.num_latents
  proj = (2 * _linear(frames * grid, vision_ch, r.dim)             # input projection: fwd + wgrad
          if r.get("input_projection", True) else 0.0)
  q_out = 2 * _linear(r.num_latents, r.dim, hk_r)                 # q and output projections
  kv = 2 * _linear(n_kv, r.dim, hk_r)                              # k and v
  core = 2 * 2.0 * r.num_latents * n_kv * hk_r                     # QK^T and AV
  ffw = 2 * _linear(r.num_latents, r.dim, r.ffw_mult * r.dim)
  per_layer = 3 * (q_out + kv + core + ffw)
  resampler = items * (proj + r.num_layers * per_layer)

  lm, x = m.lm, m.xattn
  hk_lm = lm.num_heads * lm.key_size
  hk_kv = (lm.get("num_kv_heads", 0) or lm.num_heads) * lm.key_size    # grouped-query k, v
  ffw_mats = 3 if lm.get("ffw", "mlp") == "gated" else 2
  block_fwd = (2 * _linear(length, lm.dim, hk_lm) + 2 * _linear(length, lm.dim, hk_kv)
               + 2 * 2.0 * length * length * hk_lm
               + ffw_mats * _linear(length, lm.dim, lm.ffw_size))
  core_fwd = 2 * 2.0 * length * length * hk_lm
  # Frozen blocks: 2x matmuls, 3x attention core; trained (lm.trainable): 3x everything.
  if lm.get("trainable", False):
    lm_blocks = b * lm.num_layers * 3 * block_fwd
    unembed = b * 3 * _linear(length, lm.dim, m.vocab_size)
  else:
    lm_blocks = b * lm.num_layers * (2 * (block_fwd - core_fwd) + 3 * core_fwd)
    unembed = b * 2 * _linear(length, lm.dim, m.vocab_size)
  new_tokens = b * 3 * _linear(length, lm.dim, 2)
  hk_x, n_vis = x.num_heads * x.key_size, media * r.num_latents
  xattn_fwd = (2 * _linear(length, lm.dim, hk_x) + 2 * _linear(n_vis, r.dim, hk_x)
               + 2 * 2.0 * length * n_vis * hk_x + 2 * _linear(length, lm.dim, x.ffw_mult * lm.dim))
  num_xattn = -(-(lm.num_layers - x.get("offset", 0)) // x.every)
  xattn = b * num_xattn * 3 * xattn_fwd
  return {"vision": vision, "resampler": resampler, "lm": lm_blocks + unembed,
          "xattn": xattn + new_tokens}


def contrastive_stream_flops(model: Any, batch_size: int, tokens: int) -> dict[str, float]:
  """Analytic train-step FLOPs of one contrastive stream (docs/paper.md §5), everything trained
  (3x: forward, activation and weight gradients): the NFNet, the text encoder over `tokens`,
  both projections and the [N, N] similarities (whose rows span the global batch)."""
  m, b = model, batch_size
  _, vision_ch, frame_flops = vision_encoder_shape(m, m.image_size)
  t = m.text
  block = (4 * _linear(tokens, t.dim, t.dim) + 2 * 2.0 * tokens * tokens * t.dim
           + 2 * _linear(tokens, t.dim, t.ffw_size))
  return {"vision": 3 * b * (frame_flops + _linear(1, vision_ch, m.embed_dim)),
          "text": 3 * b * (t.num_layers * block + _linear(1, t.dim, m.embed_dim)),
          "similarity": 3 * 2.0 * b * b * m.embed_dim}
