"""Tests of irtf_jax.regularizers against closed forms, finite differences and
statistics of the noise."""

from __future__ import annotations

import math

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from irtf_jax import regularizers as ga

DUAL_NORMS = (1.0, 2.0, math.inf)


# ---------------------------------------------------------------------------
# Fixtures: a linear-quadratic loss whose input gradient is known by hand, and
# a small nonlinear network.


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
  return epsilon / 2 * d**(1 - 1 / q) * norms.mean()


def mlp_loss(params, x, y):
  """Mean squared error of a one-hidden-layer tanh network, per example."""
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  out = hidden @ params["w2"]
  return jnp.mean(0.5 * jnp.sum((out - y)**2, axis=1))


def _mlp_data(seed=0, batch=16, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(3, 4)), "b1": rng.normal(size=(4,)) * 0.1,
            "w2": rng.normal(size=(4, 2))}
  x = rng.normal(size=(batch, 3))
  y = rng.normal(size=(batch, 2))
  cast = lambda a: jnp.asarray(a, dtype)
  return jax.tree.map(cast, params), cast(x), cast(y)


# ---------------------------------------------------------------------------
# Adversarial gradient penalty.


@pytest.mark.parametrize("q", DUAL_NORMS)
def test_penalty_matches_closed_form_with_pytree_input(q):
  weight, x, y = _linear_quadratic_data()
  epsilon = 0.3
  expected_penalty = _numpy_penalty(weight, x, y, epsilon, q)
  expected_loss = np.mean(
      0.5 * np.sum((_numpy_features(x) @ weight.T - y)**2, axis=1))
  with jax.enable_x64(True):
    regularized = ga.adversarial_gradient_penalty(
        linear_quadratic_loss, epsilon=epsilon, q=q, with_penalty_in_aux=True)
    total, terms = regularized(weight, x, y)
    alone = ga.adversarial_penalty(linear_quadratic_loss, epsilon=epsilon,
                                   q=q)(weight, x, y)
    plain = ga.adversarial_gradient_penalty(
        linear_quadratic_loss, epsilon=epsilon, q=q)(weight, x, y)
  np.testing.assert_allclose(terms.penalty, expected_penalty, rtol=1e-12)
  np.testing.assert_allclose(terms.loss, expected_loss, rtol=1e-12)
  np.testing.assert_allclose(total, expected_loss + expected_penalty,
                             rtol=1e-12)
  np.testing.assert_allclose(plain, expected_loss + expected_penalty,
                             rtol=1e-12)
  np.testing.assert_allclose(alone, expected_penalty, rtol=1e-12)
  assert expected_penalty > 1e-3  # The check above is not vacuous.


@pytest.mark.parametrize("q", DUAL_NORMS)
def test_parameter_gradient_matches_central_finite_differences(q):
  with jax.enable_x64(True):
    params, x, y = _mlp_data(batch=5, dtype=np.float64)
    regularized = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.2, q=q)
    flat, unravel = ravel_pytree(params)
    objective = jax.jit(lambda v: regularized(unravel(v), x, y))
    analytic = jax.jit(jax.grad(lambda v: regularized(unravel(v), x, y)))(flat)
    step = 1e-6
    basis = np.eye(flat.size) * step
    numeric = np.array([
        (objective(flat + e) - objective(flat - e)) / (2 * step)
        for e in basis])
    clean = jax.grad(lambda v: mlp_loss(unravel(v), x, y))(flat)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
  # The penalty's second-order term really contributes to the gradient.
  assert np.max(np.abs(analytic - clean)) > 1e-3


def test_zero_epsilon_is_an_exact_no_op():
  params, x, y = _mlp_data()
  assert ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.0) is mlp_loss
  assert ga.fgsm_adversarial_loss(mlp_loss, epsilon=0) is mlp_loss
  logged = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.0, q=2.0,
                                           with_penalty_in_aux=True)
  (total, terms), grads = jax.jit(jax.value_and_grad(logged, has_aux=True))(
      params, x, y)
  clean, clean_grads = jax.jit(jax.value_and_grad(mlp_loss))(params, x, y)
  assert np.array_equal(total, clean) and np.array_equal(terms.loss, clean)
  assert terms.penalty == 0
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(clean_grads)):
    assert np.array_equal(got, want)


def test_aux_is_passed_through_and_penalty_reported():
  params, x, y = _mlp_data()

  def loss_with_aux(params, x, y):
    return mlp_loss(params, x, y), {"batch_mean": jnp.mean(x, axis=0)}

  epsilon, q = 0.5, 2.0
  plain = ga.adversarial_gradient_penalty(
      loss_with_aux, epsilon=epsilon, q=q, has_aux=True)
  logged = ga.adversarial_gradient_penalty(
      loss_with_aux, epsilon=epsilon, q=q, has_aux=True,
      with_penalty_in_aux=True)
  total, aux = plain(params, x, y)
  total_logged, (aux_logged, terms) = logged(params, x, y)
  reference = ga.adversarial_penalty(mlp_loss, epsilon=epsilon, q=q)
  np.testing.assert_allclose(terms.penalty, reference(params, x, y), rtol=1e-6)
  np.testing.assert_allclose(terms.loss, mlp_loss(params, x, y), rtol=1e-6)
  np.testing.assert_allclose(total, terms.loss + terms.penalty, rtol=1e-6)
  np.testing.assert_allclose(total_logged, total, rtol=1e-6)
  for got in (aux, aux_logged):
    np.testing.assert_array_equal(got["batch_mean"], jnp.mean(x, axis=0))


def test_batchnorm_statistics_pass_through_double_backprop():
  model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False),
                         jnp.tanh, nn.Dense(2)])
  _, x, y = _mlp_data()
  variables = model.init(jax.random.key(0), x)

  def loss_fn(params, x, y, batch_stats):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats},
                               x, mutable=["batch_stats"])
    return jnp.mean(0.5 * jnp.sum((out - y)**2, axis=1)), updates

  regularized = ga.adversarial_gradient_penalty(
      loss_fn, epsilon=0.1, has_aux=True, with_penalty_in_aux=True)
  args = (variables["params"], x, y, variables["batch_stats"])
  total, (updates, terms) = jax.jit(regularized)(*args)
  clean = loss_fn(*args)[0]
  batch_mean = np.asarray(x @ variables["params"]["layers_0"]["kernel"] +
                          variables["params"]["layers_0"]["bias"]).mean(0)
  # Flax's running mean after one step with momentum 0.99 from zeros.
  np.testing.assert_allclose(
      updates["batch_stats"]["layers_1"]["mean"], 0.01 * batch_mean,
      rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(terms.loss, clean, rtol=1e-6)
  np.testing.assert_allclose(total, clean + terms.penalty, rtol=1e-6)
  assert terms.penalty > 0


def test_penalty_with_keyword_arguments_and_other_argnum():
  params, x, y = _mlp_data()

  def loss(x, params, *, y):
    return mlp_loss(params, x, y)

  wrapped = ga.adversarial_gradient_penalty(loss, epsilon=0.1, argnum=0)
  reference = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.1)
  np.testing.assert_allclose(wrapped(x, params, y=y), reference(params, x, y),
                             rtol=1e-6)


def test_zero_input_gradient_gives_finite_parameter_gradient():
  params, x, y = _mlp_data()
  x = x.at[0].set(0.0)  # Any input: the loss below ignores example 0's x.

  def loss(params, x, y):
    masked = x.at[0].set(jax.lax.stop_gradient(x[0]))
    return mlp_loss(params, masked, y)

  # The 2-norm is the one with an infinite derivative at 0 (sqrt).
  grads = jax.jit(jax.grad(
      ga.adversarial_gradient_penalty(loss, epsilon=0.1, q=2.0)))(params, x, y)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kwargs, message", [
    ({"epsilon": 0.1, "q": 3.0}, "q must be 1, 2 or inf"),
    ({"epsilon": -1.0}, "epsilon must be finite and >= 0"),
    ({"epsilon": float("nan")}, "epsilon must be finite and >= 0"),
    ({"epsilon": float("inf")}, "epsilon must be finite and >= 0"),
    ({"epsilon": "big"}, "epsilon must be a Python number"),
])
def test_penalty_rejects_bad_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ga.adversarial_gradient_penalty(mlp_loss, **kwargs)


def test_penalty_rejects_bad_inputs():
  params, x, y = _mlp_data()
  wrapped = ga.adversarial_gradient_penalty(mlp_loss, epsilon=0.1, argnum=5)
  with pytest.raises(ValueError, match="argnum=5"):
    wrapped(params, x, y)
  integer = ga.adversarial_gradient_penalty(
      lambda p, ids: jnp.mean(p[ids]), epsilon=0.1)
  with pytest.raises(TypeError, match="must be floating point"):
    integer(jnp.ones(3), jnp.array([0, 1]))
  ragged = ga.adversarial_gradient_penalty(
      lambda p, x: jnp.mean(x["a"]) + jnp.mean(x["b"]), epsilon=0.1)
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
    return np.mean(0.5 * np.sum((f @ weight.T - y)**2, axis=1))

  def numpy_weight_grad(f):
    return (f @ weight.T - y).T @ f / batch

  expected = (numpy_loss(features) + numpy_loss(adversarial)) / 2
  expected_grad = (numpy_weight_grad(features) +
                   numpy_weight_grad(adversarial)) / 2
  with jax.enable_x64(True):
    fgsm = ga.fgsm_adversarial_loss(linear_quadratic_loss, epsilon=epsilon)
    value, grad = jax.value_and_grad(fgsm)(weight, x, y)
  np.testing.assert_allclose(value, expected, rtol=1e-12)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-10)
  assert abs(expected - numpy_loss(features)) > 1e-3


def test_fgsm_returns_clean_aux():
  params, x, y = _mlp_data()

  def loss_with_aux(params, x, y):
    return mlp_loss(params, x, y), jnp.sum(x)

  value, aux = ga.fgsm_adversarial_loss(
      loss_with_aux, epsilon=0.1, has_aux=True)(params, x, y)
  expected = ga.fgsm_adversarial_loss(mlp_loss, epsilon=0.1)(params, x, y)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(aux, jnp.sum(x), rtol=1e-6)


# ---------------------------------------------------------------------------
# Isotropic gradient augmentation.


def _zero_grads():
  return {"w": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}


def _noise_sequence(transform, grads, steps):
  """Stacked noise (update minus gradient) of `steps` jitted updates."""
  state = transform.init(grads)

  def body(state, _):
    updates, state = transform.update(grads, state)
    noise = jax.tree.map(lambda u, g: u - g, updates, grads)
    return state, (noise, state.noise_norm)

  _, (noise, norms) = jax.jit(
      lambda s: jax.lax.scan(body, s, None, length=steps))(state)
  return noise, norms


def _flat_samples(noise):
  """(steps, total elements) matrix of a stacked noise pytree."""
  return np.concatenate(
      [np.asarray(leaf).reshape(leaf.shape[0], -1)
       for leaf in jax.tree.leaves(noise)], axis=1)


def test_zero_gamma_is_an_exact_no_op():
  grads = {"w": jnp.linspace(-1.0, 1.0, 5), "b": jnp.ones((2, 2)) * 0.3}
  transform = ga.isotropic_gradient_augmentation(0.0)
  state = transform.init(grads)
  updates, state = jax.jit(transform.update)(grads, state)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert got.dtype == want.dtype and np.array_equal(got, want)
  assert state.noise_norm == 0 and state.count == 1


def test_gaussian_noise_is_unbiased_isotropic_with_std_gamma_over_n():
  gamma, steps = 0.5, 4000
  noise, norms = _noise_sequence(
      ga.isotropic_gradient_augmentation(gamma, seed=1), _zero_grads(), steps)
  samples = _flat_samples(noise)
  # Leaves in sorted key order: "b" (n = 4) then "w" (n = 3).
  stds = np.array([gamma / 4] * 4 + [gamma / 3] * 3)
  # Sample mean of N(0, s^2): standard error s / sqrt(T); 5 sigma per element.
  assert np.all(np.abs(samples.mean(0)) < 5 * stds / math.sqrt(steps))
  # Sample std: relative standard error about 1 / sqrt(2T).
  np.testing.assert_allclose(samples.std(0), stds,
                             rtol=5 / math.sqrt(2 * steps))
  # Independent elements and leaves: correlations within 5 / sqrt(T) of 0.
  correlation = np.corrcoef(samples.T) - np.eye(samples.shape[1])
  assert np.max(np.abs(correlation)) < 5 / math.sqrt(steps)
  np.testing.assert_allclose(norms, np.linalg.norm(samples, axis=1),
                             rtol=1e-5)


def test_gaussian_noise_std_per_leaf_in_one_draw():
  gamma = 2.0
  grads = {"big": jnp.zeros((100, 200)), "small": jnp.zeros((50,))}
  transform = ga.isotropic_gradient_augmentation(gamma, seed=7)
  updates, _ = jax.jit(transform.update)(grads, transform.init(grads))
  for name, n in (("big", 20000), ("small", 50)):
    values = np.asarray(updates[name]).ravel()
    np.testing.assert_allclose(values.std(), gamma / n,
                               rtol=5 / math.sqrt(2 * n))
    assert abs(values.mean()) < 5 * gamma / n / math.sqrt(n)


def test_linf_noise_bounds_and_std():
  gamma, steps = 0.5, 4000
  noise, _ = _noise_sequence(
      ga.isotropic_gradient_augmentation(gamma, distribution="linf"),
      _zero_grads(), steps)
  samples = _flat_samples(noise)
  bounds = np.array([gamma / 4] * 4 + [gamma / 3] * 3)
  stds = bounds / math.sqrt(3)  # Std of U[-1, 1] is 1 / sqrt(3).
  assert np.all(np.abs(samples) <= bounds * (1 + 1e-6))
  assert np.all(np.abs(samples).max(0) > 0.99 * bounds)
  assert np.all(np.abs(samples.mean(0)) < 5 * stds / math.sqrt(steps))
  # Var of the sample variance of U[-a, a]: (E x^4 - s^4) / T, E x^4 = a^4/5.
  relative_var_error = math.sqrt((9 / 5 - 1) / steps)
  np.testing.assert_allclose(samples.var(0), stds**2,
                             rtol=5 * relative_var_error)


def test_sphere_noise_norm_and_uniform_direction():
  gamma, steps = 0.5, 4000
  noise, norms = _noise_sequence(
      ga.isotropic_gradient_augmentation(gamma, distribution="sphere"),
      _zero_grads(), steps)
  samples = _flat_samples(noise)
  radius = gamma * math.sqrt(1 / 3 + 1 / 4)
  np.testing.assert_allclose(np.linalg.norm(samples, axis=1), radius,
                             rtol=1e-5)
  np.testing.assert_allclose(norms, radius, rtol=1e-5)
  # Uniform direction u on the sphere in N dims: E u_j = 0, E u_j^2 = 1/N,
  # Var u_j^2 = 3/(N(N+2)) - 1/N^2.
  directions = samples / radius
  dims = directions.shape[1]
  assert np.all(np.abs(directions.mean(0)) < 5 / math.sqrt(dims * steps))
  second_moment_se = math.sqrt((3 / (dims * (dims + 2)) - 1 / dims**2) / steps)
  assert np.all(np.abs((directions**2).mean(0) - 1 / dims) <
                5 * second_moment_se)


def test_erfinv_matches_scipy_in_float64_into_the_tails():
  from scipy import special  # pylint: disable=g-import-not-at-top
  # The symmetric 23-bit grid the sampler feeds it, sampled densely near 0
  # and into both extreme cells.
  grid = np.concatenate([np.linspace(-1, 1, 200001)[1:-1],
                         1 - 2.0**-np.arange(1, 24), -1 + 2.0**-np.arange(1, 24)])
  grid = grid.astype(np.float32)
  got = np.asarray(jax.jit(ga._erfinv)(grid), np.float64)
  want = special.erfinv(grid.astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_hashed_normal_is_standard_normal():
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n = 2**20
  samples = np.asarray(ga.hashed_normal(jax.random.key(3), (n,)), np.float64)
  # Kolmogorov-Smirnov against N(0, 1); moments within 5 standard errors.
  assert stats.kstest(samples, "norm").pvalue > 1e-3
  assert abs(samples.mean()) < 5 / math.sqrt(n)
  assert abs(samples.var() - 1) < 5 * math.sqrt(2 / n)
  assert abs(stats.skew(samples)) < 5 * math.sqrt(6 / n)
  assert abs(stats.kurtosis(samples)) < 5 * math.sqrt(24 / n)
  # Same resolution as jax.random.normal: tails reach past 4.5 sigma in 2^20.
  assert 4.5 < np.abs(samples).max() < 5.4


def test_hashed_bits_are_a_keyed_bijection_of_the_index():
  a = np.asarray(ga.hashed_bits(jax.random.key(0), (256, 1024)))
  b = np.asarray(ga.hashed_bits(jax.random.key(1), (256, 1024)))
  assert a.dtype == np.uint32
  assert np.unique(a).size == a.size  # No word repeats within one draw.
  # Another key gives unrelated words: bitwise agreement ~ 1/2, and the two
  # draws' normals are uncorrelated.
  agreement = np.unpackbits((~(a ^ b)).view(np.uint8)).mean()
  assert abs(agreement - 0.5) < 5 * 0.5 / math.sqrt(32 * a.size)
  # Every bit position is fair.
  bits = np.unpackbits(a.view(np.uint8)).reshape(a.size, 32).mean(0)
  assert np.all(np.abs(bits - 0.5) < 5 * 0.5 / math.sqrt(a.size))
  with pytest.raises(ValueError, match="2\\^32 elements"):
    ga.hashed_bits(jax.random.key(0), (2**16, 2**16))


def test_logged_norm_of_a_large_leaf_is_its_realized_norm():
  gamma, n = 3.0, 300_000
  grads = {"large": jnp.zeros((1000, 300))}
  transform = ga.isotropic_gradient_augmentation(gamma, seed=2)
  updates, state = jax.jit(transform.update)(grads, transform.init(grads))
  realized = np.linalg.norm(np.asarray(updates["large"], np.float64))
  # The large leaf enters with its expected norm gamma / sqrt(n); the realized
  # norm's relative standard deviation is 1 / sqrt(2n).
  np.testing.assert_allclose(float(state.noise_norm), gamma / math.sqrt(n),
                             rtol=1e-6)
  np.testing.assert_allclose(float(state.noise_norm), realized,
                             rtol=5 / math.sqrt(2 * n))


def _eager_noise(seed, steps=3):
  """(steps, elements) noise of un-jitted updates from a fresh transform."""
  transform = ga.isotropic_gradient_augmentation(1.0, seed=seed)
  grads = _zero_grads()
  state = transform.init(grads)
  rows = []
  for _ in range(steps):
    updates, state = transform.update(grads, state)
    rows.append(ravel_pytree(updates)[0])
  return np.stack(rows)


def test_noise_is_reproducible_and_fresh_every_step():
  first, again, other = _eager_noise(3), _eager_noise(3), _eager_noise(4)
  assert np.array_equal(first, again)
  assert not np.any(first == other)
  assert not np.any(first[0] == first[1]) and not np.any(first[1] == first[2])


def test_state_survives_a_checkpoint_round_trip(tmp_path):
  params = {"w": jnp.ones((3,)), "b": jnp.ones((2, 2))}
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  tx = optax.chain(ga.isotropic_gradient_augmentation(0.3, seed=11),
                   optax.sgd(0.1, momentum=0.9))
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(3):
    _, state = update(grads, state)
  path = tmp_path / "opt_state.msgpack"
  path.write_bytes(flax.serialization.to_bytes(state))
  restored = flax.serialization.from_bytes(tx.init(params),
                                           path.read_bytes())
  expected, expected_state = update(grads, state)
  got, got_state = update(grads, restored)
  for a, b in zip(jax.tree.leaves((expected, expected_state)),
                  jax.tree.leaves((got, got_state))):
    assert np.array_equal(a, b)
  assert optax.tree_utils.tree_get(got_state, "count") == 4
  # A fresh state would have given other noise: the restore carried the count.
  fresh, _ = update(grads, tx.init(params))
  assert not np.array_equal(fresh["w"], got["w"])


def test_chains_with_momentum_sgd_under_jit():
  params = {"w": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  grads = {"w": jnp.array([0.1, -0.2, 0.3]), "b": jnp.full((2, 2), 0.05)}
  gamma, lr, momentum, steps = 0.2, 0.1, 0.9, 4
  tx = optax.chain(ga.isotropic_gradient_augmentation(gamma, seed=5),
                   optax.sgd(lr, momentum=momentum))

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, tx.init(params)), None,
                        length=steps)[0][0]

  noise, _ = _noise_sequence(ga.isotropic_gradient_augmentation(gamma, seed=5),
                             jax.tree.map(jnp.zeros_like, grads), steps)
  expected = jax.tree.map(np.asarray, params)
  velocity = jax.tree.map(np.zeros_like, expected)
  for t in range(steps):  # Heavy-ball SGD, as optax.sgd defines it.
    for name in expected:
      velocity[name] = momentum * velocity[name] + (
          np.asarray(grads[name]) + np.asarray(noise[name][t]))
      expected[name] = expected[name] - lr * velocity[name]
  got = train(params)
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"gamma": -0.1}, "gamma must be finite and >= 0"),
    ({"gamma": float("inf")}, "gamma must be finite and >= 0"),
    ({"gamma": 0.1, "distribution": "laplace"}, "distribution='laplace'"),
])
def test_isotropic_rejects_bad_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ga.isotropic_gradient_augmentation(**kwargs)


# ---------------------------------------------------------------------------
# Both pieces on 8 devices.


def _train_step(tx, regularized):
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(regularized)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


def _make_tx():
  return optax.chain(ga.isotropic_gradient_augmentation(0.05, seed=2),
                     optax.sgd(0.1, momentum=0.9))


# One dual norm here: the others differ only in the per-example reduction,
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
  sharded_args = (jax.device_put(params, replicated),
                  jax.device_put(tx.init(params), replicated),
                  jax.device_put(x, batch_sharded),
                  jax.device_put(y, batch_sharded))
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
    loss, grads = jax.value_and_grad(regularized)(params, x, y)
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
