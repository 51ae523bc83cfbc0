"""Inference (docs/design.md §2): cached decoding, beam search, sampling, scoring; contrastive
embeddings. Imports `models`."""

from flamingo_jax.inference.decoding import METHODS, Hypothesis, generate, stream
from flamingo_jax.inference.embedding import Embedder
from flamingo_jax.inference.engine import Engine, Prompt, bucket
from flamingo_jax.inference.scoring import score
