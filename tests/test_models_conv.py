"""Every convolution formulation against lax.conv_general_dilated, values and
gradients.

Two kinds of check: random normal data against the native convolution at
HIGHEST precision (the original float tolerances), and small-integer data on
which every formulation must give exactly the native result, first and second
derivatives included: products and sums of small integers are exact in
float32 (checked below), so any summation order gives the same bits and no
tolerance is needed."""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from irtf_jax.models import conv

HIGHEST = lax.Precision.HIGHEST


def reference_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=strides,
      padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=HIGHEST,
  )


CASES = [  # (N, H, W, C, O, k, stride, padding)
    (2, 7, 9, 3, 4, 1, 2, ((0, 0), (0, 0))),
    (2, 7, 9, 5, 4, 3, 1, ((1, 1), (1, 1))),
    (2, 7, 9, 5, 4, 3, 2, ((1, 1), (1, 1))),
    (2, 11, 13, 3, 6, 7, 2, ((3, 3), (3, 3))),
    (1, 5, 6, 4, 3, 3, 2, "SAME"),
    # Uneven paddings at both ends of [0, k - 1]; stride 3; few channels and
    # many output channels (the other branch of kernel_gradient_im2col).
    (2, 6, 5, 2, 3, 3, 1, ((0, 2), (2, 0))),
    (1, 8, 7, 12, 16, 4, 1, ((0, 0), (0, 0))),
    (2, 10, 9, 3, 4, 3, 3, ((1, 2), (0, 1))),
]


FORMULATIONS = ("lax", "im2col", "lax_dw_im2col", "space_to_depth")


def case_id(case):
  return f"{case[1]}x{case[2]}k{case[5]}s{case[6]}"


def covers(implementation, case) -> bool:
  """lax_dw_im2col is a stride-1 formulation, space_to_depth a strided one;
  the others cover every case."""
  stride = case[6]
  if implementation == "lax_dw_im2col":
    return stride == 1
  if implementation == "space_to_depth":
    return stride != 1
  return True


# Every (formulation, case) pair the formulation covers.
FORMULATION_CASES = [
    pytest.param(implementation, case, id=f"{implementation}-{case_id(case)}")
    for case in CASES
    for implementation in FORMULATIONS
    if covers(implementation, case)
]


def formulation(implementation, case):
  """`(x, kernel) -> y` of `implementation` for `case`."""
  _, _, _, _, _, k, s, padding = case
  pads = tuple(conv.padding_pairs(padding, (k, k)))
  return {
      "lax": lambda x, w: conv.conv_lax(x, w, (s, s), padding),
      "im2col": lambda x, w: conv.conv_im2col(x, w, (s, s), padding),
      "lax_dw_im2col": lambda x, w: conv.conv_lax_dw_im2col(x, w, pads),
      "space_to_depth": lambda x, w: conv.conv_space_to_depth(
          x, w, (s, s), pads
      ),
  }[implementation]


@pytest.mark.parametrize("implementation, case", FORMULATION_CASES)
def test_conv_matches_lax_values_and_gradients(implementation, case):
  n, h, w, c, o, k, s, padding = case
  kx, kw, kc = jax.random.split(jax.random.key(k * 10 + s), 3)
  x = jax.random.normal(kx, (n, h, w, c))
  kernel = jax.random.normal(kw, (k, k, c, o))
  explicit = conv.padding_pairs(padding, (k, k))
  convolution = formulation(implementation, case)
  with jax.default_matmul_precision("highest"):
    y, vjp = jax.vjp(convolution, x, kernel)
  y_ref, vjp_ref = jax.vjp(
      lambda x, w: reference_conv(x, w, (s, s), explicit), x, kernel
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kc, y_ref.shape)
  with jax.default_matmul_precision("highest"):
    dx, dw = vjp(cotangent)
  dx_ref, dw_ref = vjp_ref(cotangent)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


def integer_problem(case, seed):
  """Sparse {-1, 0, 1} input, kernel and output weights for `case`."""
  n, h, w, c, o, k, _, _ = case
  rng = np.random.default_rng(seed)
  draw = lambda shape: jnp.asarray(
      rng.choice([-1.0, 0.0, 0.0, 1.0], size=shape).astype(np.float32)
  )
  return draw((n, h, w, c)), draw((k, k, c, o))


def assert_exact_and_equal(value, reference):
  """Equal bits, on values that are exact integers in float32."""
  reference = np.asarray(reference)
  assert np.all(np.abs(reference) < 2.0**24), "float32 no longer exact"
  np.testing.assert_array_equal(np.asarray(value), reference)


@pytest.mark.parametrize("implementation, case", FORMULATION_CASES)
def test_conv_equals_lax_exactly_to_second_order_on_integers(
    implementation, case
):
  """Value, gradient and the double backprop of an input-gradient penalty
  (adversarial GA's shape: d/dw of |dL/dx|^2) equal the native ones."""
  _, _, _, _, _, k, s, padding = case
  x, kernel = integer_problem(case, seed=k * 10 + s)
  convolution = formulation(implementation, case)
  native = lambda x, w: conv.conv_lax(x, w, (s, s), padding)

  def derivatives(convolution):
    loss = lambda x, w: 0.5 * jnp.sum(convolution(x, w) ** 2)
    penalty = lambda x, w: 0.5 * jnp.sum(jax.grad(loss)(x, w) ** 2)
    with jax.default_matmul_precision("highest"):
      return (
          convolution(x, kernel),
          jax.grad(loss, argnums=(0, 1))(x, kernel),
          jax.grad(penalty, argnums=(0, 1))(x, kernel),
      )

  for value, reference in zip(
      jax.tree.leaves(derivatives(convolution)),
      jax.tree.leaves(derivatives(native)),
  ):
    assert_exact_and_equal(value, reference)


@pytest.mark.parametrize(
    "chunk_images", [None, 1, 2], ids=lambda n: f"chunk{n}"
)
@pytest.mark.parametrize(
    "channels", [(5, 4), (2, 16)], ids=["shift_both", "shift_input"]
)
def test_kernel_gradient_im2col_equals_the_native_kernel_gradient(
    channels, chunk_images
):
  """Both placements of the shifts (split between input and cotangent, or all
  on the input when it has few channels), the batch in one piece or in
  chunks of 1 or 2 images, against lax's transpose rule."""
  c, o = channels
  rng = np.random.default_rng(c)
  x = jnp.asarray(rng.integers(-2, 3, (4, 6, 7, c)).astype(np.float32))
  padding = ((1, 0), (2, 1))
  y, vjp = jax.vjp(
      lambda w: conv.conv_lax(x, w, (1, 1), padding), jnp.zeros((3, 3, c, o))
  )
  cotangent = jnp.asarray(rng.integers(-2, 3, y.shape).astype(np.float32))
  with jax.default_matmul_precision("highest"):
    assert_exact_and_equal(
        conv.kernel_gradient_im2col(
            x, cotangent, (3, 3), padding, chunk_images=chunk_images
        ),
        vjp(cotangent)[0],
    )


def test_kernel_gradient_im2col_rejects_a_chunk_that_does_not_divide():
  x = jnp.zeros((4, 5, 5, 2))
  with pytest.raises(ValueError, match="chunk_images=3 does not divide"):
    conv.kernel_gradient_im2col(
        x, jnp.zeros((4, 5, 5, 3)), (3, 3), "SAME", chunk_images=3
    )


@pytest.mark.parametrize(
    "images, bytes_per_image, expected",
    [
        (32, 5 << 20, 2),  # 224 px layer1: 5 MiB an image -> 2 images
        (32, 1 << 20, 2),  # exactly the budget at 2 images
        (32, (1 << 20) - 1, 4),  # just short at 2 -> the next divisor
        (200, 300 << 10, 8),  # 64 px, batch 200: 7 would do, 8 divides
        (7, 1 << 10, 7),  # no divisor reaches the budget: the whole batch
        (2, 10 << 20, 2),  # never fewer than 2 images unless the batch is
        (1, 10 << 20, 1),
    ],
)
def test_images_per_chunk_is_the_least_divisor_reaching_the_budget(
    images, bytes_per_image, expected
):
  assert conv.KERNEL_GRADIENT_CHUNK_BYTES == 2 << 20
  assert conv.images_per_chunk(images, bytes_per_image) == expected


@pytest.mark.parametrize(
    "implementation, case",
    [
        ("lax_dw_im2col", (4, 7, 9, 5, 4, 3, 1, ((1, 1), (1, 1)))),
        ("space_to_depth", (4, 11, 13, 3, 6, 7, 2, ((3, 3), (3, 3)))),
    ],
    ids=["lax_dw_im2col", "space_to_depth"],
)
def test_chunked_kernel_gradients_equal_lax_exactly_to_second_order(
    implementation, case, monkeypatch
):
  """With a budget of one byte every kernel gradient is taken 2 images at a
  time (`lax.scan`); first and second derivatives stay exactly native."""
  monkeypatch.setattr(conv, "KERNEL_GRADIENT_CHUNK_BYTES", 1)
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # the suite has 8
  assert conv.default_chunk_images(4, 1) == 2
  test_conv_equals_lax_exactly_to_second_order_on_integers(implementation, case)


def test_kernel_gradients_are_not_chunked_when_the_batch_may_be_sharded(
    monkeypatch,
):
  """With more than one device the batch goes in one piece: a scan over
  chunks of a batch sharded over the devices ("jit" data parallelism) puts
  collective permutes inside the loop, which deadlocked XLA:CPU."""
  assert jax.device_count() == 8  # tests/conftest.py
  monkeypatch.setattr(conv, "KERNEL_GRADIENT_CHUNK_BYTES", 1)
  assert conv.default_chunk_images(16, 1) == 16
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jnp.ones((16, 6, 6, 3))
  kernel = jnp.ones((3, 3, 3, 4))
  grad = jax.jit(
      jax.grad(
          lambda w, x: jnp.sum(
              conv.conv_lax_dw_im2col(x, w, ((1, 1), (1, 1))) ** 2
          )
      ),
      in_shardings=(replicated, batch),
  )
  hlo = grad.lower(kernel, x).compile().as_text()
  # No loop over chunks, and no exchange between devices but the sum of the
  # devices' kernel gradients: every shift stays inside an image.
  assert " while(" not in hlo
  assert "collective-permute" not in hlo
  assert "all-reduce" in hlo


@pytest.mark.parametrize(
    "shape, parts", [((7, 3), 3), ((2, 5, 4, 6), 9), ((4, 1), 1)]
)
def test_stack_channels_is_concatenation_on_the_last_axis(shape, parts):
  """Element for element, and so is its transpose (the gradient)."""
  rng = np.random.default_rng(parts)
  arrays = [
      jnp.asarray(rng.normal(size=shape).astype(np.float32))
      for _ in range(parts)
  ]
  expected = jnp.concatenate(arrays, axis=-1)
  np.testing.assert_array_equal(conv.stack_channels(arrays), expected)
  cotangent = jnp.asarray(rng.normal(size=expected.shape).astype(np.float32))
  _, vjp = jax.vjp(lambda *a: conv.stack_channels(a), *arrays)
  for got, want in zip(vjp(cotangent), jnp.split(cotangent, parts, axis=-1)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "hw, k, stride, padding",
    [
        ((7, 7), 3, 1, ((1, 1), (1, 1))),  # TIRG-LastConv's conv1
        ((6, 5), 3, 2, ((1, 1), (0, 2))),
        ((5, 8), 2, 1, ((0, 1), (1, 0))),
        ((9, 9), 5, 3, "SAME"),
    ],
)
def test_tiled_input_conv_equals_the_convolution_of_the_tiled_map(
    hw, k, stride, padding
):
  """Values and both gradients, exactly on integers: the masks count each
  tap only where it lands inside the map, as zero padding does."""
  rng = np.random.default_rng(k * 10 + stride)
  vector = jnp.asarray(rng.integers(-2, 3, (3, 4)).astype(np.float32))
  kernel = jnp.asarray(rng.integers(-2, 3, (k, k, 4, 5)).astype(np.float32))

  def tiled_map_conv(vector, kernel):
    tiled = jnp.broadcast_to(vector[:, None, None, :], (3, *hw, 4))
    return reference_conv(
        tiled, kernel, (stride, stride), conv.padding_pairs(padding, (k, k))
    )

  def direct(vector, kernel):
    return conv.tiled_input_conv(vector, kernel, hw, (stride, stride), padding)

  want, want_vjp = jax.vjp(tiled_map_conv, vector, kernel)
  got, got_vjp = jax.vjp(direct, vector, kernel)
  assert_exact_and_equal(got, want)
  cotangent = jnp.asarray(rng.integers(-2, 3, want.shape).astype(np.float32))
  for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
    assert_exact_and_equal(g, w)
