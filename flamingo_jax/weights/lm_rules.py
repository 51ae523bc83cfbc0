"""What an LM family (families.py) is made of: `Family`, the `Context` its transforms see, and
the transforms and config checks the families share.

A transform: (source tensor, xp, Context, the name regex's groups) -> {our logical name:
array}; `xp` is numpy when loading and jax.numpy under `jax.eval_shape` when checking shapes.
"""

import dataclasses
from typing import Any, Callable

from flamingo_jax.weights import mapping
from flamingo_jax.weights.safetensors_io import CheckpointError

Transform = mapping.Transform
LAYER = r"(?P<layer>\d+)"             # a per-layer tensor's layer index in its name


@dataclasses.dataclass(frozen=True)
class Context:
  """What transforms need to know of the target model."""
  vocab_size: int          # rows of our (padded) token table
  num_heads: int
  num_kv_heads: int
  key_size: int
  tied: bool = False       # the token table is also the output table
  new_tokens: int = 2      # trainable rows after the table (<image>, <EOC>; IDEFICS' extras)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  config_fn: Callable[[dict], dict]       # HF config.json -> config.model.lm fields (+ vocab)
  rules: tuple[tuple[str, Transform], ...]
  ignored: tuple[str, ...] = ()           # buffers some checkpoints carry (rotary tables)
  # Source names of the token table and (untied) output table: OpenFlamingo resizes and
  # trains the first, and keeps the second beside it (weights/openflamingo.py).
  input_embedding: str = ""
  output_embedding: str = ""


def pad_rows(x, xp, rows):
  return xp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def new_token_rows(embeddings, xp, count: int):
  """New tokens' rows (<image>/<EOC>) start at the mean of the pretrained rows (trainable,
  float32)."""
  mean = xp.mean(embeddings, axis=0, dtype=xp.float32)    # accumulates without a float32 copy
  return xp.stack([mean] * count)                                      # [count, D]


def embed(x, xp, ctx, groups, *, tied=False):
  del groups
  out = {"token_embed/embeddings": pad_rows(x, xp, ctx.vocab_size),
         "new_token_embed/embeddings": new_token_rows(x, xp, ctx.new_tokens)}
  if tied:                          # new logit columns: the mean of the tied rows, as above
    out["new_token_unembed/w"] = new_token_rows(x, xp, ctx.new_tokens).T   # [D, count]
  return out


def unembed(x, xp, ctx, groups):
  """torch lm_head [V, D] -> our unembed w [D, V_padded]."""
  del groups
  return {"unembed/w": pad_rows(x, xp, ctx.vocab_size).T,
          "new_token_unembed/w": new_token_rows(x, xp, ctx.new_tokens).T}


def to(name: str, *, transpose: bool = False, add: float = 0.0) -> Transform:
  """One tensor -> one parameter; torch Linear weights [out, in] transpose to our [in, out]."""
  def transform(x, xp, ctx, groups):
    del xp, ctx, groups
    if transpose:
      x = x.T
    if add:
      x = (x.astype("float32") + add).astype(x.dtype)
    return {name: x}
  return transform


def unsupported_tensor(what: str) -> Transform:
  def transform(x, xp, ctx, groups):
    raise CheckpointError(f"{what} is not supported (it would be a silent approximation); no "
                          f"import was written")
  return transform


# Hugging Face activation names -> ours (attention.ACTIVATIONS).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu_exact",
                "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu_fast": "gelu",
                "relu": "relu"}


def unsupported(option: str, value: Any, family: str) -> CheckpointError:
  return CheckpointError(f"{family} checkpoint option {option}={value!r} is not supported "
                         "(it would be a silent approximation); no import was written")


def activation(hf: dict, key: str, family: str) -> str:
  name = hf.get(key)
  if name not in ACTIVATIONS:
    raise unsupported(key, name, family)
  return ACTIVATIONS[name]
