"""Convolution formulations: one NHWC/HWIO convolution, computed four ways.

Each function computes `lax.conv_general_dilated(x, kernel, strides,
padding)` with NHWC/HWIO/NHWC dimensions and float32 accumulation:

  `conv_lax`            XLA's native convolution and its native derivatives;
  `conv_im2col`         slice-im2col: pad, take the k*k strided slices,
                        stack them on the channel axis, one matmul; its
                        gradient is pads, slices and matmuls;
  `conv_lax_dw_im2col`  (stride 1) native convolution and input gradient,
                        kernel gradient as shifted copies + one matmul
                        (`kernel_gradient_im2col`), or oneDNN's direct
                        kernel where the `cpu-onednn` extra is installed
                        (`irtf_jax.models.onednn`);
  `conv_space_to_depth` (strided) native convolution, derivatives through
                        s x s blocks stacked on channels and a stride-1
                        `conv_lax_dw_im2col` convolution.

They take the same kernel and give equal values and derivatives (any order)
up to float rounding. Which one a `layers.Conv` uses is chosen per backend and
shape by `layers.resolve_conv_implementation`. `tiled_input_conv` is the
share of channels that hold the same features at every position
(`layers.Conv`'s `tiled` input).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from irtf_jax.models import onednn


def padding_pairs(padding, kernel_size):
  """The explicit (before, after) padding of each spatial axis.

  "SAME" gives ((k - 1) // 2, k // 2) for each kernel size k (whatever the
  stride), an int p gives (p, p), and explicit pairs come back as tuples.
  """
  if isinstance(padding, str):
    if padding != "SAME":
      raise ValueError(f"padding {padding!r}: only 'SAME' or explicit pairs")
    return [((k - 1) // 2, k // 2) for k in kernel_size]
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel_size)
  return [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding]


def output_hw(input_hw, kernel_size, strides, padding) -> tuple[int, int]:
  """(H', W') of a convolution of an H x W map (any padding form that
  `padding_pairs` takes)."""
  pads = padding_pairs(padding, kernel_size)
  return tuple(
      (size + before + after - k) // stride + 1
      for size, (before, after), k, stride in zip(
          input_hw, pads, kernel_size, strides
      )
  )


def stack_channels(parts: Sequence[jax.Array]) -> jax.Array:
  """`jnp.concatenate(parts, axis=-1)` of equally shaped arrays, built as a
  stack on a new second-to-last axis and reshaped.

  The two are equal element for element, but XLA:CPU compiles them
  differently: a concatenation of slices becomes a concatenate operation
  whose operands are first copied out one by one, a stack of them one fused
  loop that reads each slice in place. For the kernel gradient's shifted
  copies of two 56 x 56 x 64 images that was 0.33 ms against 2.9 ms. XLA:CPU
  fuses a stack of at most 8 parts (jaxlib 0.10.2): callers with more, such
  as a 3 x 3 window's taps, stack in two stages (the columns' shifts, then
  the rows' shifts of that), which for 7 x 7 x 1024 patches took 18 ms
  against 32 ms for one stack of 9.
  """
  stacked = jnp.stack(parts, axis=-2)
  return stacked.reshape(stacked.shape[:-2] + (-1,))


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
  (pt, pb), (pl, pr) = padding_pairs(padding, (kh, kw))
  n = x.shape[0]
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out_h, out_w = output_hw(x.shape[1:3], (kh, kw), strides, padding)
  if kh == kw == 1:
    patches = xp[:, : (out_h - 1) * sh + 1 : sh, : (out_w - 1) * sw + 1 : sw, :]
  else:
    # Two stages (`stack_channels`): the kw column taps, then the kh row
    # taps of those; channels end up ordered (a, b, c) as the kernel's rows.
    columns = stack_channels([
        lax.slice(
            xp,
            (0, 0, b, 0),
            (n, xp.shape[1], b + (out_w - 1) * sw + 1, c),
            (1, 1, sw, 1),
        )
        for b in range(kw)
    ])  # (N, Hpad, W', kw C)
    patches = stack_channels([
        lax.slice(
            columns,
            (0, a, 0, 0),
            (n, a + (out_h - 1) * sh + 1, out_w, kw * c),
            (1, sh, 1, 1),
        )
        for a in range(kh)
    ])
  return jnp.dot(
      patches,
      kernel.reshape(kh * kw * c, o),
      preferred_element_type=jnp.float32,
  ).astype(x.dtype)


def tiled_input_conv(
    vector: jax.Array,
    kernel: jax.Array,
    input_hw: Sequence[int],
    strides: Sequence[int],
    padding,
) -> jax.Array:
  """The convolution of a map that holds the same features at every position.

  With xpad[n, r, s, d] = vector[n, d] inside the H x W map and 0 in the
  padding,

    y[n, i, j, o] = sum_{a, b} valid_h[i, a] valid_w[j, b]
                               sum_d vector[n, d] kernel[a, b, d, o],

  where valid_h[i, a] says whether input row s_h i - pad_top + a lies inside
  the map (valid_w likewise): one (N, D) x (D, kh kw O) product and a masked
  sum over the taps, instead of a convolution over N H W positions. A text
  feature tiled over an image map and concatenated on channels (TIRG) is such
  a map; for TIRG-LastConv's 3 x 3 convolutions at 7 x 7 x (512 + 512) this
  removes half their multiply-adds.

  Args:
    vector: (N, D) features at every position.
    kernel: (kh, kw, D, O) weights.
    input_hw: (H, W) of the map.
    strides: (s_h, s_w).
    padding: "SAME" or ((top, bottom), (left, right)).

  Returns:
    (N, H', W', O) float32, equal to `lax.conv_general_dilated` of the tiled
    map.
  """
  kh, kw = kernel.shape[:2]
  (pt, _), (pl, _) = padding_pairs(padding, (kh, kw))
  out_h, out_w = output_hw(input_hw, (kh, kw), strides, padding)

  def valid(size, out, pad_before, k, stride):
    rows = stride * np.arange(out)[:, None] - pad_before + np.arange(k)
    return jnp.asarray((rows >= 0) & (rows < size), jnp.float32)

  valid_h = valid(input_hw[0], out_h, pt, kh, strides[0])
  valid_w = valid(input_hw[1], out_w, pl, kw, strides[1])
  per_tap = jnp.einsum(
      "nd,abdo->nabo", vector, kernel, preferred_element_type=jnp.float32
  )
  return jnp.einsum("ia,jb,nabo->nijo", valid_h, valid_w, per_tap)


def conv_lax(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=tuple(strides),
      padding=padding_pairs(padding, kernel.shape[:2]),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32,
  ).astype(x.dtype)


# The kernel gradient's shifted copies are built and contracted a few images
# at a time, at least this many bytes of them per chunk (`images_per_chunk`).
KERNEL_GRADIENT_CHUNK_BYTES = 2 * 2**20


def images_per_chunk(images: int, bytes_per_image: int) -> int:
  """How many images of a batch `kernel_gradient_im2col` takes at a time.

  The fewest, but at least 2, that divide `images` and whose shifted copies
  make at least `KERNEL_GRADIENT_CHUNK_BYTES`; all of them when no smaller
  divisor does.
  """
  for count in range(2, images):
    if images % count == 0 and (
        count * bytes_per_image >= KERNEL_GRADIENT_CHUNK_BYTES
    ):
      return count
  return images


def default_chunk_images(images: int, bytes_per_image: int) -> int:
  """`kernel_gradient_im2col`'s chunk when none is given: `images_per_chunk`
  in a process with one device, the whole batch with more.

  With more devices the program may be partitioned over them (the "jit"
  data-parallel strategy shards the batch), and a `lax.scan` over chunks of
  a sharded batch makes GSPMD move chunks between devices inside the loop
  (collective permutes). With 8 host CPU devices on 2 cores a run hung
  there, 7 of 8 device threads waiting in a collective permute.
  """
  if jax.device_count() > 1:
    return images
  return images_per_chunk(images, bytes_per_image)


def _shift_placement(kernel_size, channels: int, out_channels: int):
  """Where `kernel_gradient_im2col` puts the shifts, and the columns of
  shifted copies per row of the padded grid: "split" (kh row shifts of the
  cotangent, kw column shifts of the input) or "input" (all kh kw shifts on
  the input, the cotangent once), whichever copies less."""
  kh, kw = kernel_size
  split = kh * out_channels + kw * channels
  on_input = kh * kw * channels + out_channels
  return ("split", split) if split <= on_input else ("input", on_input)


def kernel_gradient_im2col(
    x: jax.Array,
    cotangent: jax.Array,
    kernel_size: Sequence[int],
    padding,
    chunk_images: int | None = None,
) -> jax.Array:
  """Gradient w.r.t. the kernel of a stride-1 convolution, as matmuls.

    dw[a, b, c, o] = sum_{n, i, j} xpad[n, i + a, j + b, c] * ct[n, i, j, o]

  XLA:CPU computes this natively as a convolution whose window is the whole
  output map, several times slower than the forward convolution at 56x56 or
  28x28. Here the shift is split between the two sides: with r = i + a,

    dw[a, b] = sum_{n, r, j} xpad[n, r, j + b] ct[n, r - a, j]

  (ct zero outside its H' rows), so xpad shifted by the kw column offsets is
  stacked on channels (N, H + pads, W', kw C), ct shifted by the kh row
  offsets likewise (N, H + pads, W', kh O), and one matmul contracting every
  (n, r, j) gives every tap: kh + kw shifted copies instead of im2col's
  kh kw, and no transposed copy (XLA:CPU's transposes are slow). Only the
  kh - 1 padding rows are contracted in vain: 14% of the products at
  14 x 14, against 31% with both shifts on the flattened padded grid below
  (layer3's kernel gradient at 224 px: 44 against 50 CPU-ms). When that
  copies more than shifting xpad by all kh kw taps (few input channels, as
  in a space-to-depth stem), all shifts go on xpad, along the rows q of the
  flattened padded grid of Wp columns: tap (a, b) pairs ct row q (ct padded
  with zeros to the grid) with xpad row q + a Wp + b; rows of ct beyond the
  output map are zero, so shifts that wrap into the next image row or image
  contribute nothing.

  The batch is taken `chunk_images` images at a time (`lax.scan`, summing
  the chunks' matmuls), by default the fewest that make a few MiB of shifted
  copies (`default_chunk_images`): copies the size of the whole batch (325 MB
  for the 224 px stem at batch 32) go to memory and back, a chunk's stay in
  the CPU's cache. On the 2-core CPU at 224 px, batch 32, that made the
  stem's kernel gradient 2.0x and layer1's 2.4x faster (2 images a chunk).

  Args:
    x: (N, H, W, C) input of the convolution.
    cotangent: (N, H', W', O) cotangent of its output.
    kernel_size: (kh, kw).
    padding: "SAME" or ((top, bottom), (left, right)), each at most k - 1.
    chunk_images: images per chunk, a divisor of N (None: automatic).

  Returns:
    (kh, kw, C, O) float32.
  """
  kh, kw = kernel_size
  (pt, pb), (pl, pr) = padding_pairs(padding, (kh, kw))
  n, h, w, c = x.shape
  o = cotangent.shape[-1]
  placement, columns = _shift_placement(kernel_size, c, o)
  if chunk_images is None:
    grid_rows = (h + pt + pb) * (w + pl + pr)
    chunk_images = default_chunk_images(
        n, grid_rows * columns * jnp.dtype(x.dtype).itemsize
    )
  if n % chunk_images:
    raise ValueError(
        f"chunk_images={chunk_images} does not divide the batch of {n}"
    )
  contract = functools.partial(
      _kernel_gradient_rows,
      kernel_size=(kh, kw),
      padding=((pt, pb), (pl, pr)),
      placement=placement,
  )
  if chunk_images == n:
    return contract(x, cotangent)

  def accumulate(dw, chunk):
    return dw + contract(*chunk), None

  chunks = n // chunk_images
  dw, _ = lax.scan(
      accumulate,
      jnp.zeros((kh, kw, c, o), jnp.float32),
      (
          x.reshape((chunks, chunk_images) + x.shape[1:]),
          cotangent.reshape((chunks, chunk_images) + cotangent.shape[1:]),
      ),
  )
  return dw


def _kernel_gradient_rows(x, cotangent, kernel_size, padding, placement):
  """`kernel_gradient_im2col` of one chunk: the shifted copies, one matmul."""
  kh, kw = kernel_size
  (pt, pb), (pl, pr) = padding
  n, _, _, c = x.shape
  o = cotangent.shape[-1]
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  hp, wp = xp.shape[1:3]
  out_h, out_w = cotangent.shape[1:3]
  if placement == "split":
    # Column shifts on x, row shifts on ct: kh + kw copies.
    x_shifted = stack_channels(
        [xp[:, :, b : b + out_w] for b in range(kw)]
    )  # (N, hp, W', kw C)
    # ct[r - a] for r < hp: kh - 1 zero rows on either side cover every a.
    ctp = jnp.pad(cotangent, ((0, 0), (kh - 1, kh - 1), (0, 0), (0, 0)))
    ct_shifted = stack_channels(
        [ctp[:, kh - 1 - a : kh - 1 - a + hp] for a in range(kh)]
    )  # (N, hp, W', kh O)
    dw = lax.dot_general(
        ct_shifted.reshape(-1, kh * o),
        x_shifted.reshape(-1, kw * c),
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )  # (kh O, kw C)
    return dw.reshape(kh, o, kw, c).transpose(0, 2, 3, 1)
  ctp = jnp.pad(cotangent, ((0, 0), (0, hp - out_h), (0, wp - out_w), (0, 0)))
  total = n * hp * wp
  flat_x = xp.reshape(total, c)
  flat_ct = ctp.reshape(total, o)
  # Few input channels (a space-to-depth stem): every shift on x is cheaper.
  rows = total - ((kh - 1) * wp + kw - 1)
  # Two stages (`stack_channels`): the kw column shifts, then the kh row
  # shifts of those, so that channels are ordered (a, b, c).
  columns = stack_channels(
      [flat_x[b : b + rows + (kh - 1) * wp] for b in range(kw)]
  )  # (R + (kh - 1) W', kw C)
  x_shifted = stack_channels(
      [columns[a * wp : a * wp + rows] for a in range(kh)]
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
  (pt, pb), (pl, pr) = padding_pairs(padding, (kh, kw))
  n, h, w, _ = x.shape
  out_h, out_w = output_hw((h, w), (kh, kw), strides, padding)
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
  `kernel_gradient_im2col`, or oneDNN's where `onednn.applies`. The input
  gradient is itself this function on the cotangent (flipped, transposed
  kernel), so a second derivative (adversarial GA's double backprop) again
  takes the fast paths. Equal to `conv_lax(x, kernel, (1, 1), padding)` in
  value and derivatives.

  Args:
    x: (N, H, W, C).
    kernel: (kh, kw, C, O).
    padding: ((top, bottom), (left, right)), each in [0, k - 1] (hashable:
      tuples).
  """
  return conv_lax(x, kernel, (1, 1), padding)


def _conv_lax_dw_im2col_fwd(x, kernel, padding):
  return conv_lax_dw_im2col(x, kernel, padding), (x, kernel)


def _stride1_kernel_gradient(x, cotangent, kernel_size, strides, padding):
  """`kernel_gradient_im2col` (oneDNN's reference at stride 1)."""
  del strides  # (1, 1)
  return kernel_gradient_im2col(x, cotangent, kernel_size, padding)


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
  cotangent = cotangent.astype(x.dtype)
  if onednn.applies(x, cotangent):
    dw = onednn.kernel_gradient(
        x, cotangent, (kh, kw), (1, 1), padding, _stride1_kernel_gradient
    )
  else:
    dw = kernel_gradient_im2col(x, cotangent, (kh, kw), padding)
  return dx, dw.astype(kernel.dtype)


conv_lax_dw_im2col.defvjp(_conv_lax_dw_im2col_fwd, _conv_lax_dw_im2col_bwd)
