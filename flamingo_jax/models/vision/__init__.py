"""Vision encoders: NFNet (the paper's), more to come (ViT)."""

from flamingo_jax.models.vision.nfnet import NFNET_VARIANTS, NFNet, TOTAL_STRIDE
