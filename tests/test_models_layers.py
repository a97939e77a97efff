"""layers: the per-backend, per-shape choice of convolution formulation, the
Conv module built on it, and the slice max-pool against flax's, values and
gradients. The formulations themselves are checked in test_models_conv.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irtf_jax.models import conv
from irtf_jax.models import layers


@pytest.mark.parametrize(
    "implementation, formulation, strides",
    [
        ("lax", conv.conv_lax, (2, 2)),
        ("im2col", conv.conv_im2col, (2, 2)),
        ("lax_dw_im2col", conv.conv_lax_dw_im2col, (1, 1)),
        ("space_to_depth", conv.conv_space_to_depth, (2, 2)),
    ],
)
def test_conv_function_computes_the_formulation_it_names(
    implementation, formulation, strides
):
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  pads = ((1, 1), (1, 1))
  chosen = layers.conv_function(
      implementation,
      kernel_size=(3, 3),
      strides=strides,
      padding=pads,
      input_hw=(9, 7),
      in_channels=3,
  )
  if implementation == "lax_dw_im2col":
    expected = formulation(x, kernel, pads)
  else:
    expected = formulation(x, kernel, strides, pads)
  np.testing.assert_array_equal(chosen(x, kernel), expected)


def test_conv_function_rejects_what_a_formulation_cannot_compute():
  with pytest.raises(ValueError, match="needs stride 1"):
    layers.conv_function(
        "lax_dw_im2col",
        kernel_size=(3, 3),
        strides=(2, 2),
        padding="SAME",
        input_hw=(8, 8),
    )
  with pytest.raises(ValueError, match="paddings in"):
    layers.conv_function(
        "lax_dw_im2col",
        kernel_size=(3, 3),
        strides=(1, 1),
        padding=((3, 0), (0, 0)),
        input_hw=(8, 8),
    )


def test_conv_module_auto_equals_lax_on_a_resnet_sized_stack():
  """ "auto" mixes formulations per shape; the module's outputs and parameter
  gradients equal the all-lax module's."""

  def stack(impl):
    class Stack(nn.Module):

      @nn.compact
      def __call__(self, x):
        x = layers.Conv(
            8, (7, 7), (2, 2), ((3, 3), (3, 3)), implementation=impl
        )(
            x
        )  # RGB stem: space_to_depth
        x = layers.Conv(
            8, (3, 3), (2, 2), ((1, 1), (1, 1)), implementation=impl
        )(
            x
        )  # strided: im2col
        # 8x8, stride 1: lax_dw_im2col
        x = layers.Conv(8, (3, 3), implementation=impl)(x)
        x = layers.Conv(
            8, (1, 1), (2, 2), ((0, 0), (0, 0)), implementation=impl
        )(
            x
        )  # 1x1: im2col
        return layers.Conv(4, (3, 3), implementation=impl)(x)  # 4x4: im2col

    return Stack()

  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = stack("lax").init(jax.random.key(1), x)

  def loss(params, impl):
    return jnp.sum(jnp.tanh(stack(impl).apply(params, x)))

  with jax.default_matmul_precision("highest"):
    value, grads = jax.value_and_grad(loss)(params, "auto")
    value_ref, grads_ref = jax.value_and_grad(loss)(params, "lax")
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


# (kernel, stride, output size, input channels, backend) -> formulation.
RESOLUTIONS = [
    (3, 1, 8, None, "cpu", "lax_dw_im2col"),
    (7, 2, 112, 3, "cpu", "space_to_depth"),
    (3, 2, 28, 64, "cpu", "im2col"),
    (1, 2, 28, 3, "cpu", "im2col"),
    (3, 2, 16, None, "cpu", "im2col"),
    (3, 1, 4, None, "cpu", "im2col"),
    (1, 1, 32, None, "cpu", "im2col"),
    (3, 2, 2, None, "gpu", "lax"),
]


@pytest.mark.parametrize(
    "kernel, stride, size, in_channels, backend, expected", RESOLUTIONS
)
def test_resolve_conv_implementation_per_backend_and_shape(
    kernel, stride, size, in_channels, backend, expected
):
  options = {} if in_channels is None else {"in_channels": in_channels}
  resolved = layers.resolve_conv_implementation(
      "auto",
      kernel_size=(kernel, kernel),
      strides=(stride, stride),
      output_hw=(size, size),
      backend=backend,
      **options,
  )
  assert resolved == expected


def test_resolve_conv_implementation_explicit_and_unknown():
  resolve = layers.resolve_conv_implementation
  assert resolve("im2col", backend="gpu") == "im2col"
  with pytest.raises(ValueError, match="config.model.conv_implementation"):
    resolve("winograd")


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 8, 8, 2)])
def test_max_pool_matches_flax_values_and_gradients(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  # Ties: equal values inside one window (ReLU zeros and a repeated maximum),
  # where the gradient must go to the first maximum only.
  x = (
      x.at[:, :3, :3, :]
      .set(0.0)
      .at[:, 4, 4, :]
      .set(5.0)
      .at[:, 4, 5, :]
      .set(5.0)
  )
  reference = lambda x: nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(layers.max_pool(x), reference(x))
  weights = jax.random.normal(jax.random.key(1), reference(x).shape)
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x) * weights))(x)
  grad_ref = jax.grad(lambda x: jnp.sum(reference(x) * weights))(x)
  np.testing.assert_array_equal(grad, grad_ref)


@pytest.mark.parametrize(
    "shape, window, stride, padding",
    [
        ((2, 9, 11, 3), 3, 2, 1),  # ResNet's stem pool, odd sizes
        ((2, 8, 8, 2), 2, 2, 0),  # windows that do not overlap
        ((1, 7, 6, 2), 3, 1, 1),  # stride 1: every pixel in 9 windows
        ((2, 10, 9, 2), 3, 3, 0),  # rows and columns no window covers
        ((2, 13, 12, 2), 5, 2, 2),
    ],
)
def test_max_pool_gradients_equal_flax_to_second_order(
    shape, window, stride, padding
):
  """On small integers (many ties; sums of them are exact in float32, so the
  order in which overlapping windows add up cannot matter): the gradient,
  and the derivative of a function of the gradient w.r.t. the cotangent's
  weights, which double backpropagation (the adversarial penalty) takes."""
  rng = np.random.default_rng(window * 10 + stride)
  x = jnp.asarray(rng.integers(-2, 3, shape).astype(np.float32))

  def reference(x):
    return nn.max_pool(
        x, (window, window), (stride, stride), ((padding, padding),) * 2
    )

  def pool(x):
    return layers.max_pool(x, window, stride, padding)

  np.testing.assert_array_equal(pool(x), reference(x))
  weights = jnp.asarray(
      rng.integers(-3, 4, reference(x).shape).astype(np.float32)
  )
  probe = jnp.asarray(rng.integers(-3, 4, shape).astype(np.float32))

  def second_order(pool_fn):
    def input_grad_probe(weights):
      grad = jax.grad(lambda x: jnp.sum(pool_fn(x) * weights))(x)
      return jnp.sum(grad * probe)

    return jax.grad(input_grad_probe)(weights)

  np.testing.assert_array_equal(
      jax.grad(lambda x: jnp.sum(pool(x) * weights))(x),
      jax.grad(lambda x: jnp.sum(reference(x) * weights))(x),
  )
  got, want = second_order(pool), second_order(reference)
  assert np.any(np.asarray(want) != 0)
  np.testing.assert_array_equal(got, want)


def test_conv_with_tiled_channels_equals_the_conv_of_the_concatenated_map():
  """The same parameters (the kernel has C + D input channels either way),
  the same output and gradients, as convolving [x, tiled] on channels."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(-2, 3, (2, 7, 7, 3)).astype(np.float32))
  text = jnp.asarray(rng.integers(-2, 3, (2, 4)).astype(np.float32))
  full = jnp.concatenate(
      [x, jnp.broadcast_to(text[:, None, None, :], (2, 7, 7, 4))], axis=-1
  )
  layer = layers.Conv(5, (3, 3), padding=((1, 1), (1, 1)))
  params = layer.init(jax.random.key(0), full)
  params = jax.tree.map(
      lambda p: jnp.asarray(rng.integers(-2, 3, p.shape).astype(np.float32)),
      params,
  )
  assert jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x, text)) == (
      jax.tree.map(jnp.shape, params)
  )

  def tiled(params, x, text):
    return jnp.sum(layer.apply(params, x, text) ** 2)

  def concatenated(params, x, text):
    m = jnp.concatenate(
        [x, jnp.broadcast_to(text[:, None, None, :], (2, 7, 7, 4))], axis=-1
    )
    return jnp.sum(layer.apply(params, m) ** 2)

  with jax.default_matmul_precision("highest"):
    np.testing.assert_array_equal(
        layer.apply(params, x, text), layer.apply(params, full)
    )
    got = jax.grad(tiled, argnums=(0, 1, 2))(params, x, text)
    want = jax.grad(concatenated, argnums=(0, 1, 2))(params, x, text)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)
