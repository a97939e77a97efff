"""oneDNN's kernel gradient (irtf_jax.models.onednn) against independent
references: NumPy loops in float64, exact on small integers, and the pure-JAX
formulation it replaces for derivatives. The test extra installs the
`cpu-onednn` wheels, so the kernel is built here (a C++ compiler is on every
machine this suite runs on); a failure to build fails these tests with the
reason."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irtf_jax.models import conv
from irtf_jax.models import onednn

# (N, H, W, C, O, (kh, kw), (s_h, s_w), ((top, bottom), (left, right)))
CASES = [
    (2, 7, 7, 3, 4, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (3, 6, 5, 2, 3, (3, 3), (1, 1), ((0, 0), (0, 0))),
    (2, 8, 6, 4, 2, (3, 3), (1, 1), ((0, 2), (2, 1))),
    (1, 9, 9, 5, 3, (5, 5), (1, 1), ((2, 2), (2, 2))),
    (2, 5, 8, 3, 6, (1, 3), (1, 1), ((0, 0), (1, 1))),
    (2, 9, 8, 3, 4, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (2, 8, 8, 5, 3, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (1, 11, 10, 2, 3, (3, 2), (2, 3), ((0, 2), (1, 0))),
]


@pytest.fixture(autouse=True)
def _required(monkeypatch):
  # "1": build or fail loudly, and apply even though the suite's process
  # has 8 CPU devices (conftest).
  monkeypatch.setenv("IRTF_JAX_ONEDNN", "1")


def reference_float64(x, cotangent, kernel_size, padding, strides=(1, 1)):
  """dw[a, b, c, o] = sum_{n, i, j} xpad[n, s_h i + a, s_w j + b, c]
  ct[n, i, j, o], one tap at a time, in float64."""
  x = np.asarray(x, np.float64)
  cotangent = np.asarray(cotangent, np.float64)
  (kh, kw), (sh, sw) = kernel_size, strides
  xpad = np.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  _, ho, wo, _ = cotangent.shape
  dw = np.zeros((kh, kw, x.shape[-1], cotangent.shape[-1]))
  for a in range(kh):
    for b in range(kw):
      window = xpad[
          :, a : a + sh * (ho - 1) + 1 : sh, b : b + sw * (wo - 1) + 1 : sw
      ]
      dw[a, b] = np.einsum("nijc,nijo->co", window, cotangent)
  return dw


def im2col_kernel_gradient(x, cotangent, kernel_size, strides, padding):
  """The kernel gradient of `conv.conv_im2col`, by autodiff (any stride)."""
  kernel = jnp.zeros(tuple(kernel_size) + (x.shape[-1], cotangent.shape[-1]))
  _, vjp = jax.vjp(lambda k: conv.conv_im2col(x, k, strides, padding), kernel)
  return vjp(cotangent)[0]


def small_integers(seed, shape):
  return jnp.asarray(
      np.random.default_rng(seed).integers(-3, 4, shape), jnp.float32
  )


def output_shape(n, h, w, o, kernel_size, padding, strides=(1, 1)):
  return (n, *conv.output_hw((h, w), kernel_size, strides, padding), o)


def test_builds_and_registers():
  assert onednn.available()


@pytest.mark.parametrize("case", CASES)
def test_exact_on_integers(case):
  # Every partial sum is an integer below 2**24, so any summation order gives
  # the exact result: a wrong tap, padding or layout cannot hide in rounding.
  n, h, w, c, o, kernel_size, strides, padding = case
  x = small_integers(0, (n, h, w, c))
  ct = small_integers(
      1, output_shape(n, h, w, o, kernel_size, padding, strides)
  )
  dw = jax.jit(
      lambda x, ct: onednn.kernel_gradient(
          x, ct, kernel_size, strides, padding, im2col_kernel_gradient
      )
  )(x, ct)
  np.testing.assert_array_equal(
      np.asarray(dw, np.float64),
      reference_float64(x, ct, kernel_size, padding, strides),
  )


def test_float_within_the_summation_bound_twice_in_one_program():
  # Two independent calls in one program, which XLA may run at once on its
  # threads (as the train step's two encoder passes do).
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 14, 14, 16)), jnp.float32)
  cts = [jnp.asarray(rng.standard_normal((4, 14, 14, 8)), jnp.float32)]
  cts.append(cts[0][::-1] * 2)
  pad = ((1, 1), (1, 1))
  both = jax.jit(
      lambda x, a, b: [
          onednn.kernel_gradient(
              x, ct, (3, 3), (1, 1), pad, conv._stride1_kernel_gradient
          )
          for ct in (a, b)
      ]
  )(x, *cts)
  for dw, ct in zip(both, cts):
    exact = reference_float64(x, ct, (3, 3), pad)
    magnitude = reference_float64(np.abs(x), np.abs(ct), (3, 3), pad)
    # |fl(sum of K products) - sum| <= gamma_{K+1} * sum |products|, with
    # K = 4 * 14 * 14 terms per entry and u = 2**-24.
    terms = 4 * 14 * 14 + 1
    u = np.finfo(np.float32).eps / 2
    bound = terms * u / (1 - terms * u) * magnitude
    assert np.all(np.abs(np.asarray(dw, np.float64) - exact) <= bound)


def test_conv_gradient_takes_it_and_equals_the_pure_path(monkeypatch):
  x = small_integers(3, (2, 9, 9, 4))
  kernel = small_integers(4, (3, 3, 4, 5))
  pad = ((1, 1), (1, 1))

  def loss(x, kernel):
    y = conv.conv_lax_dw_im2col(x, kernel, pad)
    return jnp.sum(y * small_integers(5, y.shape))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  assert "irtf_onednn" in grad.lower(x, kernel).as_text()
  with_onednn = grad(x, kernel)
  monkeypatch.setenv("IRTF_JAX_ONEDNN", "0")
  pure = jax.jit(jax.grad(loss, argnums=(0, 1)))
  assert "irtf_onednn" not in pure.lower(x, kernel).as_text()
  for a, b in zip(with_onednn, pure(x, kernel)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("case", [CASES[2], CASES[7]])
def test_second_order_is_the_pure_formulations(case):
  n, h, w, c, o, kernel_size, strides, padding = case
  x = small_integers(6, (n, h, w, c))
  ct = small_integers(
      7, output_shape(n, h, w, o, kernel_size, padding, strides)
  )
  weights = small_integers(8, kernel_size + (c, o))

  def through(kernel_gradient):
    return jax.grad(
        lambda x, ct: jnp.sum(kernel_gradient(x, ct) ** 2 * weights),
        argnums=(0, 1),
    )(x, ct)

  got = through(
      lambda x, ct: onednn.kernel_gradient(
          x, ct, kernel_size, strides, padding, im2col_kernel_gradient
      )
  )
  want = through(
      lambda x, ct: im2col_kernel_gradient(x, ct, kernel_size, strides, padding)
  )
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_shapes_are_refused():
  x = jnp.zeros((2, 7, 7, 3))
  with pytest.raises(ValueError, match="does not fit"):
    onednn.kernel_gradient(
        x,
        jnp.zeros((2, 6, 7, 4)),
        (3, 3),
        (1, 1),
        ((1, 1), (1, 1)),
        im2col_kernel_gradient,
    )


def test_missing_wheel_names_the_fix(monkeypatch):
  monkeypatch.setattr(onednn, "_RUNTIME", "onednn-not-installed")
  with pytest.raises(onednn.OnednnUnavailable, match=r"cpu-onednn"):
    onednn.build_library()


def test_bad_mode_names_the_values(monkeypatch):
  monkeypatch.setenv("IRTF_JAX_ONEDNN", "yes")
  with pytest.raises(ValueError, match="auto.*0.*1"):
    onednn.mode()


def test_off_means_off(monkeypatch):
  monkeypatch.setenv("IRTF_JAX_ONEDNN", "0")
  x = jnp.zeros((1, 4, 4, 2), jnp.float32)
  assert not onednn.available()
  assert not onednn.applies(x, x)


def test_a_failed_build_with_the_extra_installed_is_a_warning(
    monkeypatch, caplog
):
  def fail():
    raise onednn.OnednnUnavailable("no compiler here")

  monkeypatch.setattr(onednn, "build_library", fail)
  # The uncached function: the process's registration stays as it is.
  error = onednn._registration_error.__wrapped__()
  assert isinstance(error, onednn.OnednnUnavailable)
  assert any(
      r.levelname == "WARNING" and "no compiler here" in r.getMessage()
      for r in caplog.records
  )
