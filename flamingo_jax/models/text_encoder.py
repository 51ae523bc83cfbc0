"""A BERT-style bidirectional text encoder: the text tower of contrastive pretraining
(docs/paper.md §5; BERT's size is unspecified, the configs choose it).

    features = TextEncoder(...)(input_ids, mask)      # [B, L] -> [B, L, D]

Token + learned position embeddings, LayerNorm, then post-norm blocks as in BERT:
x = LN(x + attention(x)), x = LN(x + ffw(x)), exact-GELU feed-forward, every token sees
every valid token (`mask` [B, L]: padding is never attended to). The blocks are one scanned
body (`hk.layer_stack`), so a 24-layer encoder compiles as fast as a 1-layer one.
Projection names follow the sharding contract of models/attention.py (Megatron on 'model').
"""

from typing import Optional

import haiku as hk
import jax

from flamingo_jax.models import attention

_EPS = 1e-12        # BERT's LayerNorm epsilon


class TextEncoder(hk.Module):
  """input_ids int32 [B, L], mask bool [B, L] -> per-token features [B, L, dim] (in the
  parameters' dtype)."""

  def __init__(self, *, vocab_size: int, num_layers: int, dim: int, num_heads: int,
               ffw_size: int, max_length: int, attention_impl: str = "einsum",
               name: Optional[str] = "text_encoder"):
    super().__init__(name=name)
    if dim % num_heads:
      raise ValueError(f"text encoder dim={dim} is not a multiple of num_heads={num_heads}")
    self.vocab_size = vocab_size
    self.num_layers = num_layers
    self.dim = dim
    self.num_heads = num_heads
    self.ffw_size = ffw_size
    self.max_length = max_length
    self.attention_impl = attention_impl

  def __call__(self, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
      raise ValueError(f"input_ids {input_ids.shape} and mask {mask.shape} must both be [B, L]")
    length = input_ids.shape[1]
    if length > self.max_length:
      raise ValueError(f"text of {length} tokens is longer than the text encoder's "
                       f"max_length={self.max_length} (config.model.text.max_length)")
    embed_init = hk.initializers.TruncatedNormal(0.02)
    tokens = hk.Embed(self.vocab_size, self.dim, w_init=embed_init, name="token_embed")
    positions = hk.get_parameter("position_embeddings", [self.max_length, self.dim],
                                 init=embed_init)
    x = tokens(input_ids) + positions[:length].astype(tokens.embeddings.dtype)  # [B, L, D]
    x = attention.LayerNorm(eps=_EPS, name="embed_norm")(x)
    keys = mask[:, None, None, :]                                                # [B, 1, 1, L]

    def block(x):
      attended = attention.MultiHeadAttention(
          num_heads=self.num_heads, key_size=self.dim // self.num_heads, model_size=self.dim,
          qkv_bias=True, output_bias=True, impl=self.attention_impl,
          name="self_attention")(x, x, mask=keys)
      x = attention.LayerNorm(eps=_EPS, name="attention_norm")(x + attended)
      h = attention.FeedForward(hidden_size=self.ffw_size, activation="gelu_exact", bias=True,
                                name="ffw")(x)
      return attention.LayerNorm(eps=_EPS, name="ffw_norm")(x + h)

    return hk.layer_stack(self.num_layers, name="layers")(block)(x)
