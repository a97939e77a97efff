"""Building blocks shared by the models: convolution and feature normalization.

`Conv` is a drop-in for `flax.linen.Conv` (NHWC input, HWIO "kernel", "bias")
with a choice of how the convolution is computed: `implementation` is one of
`CONV_IMPLEMENTATIONS`, "auto" or the name of a formulation of
`irtf_jax.models.conv` ("lax": `conv_lax`, "im2col": `conv_im2col`,
"lax_dw_im2col": `conv_lax_dw_im2col`, "space_to_depth":
`conv_space_to_depth`).

On XLA:CPU the native convolution is fast forward and for its input gradient
at stride 1 on maps of 8x8 and more, but its kernel gradient (a convolution
whose window is the whole output map) costs several times the forward pass on
large maps, strided convolutions have a pathologically slow input gradient,
and on small maps with many channels everything native falls off a cliff (a
3x3 convolution on 32x2x2x512: ~290 ms forward). On GPU and TPU the native
convolution (cuDNN / the TPU conv unit) wins. So `implementation="auto"`
picks per backend, and on CPU per shape (`resolve_conv_implementation`). All
formulations take the same parameters, so checkpoints and pretrained weights
do not depend on the choice.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from irtf_jax.models import conv

CONV_IMPLEMENTATIONS = (
    "auto",
    "lax",
    "im2col",
    "lax_dw_im2col",
    "space_to_depth",
)


# On CPU, "auto" keeps XLA's native convolution (forward and input gradient)
# only where it beats slice-im2col in the train step and in its double
# backprop (adversarial GA): stride-1 k x k convolutions (k > 1) on maps of at
# least this many positions, and there with the kernel gradient as a matmul
# (`conv_lax_dw_im2col`). Strided native convolutions have a pathologically
# slow input gradient on XLA:CPU (a 3x3/s2 convolution 4x4x256 -> 512 at
# batch 32: ~400 ms against ~17 ms as im2col), 1x1 convolutions are plain
# matmuls, and on maps below 8x8 the native convolution falls off a cliff
# (2x2x512: seconds).
_CPU_NATIVE_MIN_POSITIONS = 64
# Strided convolutions with at most this many input channels (the RGB stem)
# run as space-to-depth + stride-1 native convolution: im2col would gather
# k * k strided slices only this many channels wide, slow on XLA:CPU.
_CPU_SPACE_TO_DEPTH_MAX_CHANNELS = 4


def resolve_conv_implementation(
    implementation: str,
    *,
    kernel_size: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
    output_hw: Sequence[int] | None = None,
    in_channels: int | None = None,
    backend: str | None = None,
) -> str:
  """The formulation `implementation` selects for one convolution.

  Anything but "auto" is returned as given. "auto" gives "lax" on GPU and TPU
  (cuDNN / the TPU convolution unit win there). On CPU it gives
  "lax_dw_im2col" for stride-1 convolutions with kernels larger than 1x1
  whose output map has at least 64 positions (where XLA:CPU's convolution is
  fast, but not its kernel gradient), "space_to_depth" for strided
  convolutions with kernels larger than their stride on at most 4 input
  channels (the RGB stem), and "im2col" everywhere else (see
  `_CPU_NATIVE_MIN_POSITIONS`). Without the shape arguments, "auto" on CPU
  gives "im2col".

  Args:
    implementation: one of `CONV_IMPLEMENTATIONS`.
    kernel_size: (kh, kw).
    strides: (s_h, s_w).
    output_hw: (H', W') of the output map.
    in_channels: channels of the input (None: not the stem).
    backend: `jax.default_backend()` when None.
  """
  if implementation not in CONV_IMPLEMENTATIONS:
    raise ValueError(
        "config.model.conv_implementation: unknown "
        f"{implementation!r}; allowed: {CONV_IMPLEMENTATIONS}"
    )
  if implementation != "auto":
    return implementation
  if (backend or jax.default_backend()) != "cpu":
    return "lax"
  if kernel_size is None or strides is None or output_hw is None:
    return "im2col"
  if all(s == 1 for s in strides):
    native = (
        max(kernel_size) > 1
        and output_hw[0] * output_hw[1] >= _CPU_NATIVE_MIN_POSITIONS
    )
    return "lax_dw_im2col" if native else "im2col"
  if (
      in_channels is not None
      and in_channels <= _CPU_SPACE_TO_DEPTH_MAX_CHANNELS
      and any(k > s for k, s in zip(kernel_size, strides))
  ):
    return "space_to_depth"
  return "im2col"


def conv_function(
    implementation: str,
    *,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding,
    input_hw: Sequence[int],
    in_channels: int | None = None,
    backend: str | None = None,
):
  """`(x, kernel) -> y` of the formulation `implementation` picks for one
  convolution of NHWC inputs of spatial size `input_hw` (and `in_channels`
  channels, which "auto" uses to spot the stem).

  Every formulation computes `lax.conv_general_dilated(x, kernel, strides,
  padding)` with NHWC/HWIO/NHWC dimensions and float32 accumulation; "auto"
  is resolved per shape by `resolve_conv_implementation`.
  """
  kh, kw = kernel_size
  (pt, pb), (pl, pr) = conv.padding_pairs(padding, (kh, kw))
  chosen = resolve_conv_implementation(
      implementation,
      kernel_size=kernel_size,
      strides=strides,
      output_hw=conv.output_hw(input_hw, kernel_size, strides, padding),
      in_channels=in_channels,
      backend=backend,
  )
  pads = ((pt, pb), (pl, pr))
  in_range = all(
      0 <= p <= k - 1 for p, k in zip((pt, pb, pl, pr), (kh, kh, kw, kw))
  )
  if chosen == "lax_dw_im2col":
    if tuple(strides) != (1, 1) or not in_range:
      if implementation == "auto":
        return lambda x, kernel: conv.conv_im2col(x, kernel, strides, padding)
      raise ValueError(
          "conv implementation 'lax_dw_im2col' needs stride 1 "
          f"and paddings in [0, k - 1], got strides {strides} "
          f"and padding {pads} for a {kh}x{kw} kernel"
      )
    return lambda x, kernel: conv.conv_lax_dw_im2col(x, kernel, pads)
  if chosen == "space_to_depth":
    return lambda x, kernel: conv.conv_space_to_depth(
        x, kernel, tuple(strides), pads
    )
  formulation = {"lax": conv.conv_lax, "im2col": conv.conv_im2col}[chosen]
  return lambda x, kernel: formulation(x, kernel, strides, padding)


class Conv(nn.Module):
  """NHWC 2D convolution with the parameters of flax.linen.Conv.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (s_h, s_w).
    padding: "SAME" or ((top, bottom), (left, right)).
    use_bias: whether to add a bias.
    implementation: one of `CONV_IMPLEMENTATIONS` (see module docstring).
    dtype: computation dtype (parameters stay float32).
    kernel_init, bias_init: the parameters' initializers.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence = "SAME"
  use_bias: bool = True
  implementation: str = "auto"
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x, tiled: jax.Array | None = None):
    """The convolution of `x`, or of `x` with `tiled` tiled over its map and
    concatenated after its channels.

    Args:
      x: (N, H, W, C) input.
      tiled: optional (N, D) features that are the same at every position:
        the layer then convolves the (N, H, W, C + D) map [x, tiled] (its
        kernel has C + D input channels), computing the tiled channels'
        share with `conv.tiled_input_conv`, without the tiled map.
    """
    tiled_channels = 0 if tiled is None else tiled.shape[-1]
    kernel = self.param(
        "kernel",
        self.kernel_init,
        (*self.kernel_size, x.shape[-1] + tiled_channels, self.features),
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    y = conv_function(
        self.implementation,
        kernel_size=self.kernel_size,
        strides=self.strides,
        padding=self.padding,
        input_hw=x.shape[1:3],
        in_channels=x.shape[3],
    )(x, kernel[:, :, : x.shape[-1]])
    if tiled is not None:
      y = y + conv.tiled_input_conv(
          tiled.astype(self.dtype),
          kernel[:, :, x.shape[-1] :],
          x.shape[1:3],
          self.strides,
          self.padding,
      ).astype(y.dtype)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(
          self.dtype
      )
    return y


def max_pool(
    x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1
) -> jax.Array:
  """NHWC max-pooling as a running maximum over the window's strided slices.

    y[n, i, j, c] = max_{a, b < window} xpad[n, s*i + a, s*j + b, c]

  with xpad padded by -inf. Equal to `flax.linen.max_pool(x, (window,
  window), (stride, stride), ((padding, padding),) * 2)`, gradient included:
  the strict comparison keeps the first maximum in row-major window order, as
  XLA's select-and-scatter does. Its gradient is selects and pads, which
  XLA:CPU runs ~5x faster than select-and-scatter (ResNet's 3x3/s2 stem pool
  on 32x32x32x64: ~25 ms against ~150 ms).
  """
  n, h, w, c = x.shape
  xp = jnp.pad(
      x,
      ((0, 0), (padding, padding), (padding, padding), (0, 0)),
      constant_values=-jnp.inf,
  )
  out_h = (h + 2 * padding - window) // stride + 1
  out_w = (w + 2 * padding - window) // stride + 1
  out = None
  for a in range(window):
    for b in range(window):
      s = lax.slice(
          xp,
          (0, a, b, 0),
          (n, a + (out_h - 1) * stride + 1, b + (out_w - 1) * stride + 1, c),
          (1, stride, stride, 1),
      )
      out = s if out is None else jnp.where(s > out, s, out)
  return out


class FeatureNormalization(nn.Module):
  """x -> s * x / ||x||_2 with a learned scale s (TIRG's NormalizationLayer).

  The scale starts at `initial_scale` (4.0 in TIRG), which sets the softmax
  temperature of the batch-based classification loss.
  """

  initial_scale: float = 4.0
  learn_scale: bool = True

  @nn.compact
  def __call__(self, x):
    if self.learn_scale:
      scale = self.param(
          "scale", nn.initializers.constant(self.initial_scale), ()
      )
    else:
      scale = self.initial_scale
    x = x.astype(jnp.float32)
    # The epsilon keeps the gradient finite at x = 0 (never hit in practice).
    return scale * x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
