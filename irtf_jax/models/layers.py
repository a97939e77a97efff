"""Building blocks shared by the models: convolution and feature normalization.

`Conv` is a drop-in for `flax.linen.Conv` (NHWC input, HWIO "kernel", "bias")
with a choice of how the convolution is computed. XLA:CPU's convolution is
pathologically slow for small spatial maps with many channels (a 3x3
convolution on 32x2x2x512 costs ~290 ms forward and as much again for its input
gradient), while the same product written as "slice-im2col" (pad, take the
k*k strided slices, concatenate on the channel axis, one matmul) runs at
matmul speed, and its gradient is pads and slices, which XLA:CPU also handles
well. On GPU and TPU the native convolution (cuDNN / the TPU conv unit) wins,
so `implementation="auto"` picks per backend, and on CPU per shape
(`resolve_conv_implementation`). Both formulations have the same
parameters, so checkpoints and pretrained weights do not depend on the choice.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLEMENTATIONS = ("auto", "lax", "im2col")


def _pad_pairs(padding, kernel_size):
  if isinstance(padding, str):
    if padding != "SAME":
      raise ValueError(f"padding {padding!r}: only 'SAME' or explicit pairs")
    return [((k - 1) // 2, k // 2) for k in kernel_size]
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel_size)
  return [tuple(p) if isinstance(p, (tuple, list)) else (p, p)
          for p in padding]


def conv_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding) -> jax.Array:
  """2D convolution as strided slices + one matmul.

  y[n, i, j, o] = sum_{a, b, c} xpad[n, s_h*i + a, s_w*j + b, c] * w[a, b, c, o]

  Args:
    x: (N, H, W, C) input.
    kernel: (kh, kw, C, O) weights (HWIO, as flax.linen.Conv).
    strides: (s_h, s_w).
    padding: "SAME" or ((top, bottom), (left, right)).

  Returns:
    (N, H', W', O), equal to lax.conv_general_dilated with the same arguments.
  """
  kh, kw, c, o = kernel.shape
  sh, sw = strides
  (pt, pb), (pl, pr) = _pad_pairs(padding, (kh, kw))
  n, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out_h = (h + pt + pb - kh) // sh + 1
  out_w = (w + pl + pr - kw) // sw + 1
  if kh == kw == 1:
    patches = xp[:, :(out_h - 1) * sh + 1:sh, :(out_w - 1) * sw + 1:sw, :]
  else:
    patches = jnp.concatenate([
        lax.slice(xp, (0, a, b, 0),
                  (n, a + (out_h - 1) * sh + 1, b + (out_w - 1) * sw + 1, c),
                  (1, sh, sw, 1))
        for a in range(kh) for b in range(kw)
    ], axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * c, o),
                 preferred_element_type=jnp.float32).astype(x.dtype)


def conv_lax(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides),
      padding=_pad_pairs(padding, kernel.shape[:2]),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32).astype(x.dtype)


# On CPU, "auto" keeps XLA's native convolution only where it beats
# slice-im2col in the train step and in its double backprop (adversarial GA):
# stride-1 k x k convolutions (k > 1) on maps of at least this many positions.
# Strided native convolutions have a pathologically slow input gradient on
# XLA:CPU (a 3x3/s2 convolution 4x4x256 -> 512 at batch 32: ~400 ms against
# ~17 ms as im2col), 1x1 convolutions are plain matmuls, and on maps below
# 8x8 the native convolution falls off a cliff (2x2x512: seconds).
_CPU_NATIVE_MIN_POSITIONS = 64


def resolve_conv_implementation(implementation: str, *,
                                kernel_size: Sequence[int] | None = None,
                                strides: Sequence[int] | None = None,
                                output_hw: Sequence[int] | None = None,
                                backend: str | None = None) -> str:
  """The formulation `implementation` selects for one convolution.

  "lax" and "im2col" are returned as given. "auto" gives "lax" on GPU and TPU
  (cuDNN / the TPU convolution unit win there); on CPU it gives "lax" for
  stride-1 convolutions with kernels larger than 1x1 whose output map has at
  least 64 positions (where XLA:CPU's convolution is fast), and "im2col"
  everywhere else (see `_CPU_NATIVE_MIN_POSITIONS`). Without the shape
  arguments, "auto" on CPU gives "im2col".

  Args:
    implementation: "auto", "lax" or "im2col".
    kernel_size: (kh, kw).
    strides: (s_h, s_w).
    output_hw: (H', W') of the output map.
    backend: `jax.default_backend()` when None.
  """
  if implementation not in CONV_IMPLEMENTATIONS:
    raise ValueError(f"config.model.conv_implementation: unknown "
                     f"{implementation!r}; allowed: {CONV_IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  if (backend or jax.default_backend()) != "cpu":
    return "lax"
  if kernel_size is None or strides is None or output_hw is None:
    return "im2col"
  native = (all(s == 1 for s in strides) and max(kernel_size) > 1
            and output_hw[0] * output_hw[1] >= _CPU_NATIVE_MIN_POSITIONS)
  return "lax" if native else "im2col"


class Conv(nn.Module):
  """NHWC 2D convolution with the parameters of flax.linen.Conv.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (s_h, s_w).
    padding: "SAME" or ((top, bottom), (left, right)).
    use_bias: whether to add a bias.
    implementation: "auto", "lax" or "im2col" (see module docstring).
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
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    kh, kw = self.kernel_size
    (pt, pb), (pl, pr) = _pad_pairs(self.padding, (kh, kw))
    output_hw = ((x.shape[1] + pt + pb - kh) // self.strides[0] + 1,
                 (x.shape[2] + pl + pr - kw) // self.strides[1] + 1)
    chosen = resolve_conv_implementation(
        self.implementation, kernel_size=self.kernel_size,
        strides=self.strides, output_hw=output_hw)
    if chosen == "im2col":
      y = conv_im2col(x, kernel, self.strides, self.padding)
    else:
      y = conv_lax(x, kernel, self.strides, self.padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init,
                         (self.features,)).astype(self.dtype)
    return y


def max_pool(x: jax.Array, window: int = 3, stride: int = 2,
             padding: int = 1) -> jax.Array:
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
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
               constant_values=-jnp.inf)
  out_h = (h + 2 * padding - window) // stride + 1
  out_w = (w + 2 * padding - window) // stride + 1
  out = None
  for a in range(window):
    for b in range(window):
      s = lax.slice(xp, (0, a, b, 0),
                    (n, a + (out_h - 1) * stride + 1,
                     b + (out_w - 1) * stride + 1, c), (1, stride, stride, 1))
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
      scale = self.param("scale", nn.initializers.constant(self.initial_scale),
                         ())
    else:
      scale = self.initial_scale
    x = x.astype(jnp.float32)
    # The epsilon keeps the gradient finite at x = 0 (never hit in practice).
    return scale * x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
