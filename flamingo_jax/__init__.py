"""flamingo_jax: train and evaluate Flamingo visual language models with JAX + Haiku."""

__version__ = "0.1.0"
