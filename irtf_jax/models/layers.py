"""Building blocks shared by the models: convolution and feature normalization.

`Conv` is a drop-in for `flax.linen.Conv` (NHWC input, HWIO "kernel", "bias")
with a choice of how the convolution is computed (`CONV_IMPLEMENTATIONS`):

  "lax"             XLA's native convolution and its native derivatives;
  "im2col"          slice-im2col: pad, take the k*k strided slices, concatenate
                    on the channel axis, one matmul; its gradient is pads,
                    slices and matmuls;
  "lax_dw_im2col"   (stride 1) native convolution and input gradient, kernel
                    gradient as shifted copies + one matmul;
  "space_to_depth"  (strided) native convolution, derivatives through s x s
                    blocks stacked on channels and a stride-1
                    "lax_dw_im2col" convolution.

On XLA:CPU the native convolution is fast forward and for its input gradient
at stride 1 on maps of 8x8 and more, but its kernel gradient (a convolution
whose window is the whole output map) costs several times the forward pass on
large maps, strided convolutions have a pathologically slow input gradient,
and on small maps with many channels everything native falls off a cliff (a
3x3 convolution on 32x2x2x512: ~290 ms forward). On GPU and TPU the native
convolution (cuDNN / the TPU conv unit) wins. So `implementation="auto"`
picks per backend, and on CPU per shape (`resolve_conv_implementation`). All
formulations have the same parameters, so checkpoints and pretrained weights
do not depend on the choice, and equal values and derivatives (any order) up
to float rounding.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLEMENTATIONS = (
    "auto",
    "lax",
    "im2col",
    "lax_dw_im2col",
    "space_to_depth",
)


def _pad_pairs(padding, kernel_size):
  if isinstance(padding, str):
    if padding != "SAME":
      raise ValueError(f"padding {padding!r}: only 'SAME' or explicit pairs")
    return [((k - 1) // 2, k // 2) for k in kernel_size]
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel_size)
  return [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding]


def conv_im2col(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding
) -> jax.Array:
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
    patches = xp[:, : (out_h - 1) * sh + 1 : sh, : (out_w - 1) * sw + 1 : sw, :]
  else:
    patches = jnp.concatenate(
        [
            lax.slice(
                xp,
                (0, a, b, 0),
                (n, a + (out_h - 1) * sh + 1, b + (out_w - 1) * sw + 1, c),
                (1, sh, sw, 1),
            )
            for a in range(kh)
            for b in range(kw)
        ],
        axis=-1,
    )
  return jnp.dot(
      patches,
      kernel.reshape(kh * kw * c, o),
      preferred_element_type=jnp.float32,
  ).astype(x.dtype)


def conv_lax(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=tuple(strides),
      padding=_pad_pairs(padding, kernel.shape[:2]),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32,
  ).astype(x.dtype)


def kernel_gradient_im2col(
    x: jax.Array, cotangent: jax.Array, kernel_size: Sequence[int], padding
) -> jax.Array:
  """Gradient w.r.t. the kernel of a stride-1 convolution, as one matmul.

    dw[a, b, c, o] = sum_{n, i, j} xpad[n, i + a, j + b, c] * ct[n, i, j, o]

  XLA:CPU computes this natively as a convolution whose window is the whole
  output map, several times slower than the forward convolution at 56x56 or
  28x28. Here xpad and ct (padded with zeros to xpad's spatial size) are
  flattened to the rows q of one padded grid of W' columns, where tap (a, b)
  pairs ct row q with xpad row q + a W' + b. Splitting the shift between the
  two sides, dw[a, b] = sum_q ct[q - a W'] xpad[q + b]: ct shifted by the kh
  row offsets is stacked on channels (R, kh O), xpad shifted by the kw column
  offsets likewise (R, kw C), and one matmul contracting the R rows gives
  every tap: kh + kw shifted copies instead of im2col's kh kw, and no
  transposed copy (XLA:CPU's transposes and concatenations of transposed
  data are slow). When that copies more than shifting xpad by all kh kw taps
  (few input channels, as in a space-to-depth stem), all shifts go on xpad.
  Rows of ct beyond the output map are zero, so shifts that wrap into the
  next image row or image contribute nothing.

  Args:
    x: (N, H, W, C) input of the convolution.
    cotangent: (N, H', W', O) cotangent of its output.
    kernel_size: (kh, kw).
    padding: "SAME" or ((top, bottom), (left, right)), each at most k - 1.

  Returns:
    (kh, kw, C, O) float32.
  """
  kh, kw = kernel_size
  (pt, pb), (pl, pr) = _pad_pairs(padding, (kh, kw))
  n, _, _, c = x.shape
  o = cotangent.shape[-1]
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  hp, wp = xp.shape[1:3]
  out_h, out_w = cotangent.shape[1:3]
  ctp = jnp.pad(cotangent, ((0, 0), (0, hp - out_h), (0, wp - out_w), (0, 0)))
  total = n * hp * wp
  flat_x = xp.reshape(total, c)
  flat_ct = ctp.reshape(total, o)
  if kh * o + kw * c <= kh * kw * c + o:
    # Row shifts on ct, column shifts on x: kh + kw copies.
    rows = total - (kw - 1)  # xpad[q + b] must exist for b < kw
    x_shifted = jnp.concatenate(
        [flat_x[b : b + rows] for b in range(kw)], axis=1
    )  # (R, kw C)
    # ct[q - a W'] for q < R: a W' zero rows, then the first R - a W' rows
    # of ct; its last kh - 1 grid rows are zero, so nothing nonzero is cut.
    ct_shifted = jnp.concatenate(
        [
            jnp.pad(flat_ct[: rows - a * wp], ((a * wp, 0), (0, 0)))
            for a in range(kh)
        ],
        axis=1,
    )  # (R, kh O)
    dw = lax.dot_general(
        ct_shifted,
        x_shifted,
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )  # (kh O, kw C)
    return dw.reshape(kh, o, kw, c).transpose(0, 2, 3, 1)
  # Few input channels (a space-to-depth stem): every shift on x is cheaper.
  rows = total - ((kh - 1) * wp + kw - 1)
  x_shifted = jnp.concatenate(
      [
          flat_x[a * wp + b : a * wp + b + rows]
          for a in range(kh)
          for b in range(kw)
      ],
      axis=1,
  )  # (R, kh kw C)
  dw = lax.dot_general(
      x_shifted,
      flat_ct[:rows],
      (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
  )  # (kh kw C, O)
  return dw.reshape(kh, kw, c, o)


def _space_to_depth_conv(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding
) -> jax.Array:
  """A strided convolution as a stride-1 one on space-to-depth blocks.

  With strides (s_h, s_w), the padded input is cut into s_h x s_w blocks
  stacked on channels, xs[n, u, v, (p, q, c)] = xpad[n, s_h u + p, s_w v + q,
  c], and the kernel, zero-padded to multiples of the strides, likewise:
  ws[a', b', (p, q, c), o] = w[s_h a' + p, s_w b' + q, c, o]. Then

    y[n, i, j, o] = sum_{a', b', (p, q, c)} xs[n, i + a', j + b', (p, q, c)]
                                            * ws[a', b', (p, q, c), o],

  a stride-1 "VALID" convolution (`conv_lax_dw_im2col`).
  """
  kh, kw, c, o = kernel.shape
  sh, sw = strides
  (pt, pb), (pl, pr) = _pad_pairs(padding, (kh, kw))
  n, h, w, _ = x.shape
  out_h = (h + pt + pb - kh) // sh + 1
  out_w = (w + pl + pr - kw) // sw + 1
  blocks_h, blocks_w = -(-kh // sh), -(-kw // sw)  # kernel size in blocks
  rows, cols = out_h + blocks_h - 1, out_w + blocks_w - 1  # input blocks
  # Pad (or crop: rows past the last window are never read) to whole blocks.
  xp = lax.pad(
      x,
      jnp.zeros((), x.dtype),
      (
          (0, 0, 0),
          (pt, sh * rows - h - pt, 0),
          (pl, sw * cols - w - pl, 0),
          (0, 0, 0),
      ),
  )
  xs = xp.reshape(n, rows, sh, cols, sw, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(n, rows, cols, sh * sw * c)
  ks = jnp.pad(
      kernel, ((0, sh * blocks_h - kh), (0, sw * blocks_w - kw), (0, 0), (0, 0))
  )
  ks = ks.reshape(blocks_h, sh, blocks_w, sw, c, o).transpose(0, 2, 1, 3, 4, 5)
  ks = ks.reshape(blocks_h, blocks_w, sh * sw * c, o)
  return conv_lax_dw_im2col(xs, ks, ((0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_space_to_depth(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding
) -> jax.Array:
  """Native strided convolution whose derivatives go through space-to-depth.

  The value is XLA's native strided convolution (fast forward on CPU: the
  7x7/s2 stem at 224 px, batch 32, in about a fifth of im2col's time), but
  its native input gradient is a dilated convolution, pathologically slow on
  XLA:CPU, and its kernel gradient a whole-map window. The derivatives are
  instead those of the same convolution written on space-to-depth blocks
  (`_space_to_depth_conv`): stride-1 native convolutions for the input and
  shifted copies + one matmul for the kernel, at the cost of the kernel's
  zero taps (7x7/s2 -> 4x4 on 12 channels: 1.31x the multiply-adds). They are
  themselves differentiable the same way, so adversarial GA's double
  backprop stays on the fast paths. Suits the 3-channel stem, where im2col's
  49 strided 3-channel slices are slow to gather.

  Args and result as `conv_im2col`; `strides` and `padding` hashable (tuples).
  """
  return conv_lax(x, kernel, strides, padding)


def _conv_space_to_depth_fwd(x, kernel, strides, padding):
  return conv_space_to_depth(x, kernel, strides, padding), (x, kernel)


def _conv_space_to_depth_bwd(strides, padding, residuals, cotangent):
  x, kernel = residuals
  # Only the derivatives of the blocked form are used; its forward value is
  # dead code that XLA removes.
  _, vjp = jax.vjp(
      lambda x, kernel: _space_to_depth_conv(x, kernel, strides, padding),
      x,
      kernel,
  )
  return vjp(cotangent.astype(x.dtype))


conv_space_to_depth.defvjp(_conv_space_to_depth_fwd, _conv_space_to_depth_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_lax_dw_im2col(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  """Stride-1 native convolution whose kernel gradient is im2col + matmul.

  Value and input gradient are XLA's native convolution (fast on CPU for
  stride 1 on maps of 8x8 and more); the kernel gradient is
  `kernel_gradient_im2col`. The input gradient is itself this function on the
  cotangent (flipped, transposed kernel), so a second derivative (adversarial
  GA's double backprop) again takes the fast paths. Equal to
  `conv_lax(x, kernel, (1, 1), padding)` in value and derivatives.

  Args:
    x: (N, H, W, C).
    kernel: (kh, kw, C, O).
    padding: ((top, bottom), (left, right)), each in [0, k - 1] (hashable:
      tuples).
  """
  return conv_lax(x, kernel, (1, 1), padding)


def _conv_lax_dw_im2col_fwd(x, kernel, padding):
  return conv_lax_dw_im2col(x, kernel, padding), (x, kernel)


def _conv_lax_dw_im2col_bwd(padding, residuals, cotangent):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = conv_lax_dw_im2col(
      cotangent.astype(x.dtype),
      flipped,
      ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)),
  )
  dw = kernel_gradient_im2col(x, cotangent.astype(x.dtype), (kh, kw), padding)
  return dx, dw.astype(kernel.dtype)


conv_lax_dw_im2col.defvjp(_conv_lax_dw_im2col_fwd, _conv_lax_dw_im2col_bwd)


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
  (pt, pb), (pl, pr) = _pad_pairs(padding, (kh, kw))
  output_hw = (
      (input_hw[0] + pt + pb - kh) // strides[0] + 1,
      (input_hw[1] + pl + pr - kw) // strides[1] + 1,
  )
  chosen = resolve_conv_implementation(
      implementation,
      kernel_size=kernel_size,
      strides=strides,
      output_hw=output_hw,
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
        return lambda x, kernel: conv_im2col(x, kernel, strides, padding)
      raise ValueError(
          "conv implementation 'lax_dw_im2col' needs stride 1 "
          f"and paddings in [0, k - 1], got strides {strides} "
          f"and padding {pads} for a {kh}x{kw} kernel"
      )
    return lambda x, kernel: conv_lax_dw_im2col(x, kernel, pads)
  if chosen == "space_to_depth":
    return lambda x, kernel: conv_space_to_depth(
        x, kernel, tuple(strides), pads
    )
  formulation = {"lax": conv_lax, "im2col": conv_im2col}[chosen]
  return lambda x, kernel: formulation(x, kernel, strides, padding)


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
    kernel = self.param(
        "kernel",
        self.kernel_init,
        (*self.kernel_size, x.shape[-1], self.features),
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
    )(x, kernel)
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
