"""regularizers.isotropic: the noise's statistics under each scaling and
distribution, exact values from a fixed draw, and its optax state."""

from __future__ import annotations

import math

import flax.serialization
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from irtf_jax import regularizers as ga


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
      lambda s: jax.lax.scan(body, s, None, length=steps)
  )(state)
  return noise, norms


def _flat_samples(noise):
  """(steps, total elements) matrix of a stacked noise pytree."""
  return np.concatenate(
      [
          np.asarray(leaf).reshape(leaf.shape[0], -1)
          for leaf in jax.tree.leaves(noise)
      ],
      axis=1,
  )


# The statistical tests: STEPS jitted updates of `_zero_grads` with gamma GAMMA.
GAMMA, STEPS = 0.5, 4000


def _zero_grad_noise(**kwargs):
  """The noise of STEPS updates of `_zero_grads` by
  `isotropic_gradient_augmentation(GAMMA, **kwargs)` as a (STEPS, 7) matrix
  (`_flat_samples`), and the logged noise norms."""
  transform = ga.isotropic_gradient_augmentation(GAMMA, **kwargs)
  noise, norms = _noise_sequence(transform, _zero_grads(), STEPS)
  return _flat_samples(noise), norms


def _per_element(b, w):
  """A value per column of `_flat_samples(noise of _zero_grads)`: leaves in
  sorted key order, "b" (n = 4 elements) then "w" (n = 3)."""
  return np.array([b] * 4 + [w] * 3)


def test_zero_gamma_is_an_exact_no_op():
  grads = {"w": jnp.linspace(-1.0, 1.0, 5), "b": jnp.ones((2, 2)) * 0.3}
  transform = ga.isotropic_gradient_augmentation(0.0)
  state = transform.init(grads)
  updates, state = jax.jit(transform.update)(grads, state)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert got.dtype == want.dtype and np.array_equal(got, want)
  assert state.noise_norm == 0 and state.count == 1


def test_gaussian_noise_is_unbiased_isotropic_with_std_gamma_over_n():
  gamma, steps = GAMMA, STEPS
  samples, norms = _zero_grad_noise(seed=1)
  stds = _per_element(gamma / 4, gamma / 3)
  # Sample mean of N(0, s^2): standard error s / sqrt(T); 5 sigma per element.
  assert np.all(np.abs(samples.mean(0)) < 5 * stds / math.sqrt(steps))
  # Sample std: relative standard error about 1 / sqrt(2T).
  np.testing.assert_allclose(
      samples.std(0), stds, rtol=5 / math.sqrt(2 * steps)
  )
  # Independent elements and leaves: correlations within 5 / sqrt(T) of 0.
  correlation = np.corrcoef(samples.T) - np.eye(samples.shape[1])
  assert np.max(np.abs(correlation)) < 5 / math.sqrt(steps)
  np.testing.assert_allclose(norms, np.linalg.norm(samples, axis=1), rtol=1e-5)


def test_gaussian_noise_std_per_leaf_in_one_draw():
  gamma = 2.0
  grads = {"big": jnp.zeros((100, 200)), "small": jnp.zeros((50,))}
  transform = ga.isotropic_gradient_augmentation(gamma, seed=7)
  updates, _ = jax.jit(transform.update)(grads, transform.init(grads))
  for name, n in (("big", 20000), ("small", 50)):
    values = np.asarray(updates[name]).ravel()
    np.testing.assert_allclose(
        values.std(), gamma / n, rtol=5 / math.sqrt(2 * n)
    )
    assert abs(values.mean()) < 5 * gamma / n / math.sqrt(n)


def test_linf_noise_bounds_and_std():
  gamma, steps = GAMMA, STEPS
  samples, _ = _zero_grad_noise(distribution="linf")
  bounds = _per_element(gamma / 4, gamma / 3)
  stds = bounds / math.sqrt(3)  # Std of U[-1, 1] is 1 / sqrt(3).
  assert np.all(np.abs(samples) <= bounds * (1 + 1e-6))
  assert np.all(np.abs(samples).max(0) > 0.99 * bounds)
  assert np.all(np.abs(samples.mean(0)) < 5 * stds / math.sqrt(steps))
  # Var of the sample variance of U[-a, a]: (E x^4 - s^4) / T, E x^4 = a^4/5.
  relative_var_error = math.sqrt((9 / 5 - 1) / steps)
  np.testing.assert_allclose(
      samples.var(0), stds**2, rtol=5 * relative_var_error
  )


def test_sphere_noise_norm_and_uniform_direction():
  gamma, steps = GAMMA, STEPS
  samples, norms = _zero_grad_noise(distribution="sphere")
  # xi = sqrt(N) u over all N = 7 elements; "mean" weights gamma / n per leaf.
  weights = _per_element(gamma / 4, gamma / 3)
  xi = samples / weights
  dims = xi.shape[1]
  np.testing.assert_allclose(
      np.linalg.norm(xi, axis=1), math.sqrt(dims), rtol=1e-5
  )
  np.testing.assert_allclose(norms, np.linalg.norm(samples, axis=1), rtol=1e-5)
  # Uniform direction u on the sphere in N dims: E u_j = 0, E u_j^2 = 1/N,
  # Var u_j^2 = 3/(N(N+2)) - 1/N^2.
  directions = xi / math.sqrt(dims)
  assert np.all(np.abs(directions.mean(0)) < 5 / math.sqrt(dims * steps))
  second_moment_se = math.sqrt((3 / (dims * (dims + 2)) - 1 / dims**2) / steps)
  assert np.all(
      np.abs((directions**2).mean(0) - 1 / dims) < 5 * second_moment_se
  )


def test_logged_norm_of_a_large_leaf_is_its_realized_norm():
  gamma, n = 3.0, 300_000
  grads = {"large": jnp.zeros((1000, 300))}
  transform = ga.isotropic_gradient_augmentation(gamma, seed=2)
  updates, state = jax.jit(transform.update)(grads, transform.init(grads))
  realized = np.linalg.norm(np.asarray(updates["large"], np.float64))
  # The large leaf enters with its expected norm gamma / sqrt(n); the realized
  # norm's relative standard deviation is 1 / sqrt(2n).
  np.testing.assert_allclose(
      float(state.noise_norm), gamma / math.sqrt(n), rtol=1e-6
  )
  np.testing.assert_allclose(
      float(state.noise_norm), realized, rtol=5 / math.sqrt(2 * n)
  )


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
  tx = optax.chain(
      ga.isotropic_gradient_augmentation(0.3, seed=11),
      optax.sgd(0.1, momentum=0.9),
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(3):
    _, state = update(grads, state)
  path = tmp_path / "opt_state.msgpack"
  path.write_bytes(flax.serialization.to_bytes(state))
  restored = flax.serialization.from_bytes(tx.init(params), path.read_bytes())
  expected, expected_state = update(grads, state)
  got, got_state = update(grads, restored)
  for a, b in zip(
      jax.tree.leaves((expected, expected_state)),
      jax.tree.leaves((got, got_state)),
  ):
    assert np.array_equal(a, b)
  assert optax.tree_utils.tree_get(got_state, "count") == 4
  # A fresh state would have given other noise: the restore carried the count.
  fresh, _ = update(grads, tx.init(params))
  assert not np.array_equal(fresh["w"], got["w"])


def test_chains_with_momentum_sgd_under_jit():
  params = {"w": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  grads = {"w": jnp.array([0.1, -0.2, 0.3]), "b": jnp.full((2, 2), 0.05)}
  gamma, lr, momentum, steps = 0.2, 0.1, 0.9, 4
  tx = optax.chain(
      ga.isotropic_gradient_augmentation(gamma, seed=5),
      optax.sgd(lr, momentum=momentum),
  )

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, tx.init(params)), None, length=steps)[0][
        0
    ]

  noise, _ = _noise_sequence(
      ga.isotropic_gradient_augmentation(gamma, seed=5),
      jax.tree.map(jnp.zeros_like, grads),
      steps,
  )
  expected = jax.tree.map(np.asarray, params)
  velocity = jax.tree.map(np.zeros_like, expected)
  for t in range(steps):  # Heavy-ball SGD, as optax.sgd defines it.
    for name in expected:
      velocity[name] = momentum * velocity[name] + (
          np.asarray(grads[name]) + np.asarray(noise[name][t])
      )
      expected[name] = expected[name] - lr * velocity[name]
  got = train(params)
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)


def _fixed_draw(grads, seed=0):
  """A draw xi per leaf of `grads` (leaf order) and a sampler returning it."""
  rng = np.random.default_rng(seed)
  draws = [
      rng.normal(size=leaf.shape).astype(np.float32)
      for leaf in jax.tree.leaves(grads)
  ]
  calls = iter(draws)
  return draws, lambda key, shape, dtype: jnp.asarray(next(calls), dtype)


def _one_update(grads, **kwargs):
  """The noise of one un-jitted update from zero gradients."""
  transform = ga.isotropic_gradient_augmentation(**kwargs)
  zeros = jax.tree.map(jnp.zeros_like, grads)
  updates, state = transform.update(zeros, transform.init(zeros))
  return jax.tree.leaves(updates), state


# Three tensors; registered (PyTorch order) as "w", "b", "scale".
_TENSORS = {
    "b": jnp.zeros((2, 3)),
    "scale": jnp.zeros(()),
    "w": jnp.zeros((4,)),
}
_POSITIONS = {"w": 1, "b": 2, "scale": 3}


def test_official_scaling_is_the_official_loops_gradient():
  """(K - k + 1) / n_k * (xi + 1), k the registration position, K = 3."""
  gamma = 0.01
  draws, sampler = _fixed_draw(_TENSORS)
  noise, state = _one_update(
      _TENSORS,
      gamma=gamma,
      scaling="official",
      sampler=sampler,
      registration_order=lambda tree: jax.tree.map(
          lambda _, k: k, tree, _POSITIONS
      ),
  )
  for name, xi, got in zip(sorted(_TENSORS), draws, noise):
    k, n = _POSITIONS[name], max(_TENSORS[name].size, 1)
    np.testing.assert_allclose(
        got, gamma * (3 - k + 1) / n * (xi + 1), rtol=1e-6, err_msg=name
    )
  squared = sum(np.sum(np.square(np.asarray(x))) for x in noise)
  np.testing.assert_allclose(state.noise_norm, math.sqrt(squared), rtol=1e-5)


@pytest.mark.parametrize(
    "scaling, weight", [("mean", lambda n: 1 / n), ("element", lambda n: 1.0)]
)
def test_mean_and_element_scalings_from_a_fixed_draw(scaling, weight):
  gamma = 0.3
  draws, sampler = _fixed_draw(_TENSORS, seed=1)
  noise, _ = _one_update(
      _TENSORS, gamma=gamma, scaling=scaling, sampler=sampler
  )
  for name, xi, got in zip(sorted(_TENSORS), draws, noise):
    n = max(_TENSORS[name].size, 1)
    np.testing.assert_allclose(
        got, gamma * weight(n) * xi, rtol=1e-6, err_msg=name
    )


def test_callable_weights_drift_and_schedule():
  """The general knobs: per-leaf weights, a drift, gamma a schedule."""
  schedule = optax.linear_schedule(1.0, 0.0, transition_steps=4)
  grads = {"a": jnp.zeros((3,)), "b": jnp.zeros((2,))}
  rng = np.random.default_rng(2)
  draws = {
      step: [rng.normal(size=(3,)), rng.normal(size=(2,))] for step in range(3)
  }
  calls = iter([x for step in range(3) for x in draws[step]])
  transform = ga.isotropic_gradient_augmentation(
      schedule,
      scaling=lambda tree: {"a": 2.0, "b": 0.5},
      drift=-0.25,
      sampler=lambda key, shape, dtype: jnp.asarray(next(calls), dtype),
  )
  state = transform.init(grads)
  for step in range(3):
    updates, state = transform.update(grads, state)
    for name, weight, xi in zip(("a", "b"), (2.0, 0.5), draws[step]):
      np.testing.assert_allclose(
          updates[name], schedule(step) * weight * (xi - 0.25), rtol=1e-6
      )


def test_official_noise_statistics_with_the_drift():
  """Over steps: mean gamma * w and std gamma * w per element, w = (K-k+1)/n."""
  gamma, steps = GAMMA, STEPS
  samples, norms = _zero_grad_noise(
      scaling="official",
      seed=3,
      registration_order=lambda tree: {"b": 1, "w": 2},
  )
  # "b" (k = 1, n = 4), then "w" (k = 2, n = 3)
  scales = _per_element(gamma * 2 / 4, gamma * 1 / 3)
  assert np.all(
      np.abs(samples.mean(0) - scales) < 5 * scales / math.sqrt(steps)
  )
  np.testing.assert_allclose(
      samples.std(0), scales, rtol=5 / math.sqrt(2 * steps)
  )
  np.testing.assert_allclose(norms, np.linalg.norm(samples, axis=1), rtol=1e-5)


def test_logged_norm_of_a_large_leaf_with_drift():
  gamma, n = 1.0, 200_000
  grads = {"large": jnp.zeros((n,))}
  transform = ga.isotropic_gradient_augmentation(
      gamma, scaling="element", drift=0.5, seed=4
  )
  updates, state = jax.jit(transform.update)(grads, transform.init(grads))
  realized = np.linalg.norm(np.asarray(updates["large"], np.float64))
  # E ||xi + c||^2 = n (1 + c^2); Var (xi + c)^2 = 2 + 4 c^2, so the realized
  # norm's relative std is sqrt((2 + 4 c^2) / n) / (2 (1 + c^2)) < 0.7/sqrt(n).
  np.testing.assert_allclose(
      float(state.noise_norm), math.sqrt(n * (1 + 0.25)), rtol=1e-6
  )
  np.testing.assert_allclose(
      float(state.noise_norm), realized, rtol=5 / math.sqrt(n)
  )


def test_samplers_give_the_same_statistics():
  gamma = 1.0
  grads = {"big": jnp.zeros((300, 200))}
  for sampler in ("hashed", "threefry", "auto"):
    transform = ga.isotropic_gradient_augmentation(
        gamma, scaling="element", sampler=sampler
    )
    updates, _ = jax.jit(transform.update)(grads, transform.init(grads))
    values = np.asarray(updates["big"]).ravel()
    n = values.size
    assert abs(values.mean()) < 5 / math.sqrt(n), sampler
    assert abs(values.var() - 1) < 5 * math.sqrt(2 / n), sampler


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gamma": -0.1}, "gamma must be finite and >= 0"),
        ({"gamma": float("inf")}, "gamma must be finite and >= 0"),
        ({"gamma": 0.1, "distribution": "laplace"}, "distribution='laplace'"),
        ({"gamma": 0.1, "scaling": "layer"}, "scaling='layer'"),
        ({"gamma": 0.1, "sampler": "philox"}, "sampler='philox'"),
        ({"gamma": 0.1, "drift": float("nan")}, "drift must be finite"),
    ],
)
def test_isotropic_rejects_bad_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ga.isotropic_gradient_augmentation(**kwargs)


def test_official_scaling_needs_a_registration_order():
  grads = _zero_grads()
  missing = ga.isotropic_gradient_augmentation(0.1, scaling="official")
  with pytest.raises(ValueError, match="needs registration_order"):
    missing.update(grads, missing.init(grads))
  repeated = ga.isotropic_gradient_augmentation(
      0.1, scaling="official", registration_order=lambda t: {"b": 1, "w": 1}
  )
  with pytest.raises(ValueError, match="positions 1..2 once each"):
    repeated.update(grads, repeated.init(grads))
