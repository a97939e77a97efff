"""Implicit isotropic gradient augmentation as an optax transformation.

Isotropic GA (Huang, Zhang, Zhou, Gao, "Adversarial and Isotropic Gradient
Augmentation for Image Retrieval with Text Feedback", IEEE TMM 25 (2023)
7415-7427) adds a fresh isotropic random vector to the parameter gradient at
every step, the gradient of the random linear loss `gamma * <r, theta>`: over
steps the noise has mean zero (but for the official code's drift, below), so
the expected descent direction is kept while each step's direction is spread
inside a ball around it. For each gradient leaf (tensor) k of n_k elements,

  g_k <- g_k + gamma * w_k * (xi_k + c),

xi_k an isotropic draw and the weight w_k and drift c set by `scaling`:

* "mean":    w_k = 1 / n_k, c = 0: the gradient of `gamma * mean(xi * theta)`
  per tensor;
* "element": w_k = 1, c = 0: the paper's `L = gamma * r . theta`, gamma * xi
  on every element;
* "official": w_k = (K - k + 1) / n_k, c = 1, k the position of the tensor in
  PyTorch's registration order (`named_parameters()`) of the same model, K
  the number of tensors. The official code adds, inside its loop over
  `named_parameters()`, the running sum `0.01 * sum_{j <= k} [mean(randn_like
  (theta_j) * theta_j) + mean(theta_j)]` to the loss at every iteration, so
  tensor k's terms are counted K - k + 1 times and `mean(theta_k)` adds a
  constant 1/n_k (docs/gradient_augmentation.md compares the three sizes).

A callable `scaling(updates) -> pytree of per-leaf weights` and `drift` are
the general knobs the presets are made of.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from irtf_jax.regularizers import _checks
from irtf_jax.regularizers import sampling

SCALINGS = ("mean", "element", "official")
DISTRIBUTIONS = ("gaussian", "linf", "sphere")
# Per-element variance of xi under each distribution.
_VARIANCE = {"gaussian": 1.0, "linf": 1.0 / 3.0, "sphere": 1.0}
# Leaves with more elements than this enter the logged noise norm with their
# expected squared norm: a second reduction over a leaf's draws would give the
# noise two consumers, and XLA would then materialize it (or draw it twice)
# instead of fusing the draw into the optimizer's update. Their realized
# squared norm differs from its expectation by a relative sqrt(2/n) < 0.6%.
_EXACT_NORM_MAX_SIZE = 2**16

_CALLER = "isotropic_gradient_augmentation"


class IsotropicGradientAugmentationState(NamedTuple):
  """State of `isotropic_gradient_augmentation`: a pytree of arrays.

  Attributes:
    key_data: the PRNG key as raw uint32 data (`jax.random.key_data`), so the
      state serializes like any array.
    count: number of updates so far (int32); step t draws from
      `fold_in(key, t)`, so the noise depends only on (seed, t) and a
      restored state continues the exact sequence.
    noise_norm: l2 norm of the noise added by the last update (0 before the
      first), for logging.
  """

  key_data: jax.Array
  count: jax.Array
  noise_norm: jax.Array


def _positions_and_sizes(updates, registration_order) -> list[tuple[int, int]]:
  if registration_order is None:
    raise ValueError(
        f'{_CALLER}: scaling="official" needs registration_order, a function '
        "of the gradient pytree giving each leaf's 1-based position in "
        "PyTorch's named_parameters() order of the same model (for irtf-jax "
        "models: irtf_jax.models.official_parameter_positions)."
    )
  leaves = jax.tree.leaves(updates)
  positions = jax.tree.leaves(registration_order(updates))
  if sorted(positions) != list(range(1, len(leaves) + 1)):
    raise ValueError(
        f"{_CALLER}: registration_order must give the {len(leaves)} gradient "
        f"leaves the positions 1..{len(leaves)} once each, got {positions}."
    )
  return [(int(k), leaf.size) for k, leaf in zip(positions, leaves)]


def leaf_weights(
    updates: Any,
    scaling: str | Callable[[Any], Any],
    registration_order: Callable[[Any], Any] | None = None,
) -> list[float]:
  """The weight w_k of each leaf of `updates` (in `jax.tree.leaves` order)."""
  leaves = jax.tree.leaves(updates)
  if callable(scaling):
    weights = [float(w) for w in jax.tree.leaves(scaling(updates))]
    if len(weights) != len(leaves):
      raise ValueError(
          f"{_CALLER}: scaling(updates) gave {len(weights)} "
          f"weights for {len(leaves)} gradient leaves."
      )
    return weights
  if scaling == "mean":
    return [1.0 / max(leaf.size, 1) for leaf in leaves]
  if scaling == "element":
    return [1.0] * len(leaves)
  if scaling == "official":
    count = len(leaves)
    return [
        (count - k + 1) / max(n, 1)
        for k, n in _positions_and_sizes(updates, registration_order)
    ]
  raise ValueError(
      f"{_CALLER}: scaling={scaling!r} is not one of {SCALINGS} "
      "or a callable returning per-leaf weights."
  )


def _check_floating(leaves) -> None:
  for leaf in leaves:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"{_CALLER}: gradient leaf of dtype {leaf.dtype}; only real floating "
          "gradients can be augmented (mask the others out with "
          "optax.masked)."
      )


def _draws(leaves, key, distribution, sampler):
  """xi per leaf: unit per-element variance (a third of it for "linf")."""
  keys = jax.random.split(key, max(len(leaves), 1))
  if distribution == "linf":
    draw = sampling.uniform_sampler(sampler)
  else:
    draw = sampling.normal_sampler(sampler)
  raw = [draw(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
  if distribution != "sphere":
    return raw
  # sqrt(N) u, u uniform on the unit sphere of all N elements together.
  total = sum(leaf.size for leaf in leaves)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(r.astype(jnp.float32))) for r in raw))
  factor = math.sqrt(total) / norm
  return [r * factor.astype(r.dtype) for r in raw]


def _noise_and_squared_norm(
    updates, key, gamma, weights, drift, distribution, sampler
):
  leaves, treedef = jax.tree.flatten(updates)
  _check_floating(leaves)
  squared_norm = jnp.zeros([], jnp.float32)
  noise = []
  for xi, leaf, weight in zip(
      _draws(leaves, key, distribution, sampler), leaves, weights
  ):
    scale = gamma * weight
    shifted = xi + drift if drift else xi
    noise.append(shifted * jnp.asarray(scale, leaf.dtype))
    if leaf.size > _EXACT_NORM_MAX_SIZE:
      expected = leaf.size * (_VARIANCE[distribution] + drift**2)
      squared_norm += jnp.square(scale) * expected
    else:
      squared_norm += jnp.square(scale) * jnp.sum(
          jnp.square(shifted.astype(jnp.float32))
      )
  return jax.tree.unflatten(treedef, noise), squared_norm


def _check_options(scaling, drift, distribution):
  if not callable(scaling) and scaling not in SCALINGS:
    raise ValueError(
        f"{_CALLER}: scaling={scaling!r} is not one of "
        f"{SCALINGS} or a callable returning per-leaf weights."
    )
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
        f"{_CALLER}: distribution={distribution!r} is not one "
        f"of {DISTRIBUTIONS}."
    )
  if drift is None:
    return 1.0 if scaling == "official" else 0.0
  drift = float(drift)
  if not math.isfinite(drift):
    raise ValueError(f"{_CALLER}: drift must be finite, got {drift!r}.")
  return drift


def isotropic_noise(
    updates: Any,
    key: jax.Array,
    *,
    gamma: Any,
    scaling: str | Callable[[Any], Any] = "mean",
    registration_order: Callable[[Any], Any] | None = None,
    drift: float | None = None,
    distribution: str = "gaussian",
    sampler: str | sampling.Sampler = "auto",
) -> Any:
  """The noise `gamma * w_k * (xi_k + c)` for each leaf of `updates` (pure).

  Arguments as in `isotropic_gradient_augmentation`; `key` is a PRNG key, split
  once per leaf, and a callable `sampler` is called once per leaf in
  `jax.tree.leaves` order.
  """
  drift = _check_options(scaling, drift, distribution)
  weights = leaf_weights(updates, scaling, registration_order)
  return _noise_and_squared_norm(
      updates, key, gamma, weights, drift, distribution, sampler
  )[0]


def isotropic_gradient_augmentation(
    gamma: float | optax.Schedule,
    *,
    seed: int = 0,
    scaling: str | Callable[[Any], Any] = "mean",
    registration_order: Callable[[Any], Any] | None = None,
    drift: float | None = None,
    distribution: str = "gaussian",
    sampler: str | sampling.Sampler = "auto",
) -> optax.GradientTransformation:
  """Isotropic gradient augmentation: `g_k += gamma * w_k * (xi_k + c)`.

  Put it first in an `optax.chain`, before weight decay, momentum and the
  learning rate, where the official loss term's gradient went:

  >>> import jax.numpy as jnp, optax
  >>> tx = optax.chain(isotropic_gradient_augmentation(1e-2, seed=0),
  ...                  optax.sgd(1e-2, momentum=0.9))
  >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state)
  >>> float(optax.tree_utils.tree_get(state, "noise_norm")) > 0
  True

  The noise comes from a PRNG key in the transform's state (as in
  `optax.add_noise`): update t uses `fold_in(key(seed), t)`, split per leaf, so
  the state (`IsotropicGradientAugmentationState`) is checkpointed with the
  rest of the optimizer state and a resumed run adds the noise an
  uninterrupted one would. Under `jax.pmap` put it after the `lax.pmean` of
  gradients with a replicated state: every device then adds the same noise.
  On a CPU, jit the step with `compiler_options=
  irtf_jax.parallel.step_compiler_options()` (512-bit vectors where the CPU
  has them), as the trainer does: the fused draw then costs about half.

  Args:
    gamma: noise scale (the official code: 1e-2), >= 0, or an optax schedule
      of the update count. A constant 0 passes updates through unchanged (the
      state still counts and reports a zero norm).
    seed: seed of the PRNG key.
    scaling: "mean" (default), "element", "official" (see the module
      docstring), or a callable `scaling(updates)` returning a pytree of
      per-leaf weights w_k.
    registration_order: for "official": `registration_order(updates)` gives a
      pytree like `updates` of each leaf's 1-based position in PyTorch's
      `named_parameters()` order of the same model.
    drift: the constant c added to every xi; None for the preset's (1 for
      "official", else 0).
    distribution: law of xi: "gaussian" (N(0, 1) per element), "linf"
      (uniform on [-1, 1] per element) or "sphere" (sqrt(N) times a direction
      uniform on the unit sphere of all N parameters together).
    sampler: "auto" (`sampling.hashed_normal` on CPU, where it is ~5x
      cheaper, `jax.random.normal` on GPU and TPU), "threefry", "hashed", or
      a callable `(key, shape, dtype) -> xi` called once per leaf.

  Returns:
    An `optax.GradientTransformation`; `optax.tree_utils.tree_get(state,
    "noise_norm")` reads the l2 norm of the last noise (leaves of more than
    2^16 elements enter it with their expected norm).

  Raises:
    ValueError: for a negative or non-finite gamma, an unknown scaling or
      distribution, or "official" without a valid registration_order.
  """
  gamma = _checks.check_scale(gamma, "gamma", _CALLER, "1e-2")
  drift = _check_options(scaling, drift, distribution)
  if not callable(sampler):
    sampling.normal_sampler(sampler)  # fails now on an unknown name
  constant_zero = _checks.is_zero(gamma)

  def init_fn(params):
    del params
    return IsotropicGradientAugmentationState(
        key_data=jax.random.key_data(jax.random.key(seed)),
        count=jnp.zeros([], jnp.int32),
        noise_norm=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    if constant_zero:
      return updates, state._replace(count=count)
    scale = gamma(state.count) if callable(gamma) else gamma
    key = jax.random.fold_in(
        jax.random.wrap_key_data(state.key_data), state.count
    )
    weights = leaf_weights(updates, scaling, registration_order)
    noise, squared_norm = _noise_and_squared_norm(
        updates, key, scale, weights, drift, distribution, sampler
    )
    updates = jax.tree.map(lambda g, n: g + n, updates, noise)
    return updates, IsotropicGradientAugmentationState(
        key_data=state.key_data, count=count, noise_norm=jnp.sqrt(squared_norm)
    )

  return optax.GradientTransformation(init_fn, update_fn)
