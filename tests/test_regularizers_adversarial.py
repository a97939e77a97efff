"""regularizers.adversarial against closed forms, finite differences, and
separate calls; the wrt selector on Flax-style dict batches."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from irtf_jax import regularizers as ga

DUAL_NORMS = (1.0, 2.0, math.inf)


# ---------------------------------------------------------------------------
# Fixtures: a linear-quadratic loss whose input gradient is known by hand, a
# small nonlinear network, and a Flax-style loss on a dict batch.


def _features(x):
  """Concatenates the flattened leaves of the pytree input {"a", "b"}."""
  batch = x["a"].shape[0]
  return jnp.concatenate([x["a"], x["b"].reshape(batch, -1)], axis=1)


def linear_quadratic_loss(weight, x, y):
  """L = mean_i 0.5 * ||A f_i - y_i||^2, f_i the features of example i."""
  residual = _features(x) @ weight.T - y
  return jnp.mean(0.5 * jnp.sum(residual**2, axis=1))


def _linear_quadratic_data(seed=0, batch=6, out=2):
  rng = np.random.default_rng(seed)
  weight = rng.normal(size=(out, 7))
  x = {"a": rng.normal(size=(batch, 3)), "b": rng.normal(size=(batch, 2, 2))}
  y = rng.normal(size=(batch, out))
  return weight, x, y


def _numpy_features(x):
  return np.concatenate([x["a"], x["b"].reshape(len(x["a"]), -1)], axis=1)


def _numpy_penalty(weight, x, y, epsilon, q):
  """P by hand: B * dL/df_i = A^T (A f_i - y_i) for the linear-quadratic L."""
  features = _numpy_features(x)
  per_example_grad = (features @ weight.T - y) @ weight  # rows: A^T r_i
  d = features.shape[1]
  norms = np.linalg.norm(per_example_grad, ord=q, axis=1)
  return epsilon / 2 * d ** (1 - 1 / q) * norms.mean()


def mlp_loss(params, x, y):
  """Mean squared error of a one-hidden-layer tanh network, per example."""
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  out = hidden @ params["w2"]
  return jnp.mean(0.5 * jnp.sum((out - y) ** 2, axis=1))


def _mlp_data(seed=0, batch=16, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(3, 4)),
      "b1": rng.normal(size=(4,)) * 0.1,
      "w2": rng.normal(size=(4, 2)),
  }
  x = rng.normal(size=(batch, 3))
  y = rng.normal(size=(batch, 2))
  cast = lambda a: jnp.asarray(a, dtype)
  return jax.tree.map(cast, params), cast(x), cast(y)


def dict_batch_loss(params, batch):
  """A Flax-style loss: image and integer token ids in one dict."""
  words = params["embedding"][batch["tokens"]].mean(axis=1)
  hidden = jnp.tanh(batch["image"] @ params["w1"] + params["b1"])
  return jnp.mean(jnp.sum((hidden @ params["w2"] - words) ** 2, axis=1))


def _dict_batch_data(seed=0, batch=8):
  params, x, _ = _mlp_data(seed, batch)
  rng = np.random.default_rng(seed + 1)
  params["embedding"] = jnp.asarray(rng.normal(size=(11, 2)), jnp.float32)
  return params, {
      "image": x,
      "tokens": jnp.asarray(rng.integers(0, 11, (batch, 5)), jnp.int32),
  }


# ---------------------------------------------------------------------------
# The penalty's value and gradient.


@pytest.mark.parametrize("q", DUAL_NORMS)
def test_penalty_matches_closed_form_with_pytree_input(q):
  weight, x, y = _linear_quadratic_data()
  epsilon = 0.3
  expected_penalty = _numpy_penalty(weight, x, y, epsilon, q)
  expected_loss = np.mean(
      0.5 * np.sum((_numpy_features(x) @ weight.T - y) ** 2, axis=1)
  )
  with jax.enable_x64(True):
    regularized = ga.adversarial_gradient_penalty(
        linear_quadratic_loss, epsilon=epsilon, q=q
    )
    total, terms = regularized(weight, x, y)
  np.testing.assert_allclose(terms.penalty, expected_penalty, rtol=1e-12)
  np.testing.assert_allclose(terms.loss, expected_loss, rtol=1e-12)
  np.testing.assert_allclose(
      total, expected_loss + expected_penalty, rtol=1e-12
  )
  assert expected_penalty > 1e-3  # The check above is not vacuous.


@pytest.mark.parametrize("q", DUAL_NORMS)
def test_parameter_gradient_matches_central_finite_differences(q):
  with jax.enable_x64(True):
    params, x, y = _mlp_data(batch=5, dtype=np.float64)
    regularized = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.2, q=q)
    flat, unravel = ravel_pytree(params)
    total = lambda v: regularized(unravel(v), x, y)[0]
    objective = jax.jit(total)
    analytic = jax.jit(jax.grad(total))(flat)
    step = 1e-6
    basis = np.eye(flat.size) * step
    numeric = np.array([
        (objective(flat + e) - objective(flat - e)) / (2 * step) for e in basis
    ])
    clean = jax.grad(lambda v: mlp_loss(unravel(v), x, y))(flat)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
  # The penalty's second-order term really contributes to the gradient.
  assert np.max(np.abs(analytic - clean)) > 1e-3


def test_zero_epsilon_adds_nothing_and_costs_nothing():
  params, x, y = _mlp_data()
  wrapped = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.0, q=2.0)
  (total, terms), grads = jax.jit(jax.value_and_grad(wrapped, has_aux=True))(
      params, x, y
  )
  clean, clean_grads = jax.jit(jax.value_and_grad(mlp_loss))(params, x, y)
  assert np.array_equal(total, clean) and np.array_equal(terms.loss, clean)
  assert terms.penalty == 0
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(clean_grads)):
    assert np.array_equal(got, want)
  # No input gradient is traced: the program is the loss plus a zero and an
  # addition, while any epsilon > 0 traces a backward pass.
  size = lambda f: len(jax.make_jaxpr(f)(params, x, y).eqns)
  assert size(wrapped) <= size(mlp_loss) + 2
  with_penalty = ga.adversarial_gradient_penalty(mlp_loss, epsilon=1e-3)
  assert size(with_penalty) > 2 * size(mlp_loss)
  assert ga.fgsm_adversarial_loss(mlp_loss, epsilon=0) is mlp_loss


def test_aux_is_passed_through_and_penalty_reported():
  params, x, y = _mlp_data()

  def loss_with_aux(params, x, y):
    return mlp_loss(params, x, y), {"batch_mean": jnp.mean(x, axis=0)}

  epsilon, q = 0.5, 2.0
  wrapped = ga.adversarial_gradient_penalty(
      loss_with_aux, epsilon=epsilon, q=q, has_aux=True
  )
  total, (aux, terms) = wrapped(params, x, y)
  _, reference = ga.adversarial_gradient_penalty(
      mlp_loss, epsilon=epsilon, q=q
  )(params, x, y)
  np.testing.assert_allclose(terms.penalty, reference.penalty, rtol=1e-6)
  np.testing.assert_allclose(terms.loss, mlp_loss(params, x, y), rtol=1e-6)
  np.testing.assert_allclose(total, terms.loss + terms.penalty, rtol=1e-6)
  np.testing.assert_array_equal(aux["batch_mean"], jnp.mean(x, axis=0))
  assert terms.penalty > 0


def test_batchnorm_statistics_pass_through_double_backprop():
  model = nn.Sequential([
      nn.Dense(4),
      nn.BatchNorm(use_running_average=False),
      jnp.tanh,
      nn.Dense(2),
  ])
  _, x, y = _mlp_data()
  variables = model.init(jax.random.key(0), x)

  def loss_fn(params, x, y, batch_stats):
    out, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        mutable=["batch_stats"],
    )
    return jnp.mean(0.5 * jnp.sum((out - y) ** 2, axis=1)), updates

  regularized = ga.adversarial_gradient_penalty(
      loss_fn, epsilon=0.1, has_aux=True
  )
  args = (variables["params"], x, y, variables["batch_stats"])
  total, (updates, terms) = jax.jit(regularized)(*args)
  clean = loss_fn(*args)[0]
  batch_mean = np.asarray(
      x @ variables["params"]["layers_0"]["kernel"]
      + variables["params"]["layers_0"]["bias"]
  ).mean(0)
  # Flax's running mean after one step with momentum 0.99 from zeros.
  np.testing.assert_allclose(
      updates["batch_stats"]["layers_1"]["mean"],
      0.01 * batch_mean,
      rtol=1e-5,
      atol=1e-7,
  )
  np.testing.assert_allclose(terms.loss, clean, rtol=1e-6)
  np.testing.assert_allclose(total, clean + terms.penalty, rtol=1e-6)
  assert terms.penalty > 0


def test_penalty_with_keyword_arguments_and_other_argnums():
  params, x, y = _mlp_data()

  def loss(x, params, *, y):
    return mlp_loss(params, x, y)

  wrapped = ga.adversarial_gradient_penalty(loss, epsilon=0.1, argnums=0)
  reference = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.1)
  np.testing.assert_allclose(
      wrapped(x, params, y=y)[0], reference(params, x, y)[0], rtol=1e-6
  )


def test_zero_input_gradient_gives_finite_parameter_gradient():
  params, x, y = _mlp_data()
  x = x.at[0].set(0.0)  # Any input: the loss below ignores example 0's x.

  def loss(params, x, y):
    masked = x.at[0].set(jax.lax.stop_gradient(x[0]))
    return mlp_loss(params, masked, y)

  # The 2-norm is the one with an infinite derivative at 0 (sqrt).
  wrapped = ga.adversarial_gradient_penalty(loss, epsilon=0.1, q=2.0)
  grads = jax.jit(jax.grad(lambda p: wrapped(p, x, y)[0]))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------
# Dict batches (wrt) and traced epsilon.


@pytest.mark.parametrize(
    "wrt",
    [
        "image",
        lambda batch: batch["image"],
        lambda batch: {"x": batch["image"]},
    ],
)
def test_wrt_perturbs_only_the_selected_leaf_of_a_dict_batch(wrt):
  params, batch = _dict_batch_data()
  epsilon = 0.05
  wrapped = ga.adversarial_gradient_penalty(
      dict_batch_loss, epsilon=epsilon, wrt=wrt
  )
  (total, terms), grads = jax.jit(jax.value_and_grad(wrapped, has_aux=True))(
      params, batch
  )
  # The same penalty with the image as an argument of its own.
  image_loss = lambda p, image, tokens: dict_batch_loss(
      p, {"image": image, "tokens": tokens}
  )
  want_total, want_terms = ga.adversarial_gradient_penalty(
      image_loss, epsilon=epsilon
  )(params, batch["image"], batch["tokens"])
  want_grads = jax.grad(
      lambda p: ga.adversarial_gradient_penalty(image_loss, epsilon=epsilon)(
          p, batch["image"], batch["tokens"]
      )[0]
  )(params)
  np.testing.assert_allclose(terms.penalty, want_terms.penalty, rtol=1e-6)
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  for name in params:
    np.testing.assert_allclose(
        grads[name], want_grads[name], rtol=1e-5, atol=1e-7, err_msg=name
    )
  assert terms.penalty > 0


def test_vmap_over_epsilon_equals_separate_calls():
  params, batch = _dict_batch_data()
  epsilons = jnp.array([0.0, 1e-3, 0.1, 2.0])

  def penalty(epsilon):
    wrapped = ga.adversarial_gradient_penalty(
        dict_batch_loss, epsilon=epsilon, q=2.0, wrt="image"
    )
    return wrapped(params, batch)[1].penalty

  swept = jax.jit(jax.vmap(penalty))(epsilons)
  separate = np.array([penalty(float(e)) for e in epsilons])
  np.testing.assert_allclose(swept, separate, rtol=1e-6)
  assert separate[0] == 0 and np.all(np.diff(separate) > 0)
  # A scheduled epsilon: the same wrapper built inside jit from the step.
  scheduled = jax.jit(lambda step: penalty(0.1 * jnp.minimum(1.0, step / 10)))
  np.testing.assert_allclose(scheduled(5), separate[2] / 2, rtol=1e-6)


def test_wrt_errors_name_the_fix():
  params, batch = _dict_batch_data()
  cases = [
      ({}, TypeError, "must be floating point.*wrt="),  # perturbs the tokens
      ({"wrt": "images"}, ValueError, "wrt could not select"),
      ({"wrt": lambda b: b["image"] * 2}, ValueError, "attribute access only"),
      ({"wrt": lambda b: 1.0}, ValueError, "no arithmetic"),
      ({"wrt": lambda b: (b["image"], b["image"])}, ValueError, "same leaf"),
      ({"argnums": 2}, ValueError, "argnums=2"),
  ]
  for kwargs, error, message in cases:
    wrapped = ga.adversarial_gradient_penalty(
        dict_batch_loss, epsilon=0.1, **kwargs
    )
    with pytest.raises(error, match=message):
      wrapped(params, batch)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": 0.1, "q": 3.0}, "q must be 1, 2 or inf"),
        ({"epsilon": -1.0}, "epsilon must be finite and >= 0"),
        ({"epsilon": float("nan")}, "epsilon must be finite and >= 0"),
        ({"epsilon": float("inf")}, "epsilon must be finite and >= 0"),
        ({"epsilon": "big"}, "epsilon must be a number"),
    ],
)
def test_penalty_rejects_bad_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ga.adversarial_gradient_penalty(mlp_loss, **kwargs)


def test_penalty_rejects_ragged_batches():
  ragged = ga.adversarial_gradient_penalty(
      lambda p, x: jnp.mean(x["a"]) + jnp.mean(x["b"]), epsilon=0.1
  )
  with pytest.raises(ValueError, match="different leading"):
    ragged(None, {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})


# ---------------------------------------------------------------------------
# FGSM baseline.


def test_fgsm_loss_and_gradient_match_direct_computation():
  weight, x, y = _linear_quadratic_data(seed=3)
  epsilon = 0.05
  features = _numpy_features(x)
  batch = len(features)
  input_grad = (features @ weight.T - y) @ weight / batch
  adversarial = features + epsilon * np.sign(input_grad)

  def numpy_loss(f):
    return np.mean(0.5 * np.sum((f @ weight.T - y) ** 2, axis=1))

  def numpy_weight_grad(f):
    return (f @ weight.T - y).T @ f / batch

  expected = (numpy_loss(features) + numpy_loss(adversarial)) / 2
  expected_grad = (
      numpy_weight_grad(features) + numpy_weight_grad(adversarial)
  ) / 2
  with jax.enable_x64(True):
    fgsm = ga.fgsm_adversarial_loss(linear_quadratic_loss, epsilon=epsilon)
    value, grad = jax.value_and_grad(fgsm)(weight, x, y)
  np.testing.assert_allclose(value, expected, rtol=1e-12)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-10)
  assert abs(expected - numpy_loss(features)) > 1e-3


def test_fgsm_returns_clean_aux_and_perturbs_only_wrt():
  params, batch = _dict_batch_data()

  def loss_with_aux(params, batch):
    return dict_batch_loss(params, batch), jnp.sum(batch["image"])

  value, aux = ga.fgsm_adversarial_loss(
      loss_with_aux, epsilon=0.1, wrt="image", has_aux=True
  )(params, batch)
  image_loss = lambda p, image, tokens: dict_batch_loss(
      p, {"image": image, "tokens": tokens}
  )
  expected = ga.fgsm_adversarial_loss(image_loss, epsilon=0.1)(
      params, batch["image"], batch["tokens"]
  )
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(aux, jnp.sum(batch["image"]), rtol=1e-6)
  assert value > dict_batch_loss(params, batch)


# ---------------------------------------------------------------------------
# On 8 devices (with isotropic GA in the same chain).


def _train_step(tx, regularized):
  def step(params, state, x, y):
    (loss, _), grads = jax.value_and_grad(regularized, has_aux=True)(
        params, x, y
    )
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def _make_tx():
  return optax.chain(
      ga.isotropic_gradient_augmentation(0.05, seed=2),
      optax.sgd(0.1, momentum=0.9),
  )


# One dual norm each: the others differ only in the per-example reduction,
# which the closed-form and finite-difference tests cover.
def test_sharded_jit_equals_one_device(q=1.0):
  assert jax.device_count() == 8
  params, x, y = _mlp_data(batch=16)
  tx = _make_tx()
  regularized = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.1, q=q)
  step = jax.jit(_train_step(tx, regularized))

  one_device = jax.devices()[0]
  single = step(*jax.device_put((params, tx.init(params), x, y), one_device))

  mesh = jax.make_mesh((8,), ("data",))  # Explicit axes, the project's mesh.
  replicated = NamedSharding(mesh, P())
  batch_sharded = NamedSharding(mesh, P("data"))
  sharded_args = (
      jax.device_put(params, replicated),
      jax.device_put(tx.init(params), replicated),
      jax.device_put(x, batch_sharded),
      jax.device_put(y, batch_sharded),
  )
  assert len(sharded_args[2].sharding.device_set) == 8
  sharded = step(*sharded_args)
  sharded = step(*sharded[:2], *sharded_args[2:])  # Second step: new noise.
  single = step(*single[:2], *jax.device_put((x, y), one_device))
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pmap_with_pmean_equals_global_batch(q=2.0):
  devices = jax.device_count()
  params, x, y = _mlp_data(batch=16)
  tx = _make_tx()
  regularized = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.1, q=q)
  global_step = jax.jit(_train_step(tx, regularized))

  def local_step(params, state, x, y):
    (loss, _), grads = jax.value_and_grad(regularized, has_aux=True)(
        params, x, y
    )
    loss, grads = jax.lax.pmean((loss, grads), "batch")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  pmapped = jax.pmap(local_step, axis_name="batch", in_axes=(None, None, 0, 0))
  split = lambda a: a.reshape(devices, -1, *a.shape[1:])
  got = pmapped(params, tx.init(params), split(x), split(y))
  expected = global_step(params, tx.init(params), x, y)
  for per_device, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    for replica in per_device:
      np.testing.assert_allclose(replica, want, rtol=1e-5, atol=1e-6)
