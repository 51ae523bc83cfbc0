"""NFNet-F0…F6 (Brock et al. 2021; docs/paper.md §11) in Haiku, plus a tiny variant for CPU.

Normalizer-free: Scaled Weight Standardisation on every conv (learnable gain), scaled
activations (unit output variance), residual branches scaled by alpha with beta = 1/expected
std of the input, squeeze-excite, a SkipInit gain (init 0) per block and stochastic depth.
For Flamingo the encoder returns the final-stage feature grid (after the 1x1 conv to
2 x 1536 channels): [B, H/32, W/32, C]; the pooled embedding and the classifier head are
there for contrastive pretraining and the parameter-count check.

Numerics (`numerics`), two arithmetics of the same network:
  "deepmind"  DeepMind's reference (deepmind-research/nfnets): weight standardisation
              w' = (w - mean) * rsqrt(max(var * fan_in, 1e-4)) * gain, GELU by its tanh
              approximation, stochastic depth that zeroes a row's branch without dividing
              the kept ones by the keep probability (their StochDepth default).
  "timm"      timm's port (`dm_nfnet_*`): w' = (w - mean) / sqrt(var + 1e-5) * gain /
              sqrt(fan_in), exact (erf) GELU, stochastic depth divided by the keep
              probability (timm's DropPath). Weights imported from timm use it: with
              DeepMind's arithmetic their final features differ by ~4% (relative L2).
"""

import functools
import re
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import attention

# Stage widths, depths, group width, and resolution (train/test) per variant.
NFNET_VARIANTS = {
    "F0": dict(width=(256, 512, 1536, 1536), depth=(1, 2, 6, 3), group_size=128, train_imsize=192, test_imsize=256),
    "F1": dict(width=(256, 512, 1536, 1536), depth=(2, 4, 12, 6), group_size=128, train_imsize=224, test_imsize=320),
    "F2": dict(width=(256, 512, 1536, 1536), depth=(3, 6, 18, 9), group_size=128, train_imsize=256, test_imsize=352),
    "F3": dict(width=(256, 512, 1536, 1536), depth=(4, 8, 24, 12), group_size=128, train_imsize=320, test_imsize=416),
    "F4": dict(width=(256, 512, 1536, 1536), depth=(5, 10, 30, 15), group_size=128, train_imsize=384, test_imsize=512),
    "F5": dict(width=(256, 512, 1536, 1536), depth=(6, 12, 36, 18), group_size=128, train_imsize=416, test_imsize=544),
    "F6": dict(width=(256, 512, 1536, 1536), depth=(7, 14, 42, 21), group_size=128, train_imsize=448, test_imsize=576),
    # CPU tests and smoke runs: same structure, a few thousand times smaller.
    "tiny": dict(width=(16, 32, 64, 64), depth=(1, 1, 1, 1), group_size=8, train_imsize=64, test_imsize=64),
}
STAGE_STRIDES = (1, 2, 2, 2)
TOTAL_STRIDE = 32  # stem (2 x 2) x stages (1 x 2 x 2 x 2)

NUMERICS = ("deepmind", "timm")

# The scanned blocks of each stage (hk.layer_stack): their parameters carry a leading
# layer axis, which unit-wise gradient clipping must not mix (training/optimizer.py).
STACKED_MODULE = re.compile(r"(^|/)stage\d+_blocks(/|$)")

# gamma such that act(N(0, 1)) has unit variance (Brock et al. 2021, App. D).
_GAMMAS = {"gelu": 1.7015043497085571, "relu": 1.7139588594436646}


def scaled_activation(activation: str, numerics: str):
  """act(x) * gamma; GELU by tanh (deepmind) or erf (timm)."""
  if activation not in _GAMMAS:
    raise ValueError(f"unknown NFNet activation {activation!r}; known: {sorted(_GAMMAS)}")
  if numerics not in NUMERICS:
    raise ValueError(f"unknown NFNet numerics {numerics!r}; known: {NUMERICS}")
  gamma = _GAMMAS[activation]
  if activation == "gelu":
    approximate = numerics == "deepmind"
    return lambda x: jax.nn.gelu(x, approximate=approximate) * gamma
  return lambda x: jax.nn.relu(x) * gamma


class WSConv2D(hk.Conv2D):
  """Conv2D with Scaled Weight Standardisation: w' = gain * (w - mean) / (std * sqrt(fan_in)),
  in DeepMind's or timm's arithmetic (module docstring)."""

  def __init__(self, output_channels: int, kernel_shape: int, stride: int = 1,
               feature_group_count: int = 1, numerics: str = "deepmind",
               name: Optional[str] = None):
    super().__init__(output_channels, kernel_shape, stride=stride, padding="SAME",
                     feature_group_count=feature_group_count, with_bias=True,
                     w_init=hk.initializers.VarianceScaling(1.0, "fan_in", "normal"),
                     name=name)
    self.numerics = numerics

  def __call__(self, x: jax.Array) -> jax.Array:
    w_shape = (self.kernel_shape[0], self.kernel_shape[1],
               x.shape[-1] // self.feature_group_count, self.output_channels)
    w = hk.get_parameter("w", w_shape, init=self.w_init)
    gain = hk.get_parameter("gain", (self.output_channels,), init=jnp.ones)
    w32 = w.astype(jnp.float32)
    mean = jnp.mean(w32, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w32, axis=(0, 1, 2), keepdims=True)
    fan_in = np.prod(w_shape[:-1])
    if self.numerics == "timm":
      scale = jax.lax.rsqrt(var + 1e-5) * (gain.astype(jnp.float32) / np.sqrt(fan_in))
    else:
      scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, 1e-4)) * gain.astype(jnp.float32)
    w_std = (w32 * scale - mean * scale).astype(x.dtype)
    out = jax.lax.conv_general_dilated(
        x, w_std, window_strides=self.stride, padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.feature_group_count)
    bias = hk.get_parameter("b", (self.output_channels,), init=jnp.zeros)
    return out + bias.astype(x.dtype)


class SqueezeExcite(hk.Module):
  """Channel gates from the spatial mean: sigmoid(fc1(relu(fc0(mean(x)))))."""

  def __init__(self, channels: int, ratio: float, name: Optional[str] = None):
    super().__init__(name=name)
    self.channels = channels
    self.hidden = max(1, int(channels * ratio))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2))                                           # [B, C]
    h = jax.nn.relu(attention.Linear(self.hidden, name="fc0")(h))
    return jax.nn.sigmoid(attention.Linear(self.channels, name="fc1")(h))[:, None, None, :]


class NFBlock(hk.Module):
  """Bottleneck block: 1x1 -> grouped 3x3 -> grouped 3x3 -> 1x1, SE, skip gain, alpha/beta."""

  def __init__(self, *, in_ch: int, out_ch: int, group_size: int, stride: int, beta: float,
               alpha: float, activation: str, se_ratio: float, stochdepth_rate: float,
               numerics: str = "deepmind", name: Optional[str] = None):
    super().__init__(name=name)
    width = int(out_ch * 0.5)  # bottleneck ratio 0.5 of the block output
    self.groups = max(1, width // group_size)
    self.width = group_size * self.groups
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.act = scaled_activation(activation, numerics)
    self.numerics = numerics
    self.se_ratio = se_ratio
    self.stochdepth_rate = stochdepth_rate

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    out = self.act(x) * jnp.asarray(self.beta, x.dtype)
    use_projection = self.stride > 1 or self.in_ch != self.out_ch
    shortcut = x
    if self.stride > 1:
      shortcut = hk.avg_pool(out, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="SAME")
    elif use_projection:
      shortcut = out
    conv = functools.partial(WSConv2D, numerics=self.numerics)
    if use_projection:
      shortcut = conv(self.out_ch, 1, name="conv_shortcut")(shortcut)
    out = conv(self.width, 1, name="conv0")(out)
    out = conv(self.width, 3, stride=self.stride, feature_group_count=self.groups,
               name="conv1")(self.act(out))
    out = conv(self.width, 3, feature_group_count=self.groups, name="conv1b")(self.act(out))
    out = conv(self.out_ch, 1, name="conv2")(self.act(out))
    out = 2.0 * SqueezeExcite(self.out_ch, self.se_ratio, name="squeeze_excite")(out) * out
    if is_training and (isinstance(self.stochdepth_rate, jax.Array) or self.stochdepth_rate > 0):
      keep = 1.0 - self.stochdepth_rate
      drop_mask = jax.random.bernoulli(hk.next_rng_key(), keep, (x.shape[0], 1, 1, 1))
      out = out * drop_mask.astype(out.dtype)
      if self.numerics == "timm":                 # DeepMind's reference keeps the scale
        out = out / keep
    skip_gain = hk.get_parameter("skip_gain", (), init=jnp.zeros)
    return out * (skip_gain * self.alpha).astype(out.dtype) + shortcut


class NFNet(hk.Module):
  """NFNet feature extractor. `__call__` gives the final grid; `pooled`/`classify` on top."""

  def __init__(self, variant: str = "F6", *, activation: str = "gelu", alpha: float = 0.2,
               se_ratio: float = 0.5, stochdepth_rate: float = 0.1,
               final_conv_mult: int = 2, num_classes: Optional[int] = None,
               numerics: str = "deepmind", remat: bool = False,
               name: Optional[str] = "nfnet"):
    """`remat`: recompute each block's insides in the backward pass (only block inputs are
    kept): a trained tower's activations at 288-480 px otherwise take ~3 GB per F6 image."""
    super().__init__(name=name)
    if variant not in NFNET_VARIANTS:
      raise ValueError(f"unknown NFNet variant {variant!r}; known: {sorted(NFNET_VARIANTS)}")
    self.variant = NFNET_VARIANTS[variant]
    self.activation = activation
    self.alpha = alpha
    self.se_ratio = se_ratio
    self.stochdepth_rate = stochdepth_rate
    self.final_conv_mult = final_conv_mult
    self.num_classes = num_classes
    self.numerics = numerics
    self.remat = remat
    self.act = scaled_activation(activation, numerics)

  @property
  def output_channels(self) -> int:
    return self.final_conv_mult * self.variant["width"][-1]

  def __call__(self, images: jax.Array, *, is_training: bool) -> jax.Array:
    """images [B, H, W, 3] (normalised) -> feature grid [B, H/32, W/32, output_channels]."""
    widths, depths = self.variant["width"], self.variant["depth"]
    conv = functools.partial(WSConv2D, numerics=self.numerics)
    x = conv(16, 3, stride=2, name="stem_conv0")(images)
    x = conv(32, 3, name="stem_conv1")(self.act(x))
    x = conv(64, 3, name="stem_conv2")(self.act(x))
    x = conv(widths[0] // 2, 3, stride=2, name="stem_conv3")(self.act(x))
    in_ch, index, num_blocks, expected_var = widths[0] // 2, 0, sum(depths), 1.0
    for stage, (width, depth, stride) in enumerate(zip(widths, depths, STAGE_STRIDES)):
      block_args = dict(group_size=self.variant["group_size"], alpha=self.alpha,
                        activation=self.activation, se_ratio=self.se_ratio,
                        numerics=self.numerics)
      # Transition block: beta from the variance the previous stage accumulated; its new
      # shortcut resets the variance to 1 (expected-variance tracking, Brock et al.).
      first = NFBlock(in_ch=in_ch, out_ch=width, stride=stride, beta=expected_var ** -0.5,
                      stochdepth_rate=self.stochdepth_rate * index / num_blocks,
                      name=f"stage{stage}_block0", **block_args)
      x = self._maybe_remat(lambda x, first=first: first(x, is_training))(x)
      in_ch, index = width, index + 1
      if depth > 1:
        # The other blocks share one shape: one scanned body (F6 stage 2: 41 blocks).
        # Block i >= 1 sees variance 1 + i·alpha² (expected-variance tracking).
        i = np.arange(1, depth)
        betas = (1.0 / np.sqrt(1.0 + i * self.alpha ** 2)).astype(np.float32)
        rates = (self.stochdepth_rate * (index + i - 1) / num_blocks).astype(np.float32)

        def block(x, beta, rate):
          return NFBlock(in_ch=width, out_ch=width, stride=1, beta=beta, stochdepth_rate=rate,
                         name="block", **block_args)(x, is_training), None

        x, _ = hk.layer_stack(depth - 1, with_per_layer_inputs=True,
                              name=f"stage{stage}_blocks")(self._maybe_remat(block))(
                                  x, jnp.asarray(betas),
                                                                  jnp.asarray(rates))
        index += depth - 1
      expected_var = 1.0 + depth * self.alpha ** 2
    x = conv(self.output_channels, 1, name="final_conv")(x)
    return self.act(x)

  def _maybe_remat(self, fn):
    return hk.remat(fn) if self.remat else fn

  def pooled(self, images: jax.Array, *, is_training: bool) -> jax.Array:
    """Global-average-pooled embedding [B, output_channels] (contrastive use, retrieval)."""
    return jnp.mean(self(images, is_training=is_training), axis=(1, 2))

  def classify(self, images: jax.Array, *, is_training: bool) -> jax.Array:
    """Classifier logits [B, num_classes] (the 1000-class head of the published counts)."""
    if self.num_classes is None:
      raise ValueError("NFNet built without num_classes has no classifier head")
    return attention.Linear(self.num_classes, w_init=jnp.zeros, name="classifier")(
        self.pooled(images, is_training=is_training))
