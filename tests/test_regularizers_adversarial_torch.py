"""Parity of the adversarial gradient penalty with a PyTorch double-backprop
implementation of the same formula, on a tiny conv + tanh + linear network."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from irtf_jax import regularizers as ga

BATCH, CHANNELS, SIZE, HIDDEN, EMBED = 4, 2, 5, 3, 4
EPSILON = 0.05


def _weights_and_data(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "conv_w": rng.normal(size=(HIDDEN, CHANNELS, 3, 3)) * 0.5,
      "conv_b": rng.normal(size=(HIDDEN,)) * 0.1,
      "lin_w": rng.normal(size=(EMBED, HIDDEN * SIZE * SIZE)) * 0.2,
      "lin_b": rng.normal(size=(EMBED,)) * 0.1,
  }
  images = rng.normal(size=(BATCH, CHANNELS, SIZE, SIZE))
  targets = rng.normal(size=(BATCH, EMBED))
  return params, images, targets


def _torch_penalty(params, images, targets, q):
  """The penalty written in PyTorch from its formula, and its gradients.

  P = eps * d ** (1 - 1/q) / 2 * mean_i ||B * dL/dx_i||_q, with L the softmax
  cross-entropy of each query against the batch's targets (in-batch
  negatives), differentiated twice by autograd.
  """
  weights = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  x = torch.tensor(images, requires_grad=True)
  t = torch.tensor(targets)
  hidden = torch.tanh(
      F.conv2d(x, weights["conv_w"], weights["conv_b"], padding=1)
  )
  embedding = hidden.reshape(BATCH, -1) @ weights["lin_w"].T + weights["lin_b"]
  loss = F.cross_entropy(embedding @ t.T, torch.arange(BATCH))
  g = torch.autograd.grad(loss, x, create_graph=True)[0] * BATCH
  g = g.reshape(BATCH, -1)
  d = g.shape[1]
  norms = torch.linalg.vector_norm(g, ord=q, dim=1)
  penalty = EPSILON * d ** (1 - 1 / q) / 2 * norms.mean()
  names = sorted(weights)
  penalty_grads = torch.autograd.grad(
      penalty, [weights[k] for k in names], retain_graph=True
  )
  total_grads = torch.autograd.grad(loss + penalty, [weights[k] for k in names])
  as_numpy = lambda grads: {k: v.numpy() for k, v in zip(names, grads)}
  return (
      penalty.item(),
      (loss + penalty).item(),
      as_numpy(penalty_grads),
      as_numpy(total_grads),
  )


def _jax_loss(params, images, targets):
  hidden = jax.lax.conv_general_dilated(
      images,
      params["conv_w"],
      window_strides=(1, 1),
      padding=((1, 1), (1, 1)),
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
  )
  hidden = jnp.tanh(hidden + params["conv_b"][None, :, None, None])
  embedding = hidden.reshape(BATCH, -1) @ params["lin_w"].T + params["lin_b"]
  logits = embedding @ targets.T
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(BATCH))
  )


def _assert_close(got, want):
  scale = max(np.max(np.abs(v)) for v in want.values())
  for name in want:
    np.testing.assert_allclose(
        got[name], want[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name
    )


@pytest.mark.parametrize("q", (1.0, 2.0, math.inf))
def test_penalty_and_gradients_match_pytorch(q):
  params, images, targets = _weights_and_data()
  want_penalty, want_total, want_penalty_grads, want_total_grads = (
      _torch_penalty(params, images, targets, q)
  )
  with jax.enable_x64(True):
    params, images, targets = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float64), (params, images, targets)
    )
    regularized = ga.adversarial_gradient_penalty(
        _jax_loss, epsilon=EPSILON, q=q
    )

    @jax.jit
    def penalty_and_gradients(params):
      penalty_of = lambda p: regularized(p, images, targets)[1].penalty
      (total, terms), total_grads = jax.value_and_grad(
          regularized, has_aux=True
      )(params, images, targets)
      return terms.penalty, jax.grad(penalty_of)(params), total, total_grads

    penalty, penalty_grads, total, total_grads = penalty_and_gradients(params)
  assert penalty.dtype == jnp.float64
  np.testing.assert_allclose(penalty, want_penalty, rtol=1e-5)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  _assert_close(penalty_grads, want_penalty_grads)
  _assert_close(total_grads, want_total_grads)
  assert want_penalty > 1e-4  # A penalty that matters, not a zero.
