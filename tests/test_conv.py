"""Every convolution formulation against lax.conv_general_dilated, and the
slice max-pool against flax's, values and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from irtf_jax.models import layers

HIGHEST = lax.Precision.HIGHEST


def reference_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)


CASES = [  # (N, H, W, C, O, k, stride, padding)
    (2, 7, 9, 3, 4, 1, 2, ((0, 0), (0, 0))),
    (2, 7, 9, 5, 4, 3, 1, ((1, 1), (1, 1))),
    (2, 7, 9, 5, 4, 3, 2, ((1, 1), (1, 1))),
    (2, 11, 13, 3, 6, 7, 2, ((3, 3), (3, 3))),
    (1, 5, 6, 4, 3, 3, 2, "SAME"),
]


@pytest.mark.parametrize("implementation", ["lax", "im2col"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}k{c[5]}s{c[6]}")
def test_conv_matches_lax_values_and_gradients(implementation, case):
  n, h, w, c, o, k, s, padding = case
  kx, kw, kc = jax.random.split(jax.random.key(k * 10 + s), 3)
  x = jax.random.normal(kx, (n, h, w, c))
  kernel = jax.random.normal(kw, (k, k, c, o))
  explicit = layers._pad_pairs(padding, (k, k))
  conv = {"lax": layers.conv_lax, "im2col": layers.conv_im2col}[implementation]
  with jax.default_matmul_precision("highest"):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, (s, s), padding), x, kernel)
  y_ref, vjp_ref = jax.vjp(
      lambda x, w: reference_conv(x, w, (s, s), explicit), x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kc, y_ref.shape)
  with jax.default_matmul_precision("highest"):
    dx, dw = vjp(cotangent)
  dx_ref, dw_ref = vjp_ref(cotangent)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


def test_conv_module_auto_equals_lax_on_a_resnet_sized_stack():
  """"auto" mixes formulations per shape; the module's outputs and parameter
  gradients equal the all-lax module's."""
  def stack(impl):
    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = layers.Conv(8, (7, 7), (2, 2), ((3, 3), (3, 3)),
                        implementation=impl)(x)  # strided: im2col
        x = layers.Conv(8, (3, 3), implementation=impl)(x)  # 8x8 s1: lax
        x = layers.Conv(8, (1, 1), (2, 2), ((0, 0), (0, 0)),
                        implementation=impl)(x)  # 1x1: im2col
        return layers.Conv(4, (3, 3), implementation=impl)(x)  # 4x4: im2col
    return Stack()

  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = stack("lax").init(jax.random.key(1), x)

  def loss(params, impl):
    return jnp.sum(jnp.tanh(stack(impl).apply(params, x)))

  with jax.default_matmul_precision("highest"):
    value, grads = jax.value_and_grad(loss)(params, "auto")
    value_ref, grads_ref = jax.value_and_grad(loss)(params, "lax")
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_resolve_conv_implementation_per_backend_and_shape():
  resolve = layers.resolve_conv_implementation
  assert resolve("auto", kernel_size=(3, 3), strides=(1, 1), output_hw=(8, 8),
                 backend="cpu") == "lax"
  assert resolve("auto", kernel_size=(3, 3), strides=(2, 2),
                 output_hw=(16, 16), backend="cpu") == "im2col"
  assert resolve("auto", kernel_size=(3, 3), strides=(1, 1), output_hw=(4, 4),
                 backend="cpu") == "im2col"
  assert resolve("auto", kernel_size=(1, 1), strides=(1, 1),
                 output_hw=(32, 32), backend="cpu") == "im2col"
  assert resolve("auto", kernel_size=(3, 3), strides=(2, 2), output_hw=(2, 2),
                 backend="gpu") == "lax"
  assert resolve("im2col", backend="gpu") == "im2col"
  with pytest.raises(ValueError, match="config.model.conv_implementation"):
    resolve("winograd")


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 8, 8, 2)])
def test_max_pool_matches_flax_values_and_gradients(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  # Ties: equal values inside one window (ReLU zeros and a repeated maximum),
  # where the gradient must go to the first maximum only.
  x = x.at[:, :3, :3, :].set(0.0).at[:, 4, 4, :].set(5.0).at[:, 4, 5, :].set(5.0)
  reference = lambda x: nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(layers.max_pool(x), reference(x))
  weights = jax.random.normal(jax.random.key(1), reference(x).shape)
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x) * weights))(x)
  grad_ref = jax.grad(lambda x: jnp.sum(reference(x) * weights))(x)
  np.testing.assert_array_equal(grad, grad_ref)
