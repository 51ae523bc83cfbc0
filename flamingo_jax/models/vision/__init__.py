"""Vision encoders: NFNet (the paper's) and the CLIP ViT (OpenFlamingo's, IDEFICS')."""

from flamingo_jax.models.vision.nfnet import NFNET_VARIANTS, NFNet, TOTAL_STRIDE
from flamingo_jax.models.vision.vit import VisionTransformer
