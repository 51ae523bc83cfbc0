"""A CLIP / OpenCLIP vision transformer in Haiku: the encoder OpenFlamingo and IDEFICS use.

    patches (conv, stride = kernel = patch, no bias) -> [class token; patches] + positions
    -> ln_pre -> `layers` pre-LN blocks (x + attn(ln_1(x)); x + mlp(ln_2(x))) -> ln_post

What the resampler gets (`__call__`), by `output`:
  "patches"  the patch tokens after ln_post, without the class token, as a grid
             [B, H/p, W/p, width] — OpenFlamingo's `vision_x` features, i.e. open_clip's
             `VisionTransformer(output_tokens=True)(x)[1]` (open_clip 3.x;
             `final_ln_after_pool=False`, the default of its ViT configs);
  "tokens"   every token, the class token first, before ln_post: [B, 1 + (H/p)(W/p), width]
             — IDEFICS' `vision_model(...).last_hidden_state` (ln_post is then not built).
The projection to CLIP's joint space (`proj`) is not used by Flamingo and is not part of the
module.

Blocks are one scanned body (`hk.layer_stack`, like the LM's), so parameters are stacked
[layers, ...]. Attention keeps the reference's arithmetic: q·k / sqrt(head size), softmax in
float32. `activation`: "quick_gelu" (OpenAI CLIP weights: x·sigmoid(1.702x)) or "gelu"
(exact; OpenCLIP's LAION-trained models).
"""

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import attention

OUTPUTS = ("patches", "tokens")
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _layer_norm(name: str, eps: float) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=eps, name=name)


class ResidualBlock(hk.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)); attention as nn.MultiheadAttention computes it
  (one fused in_proj, softmax(q·k / sqrt(head size)) in float32, out_proj)."""

  def __init__(self, heads: int, mlp_width: int, act, ln_eps: float, name: Optional[str] = None):
    super().__init__(name=name)
    self.heads, self.mlp_width, self.act, self.ln_eps = heads, mlp_width, act, ln_eps

  def __call__(self, x: jax.Array) -> jax.Array:
    b, s, d = x.shape
    h, k = self.heads, d // self.heads
    y = _layer_norm("ln_1", self.ln_eps)(x)
    qkv = attention.Linear(3 * d, name="in_proj")(y).reshape(b, s, 3, h, k)        # [B, S, 3, H, K]
    q, key, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhk,bshk->bhqs", q, key).astype(jnp.float32) / np.sqrt(k)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    attended = jnp.einsum("bhqs,bshk->bqhk", weights, v).reshape(b, s, d)         # [B, S, D]
    x = x + attention.Linear(d, name="out_proj")(attended)
    y = _layer_norm("ln_2", self.ln_eps)(x)
    y = self.act(attention.Linear(self.mlp_width, name="c_fc")(y))
    y = attention.Linear(d, name="c_proj")(y)
    return x + y


class VisionTransformer(hk.Module):
  """ViT feature extractor: `__call__` gives the patch-token grid."""

  def __init__(self, *, width: int, layers: int, heads: int, patch_size: int,
               image_size: int, mlp_ratio: float = 4.0, activation: str = "quick_gelu",
               ln_eps: float = 1e-5, output: str = "patches", name: Optional[str] = "vit"):
    super().__init__(name=name)
    if output not in OUTPUTS:
      raise ValueError(f"ViT output {output!r}; expected one of {OUTPUTS}")
    self.output = output
    if width % heads:
      raise ValueError(f"ViT width {width} is not divisible by {heads} heads")
    if image_size % patch_size:
      raise ValueError(f"ViT image_size {image_size} is not a multiple of patch {patch_size}")
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown ViT activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    self.width, self.layers, self.heads = width, layers, heads
    self.patch_size, self.grid = patch_size, image_size // patch_size
    self.mlp_width = int(width * mlp_ratio)
    self.act = ACTIVATIONS[activation]
    self.ln_eps = ln_eps

  @property
  def output_channels(self) -> int:
    return self.width

  def __call__(self, images: jax.Array, *, is_training: bool = False) -> jax.Array:
    """images [B, H, W, 3] (normalised) -> patch tokens [B, H/p, W/p, width] ("patches") or
    all tokens [B, 1 + (H/p)(W/p), width] ("tokens")."""
    del is_training                     # no dropout: the reference's eval-mode forward
    b, height, width_px, _ = images.shape
    if (height, width_px) != (self.grid * self.patch_size,) * 2:
      raise ValueError(f"ViT built for {self.grid * self.patch_size} px images got "
                       f"{height}x{width_px} (config.model.image_size; positions are per patch)")
    x = hk.Conv2D(self.width, self.patch_size, stride=self.patch_size, padding="VALID",
                  with_bias=False, name="conv1")(images)                          # [B, g, g, D]
    x = x.reshape(b, self.grid * self.grid, self.width)                           # [B, g*g, D]
    scale = self.width ** -0.5
    init = hk.initializers.RandomNormal(scale)
    cls = hk.get_parameter("class_embedding", (self.width,), init=init).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)  # [B, 1+g*g, D]
    positions = hk.get_parameter("positional_embedding", (1 + self.grid ** 2, self.width),
                                 init=init)
    x = _layer_norm("ln_pre", self.ln_eps)(x + positions.astype(x.dtype))
    block = lambda y: ResidualBlock(self.heads, self.mlp_width, self.act, self.ln_eps,
                                    name="block")(y)
    x = hk.layer_stack(self.layers, name="blocks")(block)(x)
    if self.output == "tokens":
      return x                                                                     # [B, 1+g*g, D]
    x = _layer_norm("ln_post", self.ln_eps)(x)
    return x[:, 1:].reshape(b, self.grid, self.grid, self.width)                  # [B, g, g, D]
