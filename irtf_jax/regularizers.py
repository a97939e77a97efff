"""Gradient Augmentation (GA) regularizers and the FGSM adversarial baseline.

Gradient Augmentation (Huang, Zhang, Zhou, Gao, "Adversarial and Isotropic
Gradient Augmentation for Image Retrieval with Text Feedback", IEEE TMM 25
(2023) 7415-7427) has two parts, both here:

* explicit **adversarial GA** (`adversarial_gradient_penalty`): a loss wrapper
  adding the dual-norm penalty of the loss gradient w.r.t. an input, the
  first-order form of FGSM adversarial training;
* implicit **isotropic GA** (`isotropic_gradient_augmentation`): an optax
  `GradientTransformation` adding scaled isotropic noise to every gradient.

`fgsm_adversarial_loss` is the adversarial-training baseline the penalty
approximates (Goodfellow, Shlens, Szegedy, "Explaining and Harnessing
Adversarial Examples", ICLR 2015).

This module depends only on jax and optax.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

_DUAL_NORM_ORDERS = (1.0, 2.0, math.inf)
_DISTRIBUTIONS = ("gaussian", "linf", "sphere")


# ---------------------------------------------------------------------------
# Validation helpers.


def _check_scale(value: float, name: str, caller: str,
                 example: str) -> float:
  """Returns `value` as a finite float >= 0, or raises a one-line ValueError."""
  try:
    number = float(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(
        f"{caller}: {name} must be a Python number, got {value!r}; pass a "
        f"float such as {example}.") from e
  if not math.isfinite(number) or number < 0:
    raise ValueError(
        f"{caller}: {name} must be finite and >= 0, got {value!r}; pass a "
        f"float such as {example} (0 disables the term).")
  return number


def _check_epsilon(epsilon: float, caller: str) -> float:
  return _check_scale(epsilon, "epsilon", caller, "1e-6")


def _check_q(q: float, caller: str) -> float:
  """Returns `q` as a float in {1, 2, inf}, or raises a one-line ValueError."""
  try:
    value = float(q)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{caller}: q must be 1, 2 or inf, got {q!r}; "
        "pass q=1.0 (l-inf perturbation), 2.0 (l2) or float('inf') (l1)."
    ) from e
  if value not in _DUAL_NORM_ORDERS:
    raise ValueError(
        f"{caller}: q must be 1, 2 or inf, got {q!r}; "
        "pass q=1.0 (l-inf perturbation), 2.0 (l2) or float('inf') (l1).")
  return value


def _check_argnum(argnum: int, num_args: int, caller: str) -> None:
  if not 0 <= argnum < num_args:
    raise ValueError(
        f"{caller}: argnum={argnum} but the loss function was called with "
        f"{num_args} positional arguments; set argnum to the position of the "
        "batched input to perturb (keyword arguments cannot be perturbed).")


def _batch_size(inputs: Any, caller: str, what: str) -> int:
  """The shared leading-axis size of the leaves of `inputs`, validated.

  Args:
    inputs: a pytree of arrays.
    caller: the public function, for error messages.
    what: what `inputs` is, for error messages ("argument 1").
  """
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError(
        f"{caller}: {what} has no array leaves; set argnum to the batched "
        "input to perturb.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
          f"{caller}: {what} has a leaf of dtype "
          f"{jnp.result_type(leaf)}; the perturbed input must be floating "
          "point (pass integer data such as token ids in another argument).")
    if jnp.ndim(leaf) < 1:
      raise ValueError(
          f"{caller}: {what} has a scalar leaf; every leaf needs a "
          "leading batch axis.")
  sizes = {int(jnp.shape(leaf)[0]) for leaf in leaves}
  if len(sizes) != 1:
    raise ValueError(
        f"{caller}: the leaves of {what} have different leading "
        f"(batch) sizes {sorted(sizes)}; give every leaf the same batch axis.")
  return sizes.pop()


# ---------------------------------------------------------------------------
# Explicit adversarial gradient augmentation.


class AdversarialTerms(NamedTuple):
  """The two terms of an adversarially regularized loss, for logging.

  Attributes:
    loss: the clean loss L (loss_fn's value).
    penalty: the adversarial gradient penalty P (0 when epsilon == 0).
  """
  loss: jax.Array
  penalty: jax.Array


def dual_norm_penalty(input_grad: Any, *, epsilon: float,
                      q: float = 1.0) -> jax.Array:
  """The adversarial GA penalty from the gradient of a batch-mean loss.

  With `g_i = B * dL/dx_i` (example i of the batched pytree `input_grad`, all
  its leaves flattened and concatenated, B the leading batch size) and `d` the
  number of elements of one example,

    P = (epsilon / 2) * d ** (1 - 1/q) * mean_i ||g_i||_q.

  At g_i = 0 the 2-norm uses the subgradient 0 (as PyTorch's norm does), so a
  term that does not depend on x contributes no NaN to the gradient.

  Args:
    input_grad: pytree of arrays sharing a leading batch axis: dL/dx.
    epsilon: perturbation radius, finite and >= 0.
    q: dual norm order, 1, 2 or inf.

  Returns:
    The scalar penalty P.
  """
  epsilon = _check_epsilon(epsilon, "dual_norm_penalty")
  q = _check_q(q, "dual_norm_penalty")
  batch = _batch_size(input_grad, "dual_norm_penalty", "input_grad")
  leaves = [leaf.reshape(batch, -1) * batch
            for leaf in jax.tree.leaves(input_grad)]
  example_size = sum(leaf.shape[1] for leaf in leaves)
  if q == 1.0:
    norms = sum(jnp.sum(jnp.abs(leaf), axis=1) for leaf in leaves)
  elif q == 2.0:
    squared = sum(jnp.sum(jnp.square(leaf), axis=1) for leaf in leaves)
    positive = squared > 0
    norms = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1)), 0)
  else:
    norms = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(leaf), axis=1) for leaf in leaves])
  scale = 0.5 * epsilon * float(example_size) ** (1.0 - 1.0 / q)
  return scale * jnp.mean(norms)


def _loss_and_input_grad(loss_fn: Callable[..., Any], args: tuple,
                         kwargs: dict, argnum: int, has_aux: bool,
                         caller: str):
  """One forward and one backward pass of loss_fn w.r.t. argument `argnum`.

  Returns:
    (loss, aux or None, dL/dx, loss_of_inputs), the last being loss_fn as a
    function of argument `argnum` alone, the other arguments fixed.
  """
  _check_argnum(argnum, len(args), caller)
  inputs = args[argnum]
  _batch_size(inputs, caller, f"argument {argnum}")

  def loss_of_inputs(x):
    return loss_fn(*args[:argnum], x, *args[argnum + 1:], **kwargs)

  value, input_grad = jax.value_and_grad(
      loss_of_inputs, has_aux=has_aux)(inputs)
  loss, aux = value if has_aux else (value, None)
  return loss, aux, input_grad, loss_of_inputs


def adversarial_gradient_penalty(
    loss_fn: Callable[..., Any], *, epsilon: float, q: float = 1.0,
    argnum: int = 1, has_aux: bool = False,
    with_penalty_in_aux: bool = False) -> Callable[..., Any]:
  """Wraps a loss with the explicit adversarial gradient augmentation penalty.

  The returned function has loss_fn's signature and returns `L + P` where L is
  loss_fn's value (a mean over the batch) and

    P = (epsilon / 2) * d ** (1 - 1/q) * mean_i || B * dL/dx_i ||_q,

  x being positional argument `argnum` (a pytree whose leaves share a leading
  batch axis of size B), x_i its example i with all leaves flattened together
  and d the number of elements of one example.

  Derivation (Huang et al., TMM 2023). FGSM adversarial training
  minimises the mean of the clean and adversarial losses,
  `(L(x) + max_{||delta||_p <= eps} L(x + delta)) / 2`. To first order
  `L(x + delta) ~ L(x) + <grad_x L, delta>`, and by Hoelder's inequality the
  maximum of the linear term over the p-ball is `eps * ||grad_x L||_q` with
  1/p + 1/q = 1 (attained by delta = eps * sign(grad) for p = inf, q = 1).
  Hence the objective is `L(x) + (eps / 2) * ||grad_x L||_q`: the /2 comes from
  averaging the clean and adversarial losses. The per-example form, the factor
  B (which turns the gradient of a batch-mean loss into the gradient of
  example i's own term) and the dimension factor d ** (1 - 1/q) (so eps keeps
  one scale across norms: ||v||_1 <= d ** (1 - 1/q) * ||v||_q) follow the
  official implementation, so eps means what it meant there. That code uses
  eps = 1e-6 and q = 1 on the query-image pixels (after ImageNet
  normalisation), penalising the gradient of the batch-based classification
  loss only.

  The gradient of P w.r.t. the other arguments (the parameters) comes from
  differentiating through `jax.grad` (double backpropagation); it costs
  roughly one more forward and two more backward passes.

  Parallelism: under `jax.jit` with the batch sharded over devices the wrapper
  sees the global batch and computes the global P. Under `jax.pmap` (local
  batch, local mean loss, then `lax.pmean` of gradients) the result equals the
  global one when L is a mean of per-example terms, because B * dL/dx_i is then
  example i's own gradient whatever B is. For losses coupling examples (such as
  softmax cross-entropy over in-batch negatives) the pmap form uses the local
  batch as the set of negatives, as the loss itself does.

  Args:
    loss_fn: `loss_fn(*args, **kwargs)` returning a scalar batch-mean loss, or
      `(loss, aux)` when `has_aux`.
    epsilon: perturbation radius eps, finite and >= 0. With epsilon == 0 the
      wrapper is an exact no-op: loss_fn itself is returned (unless
      `with_penalty_in_aux`, which then reports a zero penalty).
    q: dual norm order: 1 (l-inf perturbations, the official setting), 2, or
      inf (l1 perturbations).
    argnum: position of the batched input x to perturb.
    has_aux: whether loss_fn returns `(loss, aux)`; aux (e.g. BatchNorm
      statistics) comes from the single clean forward pass and is passed
      through unchanged.
    with_penalty_in_aux: also return the terms for logging. The wrapper then
      returns `(L + P, AdversarialTerms(loss=L, penalty=P))`, or with
      `has_aux` `(L + P, (aux, AdversarialTerms(loss=L, penalty=P)))`; use
      `jax.value_and_grad(..., has_aux=True)` either way.

  Returns:
    The regularized loss function.

  Raises:
    ValueError: for epsilon < 0 or not finite, or q not in {1, 2, inf}.
  """
  caller = "adversarial_gradient_penalty"
  epsilon = _check_epsilon(epsilon, caller)
  q = _check_q(q, caller)

  if epsilon == 0.0 and not with_penalty_in_aux:
    return loss_fn

  @functools.wraps(loss_fn)
  def regularized_loss(*args, **kwargs):
    if epsilon == 0.0:
      value = loss_fn(*args, **kwargs)
      loss, aux = value if has_aux else (value, None)
      penalty = jnp.zeros_like(loss)
      total = loss
    else:
      loss, aux, input_grad, _ = _loss_and_input_grad(
          loss_fn, args, kwargs, argnum, has_aux, caller)
      penalty = dual_norm_penalty(input_grad, epsilon=epsilon, q=q)
      total = loss + penalty.astype(jnp.result_type(loss))
    if with_penalty_in_aux:
      terms = AdversarialTerms(loss=loss, penalty=penalty)
      return total, ((aux, terms) if has_aux else terms)
    return (total, aux) if has_aux else total

  return regularized_loss


def adversarial_penalty(loss_fn: Callable[..., Any], *, epsilon: float,
                        q: float = 1.0, argnum: int = 1,
                        has_aux: bool = False) -> Callable[..., jax.Array]:
  """The penalty P of `adversarial_gradient_penalty` alone.

  Same arguments and conventions as `adversarial_gradient_penalty`; the
  returned function has loss_fn's signature and returns the scalar P only
  (for logging or evaluation; to train, prefer `adversarial_gradient_penalty`
  with `with_penalty_in_aux=True`, which shares the forward pass).
  """
  wrapped = adversarial_gradient_penalty(
      loss_fn, epsilon=epsilon, q=q, argnum=argnum, has_aux=has_aux,
      with_penalty_in_aux=True)

  @functools.wraps(loss_fn)
  def penalty(*args, **kwargs):
    _, extra = wrapped(*args, **kwargs)
    return (extra[1] if has_aux else extra).penalty

  return penalty


def fgsm_adversarial_loss(loss_fn: Callable[..., Any], *, epsilon: float,
                          argnum: int = 1,
                          has_aux: bool = False) -> Callable[..., Any]:
  """Wraps a loss with FGSM adversarial training (Goodfellow et al., 2015).

  The returned function has loss_fn's signature and returns

    (L(x) + L(x + epsilon * sign(dL/dx))) / 2,

  x being positional argument `argnum` (any pytree of floating arrays). The
  perturbation is a constant (`stop_gradient`): gradients w.r.t. the other
  arguments are the mean of the clean and adversarial gradients, with no
  second-order term. The first-order expansion of this objective is the
  adversarial gradient penalty with q = 1 (see
  `adversarial_gradient_penalty`), without its batch and dimension scaling.

  Args:
    loss_fn: `loss_fn(*args, **kwargs)` returning a scalar, or `(loss, aux)`
      when `has_aux`.
    epsilon: l-inf radius of the perturbation, finite and >= 0; 0 returns
      loss_fn itself.
    argnum: position of the input to perturb.
    has_aux: whether loss_fn returns `(loss, aux)`; the aux of the clean pass
      is returned (the adversarial pass's aux, e.g. BatchNorm statistics of
      perturbed inputs, is dropped).

  Returns:
    The adversarially trained loss function.
  """
  epsilon = _check_epsilon(epsilon, "fgsm_adversarial_loss")
  if epsilon == 0.0:
    return loss_fn
  caller = "fgsm_adversarial_loss"

  @functools.wraps(loss_fn)
  def adversarial_loss(*args, **kwargs):
    loss, aux, input_grad, loss_of_inputs = _loss_and_input_grad(
        loss_fn, args, kwargs, argnum, has_aux, caller)
    perturbed = jax.tree.map(
        lambda x, g: x + jax.lax.stop_gradient(epsilon * jnp.sign(g)).astype(
            x.dtype), args[argnum], input_grad)
    adversarial_value = loss_of_inputs(perturbed)
    adversarial = adversarial_value[0] if has_aux else adversarial_value
    total = (loss + adversarial) / 2
    return (total, aux) if has_aux else total

  return adversarial_loss


# ---------------------------------------------------------------------------
# Implicit isotropic gradient augmentation.


class IsotropicGradientAugmentationState(NamedTuple):
  """State of `isotropic_gradient_augmentation`: a pytree of arrays.

  Attributes:
    key_data: the transform's PRNG key as raw uint32 data
      (`jax.random.key_data`), so that the state serializes like any array.
    count: number of updates made so far (int32); step t draws its noise from
      `fold_in(key, t)`, so noise depends only on (seed, t) and a restored
      state continues the exact sequence.
    noise_norm: l2 norm over all leaves of the noise added by the last update
      (0 before the first), for logging; leaves of more than 2^16 elements
      enter it with their expected norm (`_noise_and_squared_norm`).
  """
  key_data: jax.Array
  count: jax.Array
  noise_norm: jax.Array


# Bits: a counter-based integer hash keyed per leaf and step by threefry.
# `jax.random.normal` spends ~20 threefry rounds per element; for the 42M
# parameters of ResNet-18 + TIRG-LastConv that is ~0.6 s per step on a 2-core
# CPU, half the step. One keyed bijection of the element index costs about as
# much as reading the gradient once, and fuses into the optimizer update.
_GOLDEN_RATIO_32 = 0x9E3779B1

# Giles, "Approximating the erfinv function" (GPU Computing Gems, 2011):
# single-precision coefficients of erfinv(x) / x as polynomials in
# t = w - 2.5 (w < 5) and t = sqrt(w) - 3 (w >= 5), w = -log(1 - x^2).
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06,
                   -4.39150654e-06, 0.00021858087, -0.00125372503,
                   -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322,
                -0.00367342844, 0.00573950773, -0.0076224613,
                0.00943887047, 1.00167406, 2.83297682)


def _mix32(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons, 2018): a bijective, fully avalanching hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hashed_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 random bits: `mix32((i ^ k0) * phi + k1)` for element index i.

  (k0, k1) are two threefry words of `key`; for a fixed key the map from i is
  a bijection of uint32, so the elements of one draw never repeat a word, and
  a new key gives a new bijection. Arrays of 2^32 elements or more are refused.
  """
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(
        f"hashed_bits: an array of shape {shape} has {size} >= 2^32 elements; "
        "the counter is 32-bit. Split the array into smaller leaves.")
  k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _mix32((index ^ k0) * jnp.uint32(_GOLDEN_RATIO_32) + k1)


def _symmetric_uniform(bits: jax.Array) -> jax.Array:
  """float32 uniform on the 2^23 points -1 + 2^-23 + k 2^-22 (mean exactly 0).

  The top 23 bits become the mantissa of a float in [1, 2); every operation
  after that is exact in float32.
  """
  one_to_two = jax.lax.bitcast_convert_type(
      (bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  return one_to_two * 2.0 - 3.0 + jnp.float32(2.0**-23)


def _erfinv(x: jax.Array) -> jax.Array:
  """erfinv for float32 x in (-1, 1) (Giles 2011, relative error < 4e-7).

  Both branches share one Horner loop whose coefficients are selected per
  element: on CPU this is ~20% cheaper than `lax.erf_inv`, which evaluates
  both polynomials.
  """
  w = -jnp.log((1.0 - x) * (1.0 + x))
  central = w < 5.0
  t = jnp.where(central, w - 2.5, jnp.sqrt(jnp.maximum(w, 5.0)) - 3.0)
  p = jnp.zeros_like(x)
  for c, d in zip(_ERFINV_CENTRAL, _ERFINV_TAIL):
    p = p * t + jnp.where(central, jnp.float32(c), jnp.float32(d))
  return p * x


def hashed_normal(key: jax.Array, shape: tuple[int, ...],
                  dtype=jnp.float32) -> jax.Array:
  """Standard normal samples from `hashed_bits` by inverse transform.

  x = sqrt(2) erfinv(u) for u uniform on the symmetric 23-bit grid of
  `_symmetric_uniform`: the same resolution as `jax.random.normal` (|x| up to
  5.3), at a fraction of its cost.
  """
  uniform = _symmetric_uniform(hashed_bits(key, shape))
  return (jnp.float32(math.sqrt(2.0)) * _erfinv(uniform)).astype(dtype)


def _leaf_noise(key: jax.Array, leaf: jax.Array, distribution: str):
  """One leaf's unscaled noise: N(0, I) or U[-1, 1]^n in the leaf's dtype."""
  if distribution == "linf":
    return _symmetric_uniform(hashed_bits(key, leaf.shape)).astype(leaf.dtype)
  return hashed_normal(key, leaf.shape, leaf.dtype)


# Leaves with more elements than this enter the logged noise norm with their
# expected squared norm (see `_noise_and_squared_norm`).
_EXACT_NORM_MAX_SIZE = 2**16


def _noise_and_squared_norm(updates: Any, key: jax.Array, gamma: float,
                            distribution: str) -> tuple[Any, jax.Array]:
  """`isotropic_noise` and its squared l2 norm (for logging).

  A second reduction over a leaf's draws gives the noise two consumers, so XLA
  writes it to memory (or draws it twice) instead of fusing the draw into the
  optimizer's update; for the 42M parameters of the default model that costs
  as much as the draw. So leaves of more than 2^16 elements enter the norm
  with their expected squared norm, (gamma/n)^2 E||xi||^2 = gamma^2 / n
  (gaussian; a third of it for "linf"): their realized values differ from it
  by a relative sqrt(2/n) < 0.6%, on terms that are together a small share of
  the total, which the small leaves (biases, scales) dominate. The noise itself
  is always drawn in full.
  """
  leaves, treedef = jax.tree.flatten(updates)
  for leaf in leaves:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"isotropic_gradient_augmentation: gradient leaf of dtype "
          f"{leaf.dtype}; only real floating gradients can be augmented "
          "(mask the other leaves out with optax.masked).")
  keys = jax.random.split(key, max(len(leaves), 1))
  raw = [_leaf_noise(k, leaf, distribution) for k, leaf in zip(keys, leaves)]

  def raw_squared_norm(r):
    return jnp.sum(jnp.square(r.astype(jnp.float32)))

  if distribution == "sphere":
    # Normalizing needs every draw's realized norm; the result's is known.
    target_norm = gamma * math.sqrt(
        sum(1.0 / leaf.size for leaf in leaves if leaf.size))
    if target_norm == 0.0:
      return (jax.tree.map(jnp.zeros_like, updates),
              jnp.zeros([], jnp.float32))
    factor = target_norm / jnp.sqrt(sum(raw_squared_norm(r) for r in raw))
    noise = [r * factor.astype(r.dtype) for r in raw]
    return jax.tree.unflatten(treedef, noise), jnp.float32(target_norm**2)
  element_variance = 1.0 / 3.0 if distribution == "linf" else 1.0
  squared_norm = jnp.zeros([], jnp.float32)
  noise = []
  for r, leaf in zip(raw, leaves):
    scale = gamma / max(leaf.size, 1)
    noise.append(r * jnp.asarray(scale, r.dtype))
    if leaf.size > _EXACT_NORM_MAX_SIZE:
      squared_norm += scale**2 * element_variance * leaf.size
    else:
      squared_norm += scale**2 * raw_squared_norm(r)
  return jax.tree.unflatten(treedef, noise), squared_norm


def isotropic_noise(updates: Any, key: jax.Array, *, gamma: float,
                    distribution: str = "gaussian") -> Any:
  """Draws the isotropic GA noise for a gradient pytree (a pure function).

  For each leaf of n elements (n > 0):

  * "gaussian": `gamma * xi / n` with `xi ~ N(0, I_n)`, the gradient of
    `gamma * mean(xi * theta)`;
  * "linf": the same with `xi ~ U[-1, 1]^n` (per-element std gamma/(n*sqrt 3));
  * "sphere": one direction `u` uniform on the unit sphere of the whole
    parameter vector (all leaves), scaled to the root-mean-square norm of the
    gaussian noise, `gamma * sqrt(sum_leaves 1/n)`.

  The samples come from `hashed_normal` / `hashed_bits` (see
  `isotropic_gradient_augmentation`).

  Args:
    updates: pytree of floating arrays (the gradients).
    key: a PRNG key (new-style or raw uint32).
    gamma: noise scale, finite and >= 0.
    distribution: "gaussian", "linf" or "sphere".

  Returns:
    A pytree like `updates` holding the noise.
  """
  return _noise_and_squared_norm(updates, key, gamma, distribution)[0]


def isotropic_gradient_augmentation(
    gamma: float, *, seed: int = 0,
    distribution: str = "gaussian") -> optax.GradientTransformation:
  """Implicit isotropic gradient augmentation as an optax transformation.

  Each update adds fresh isotropic noise to the gradient (Huang et al., TMM
  2023): for every leaf of n elements,

    g <- g + gamma * xi / n,    xi ~ N(0, I_n),

  the gradient of the random linear loss `gamma * mean(xi * theta)`. Over
  steps the noise has mean zero, so the expected descent direction is
  unchanged while each step's direction is spread inside a ball around it.
  See `isotropic_noise` for the "linf" and "sphere" options. Put it first in
  an `optax.chain`, before momentum and the learning rate, so that the noise
  goes where the official loss term's gradient went:
  `optax.chain(isotropic_gradient_augmentation(1e-2), optax.sgd(...))`.

  The noise is drawn from a PRNG key kept in the transform's state (as
  `optax.add_noise` does): step t uses `fold_in(key(seed), t)`, split per
  leaf, and each leaf's samples come from `hashed_normal` (a keyed integer
  hash of the element index turned normal by inverse transform), which fuses
  into the optimizer's update: on the 2-core CPU, isotropic GA on the default
  model's 42M parameters costs about 7% of a step where
  `jax.random.normal` cost half of one (benchmarks/README.md). The state is a
  pytree of arrays (`IsotropicGradientAugmentationState`), so it is
  checkpointed with the rest of the optimizer state and a resumed run adds the
  same noise as an uninterrupted one. Under `jax.pmap` put it after the
  `lax.pmean` of gradients with a replicated state: every device then adds the
  same noise and the replicas stay identical. `optax.tree_utils.tree_get(
  opt_state, "noise_norm")` reads the norm of the last noise for logging.

  Departures from the official PyTorch code, which (with `--random_grad`)
  runs, once per step over the K tensors theta_1..theta_K of
  `model.named_parameters()`,

    reg += mean(randn_like(theta_k) * theta_k); reg += mean(theta_k);
    loss = loss + 0.01 * reg

  inside the loop. Because `loss` grows by the running sum `reg` at every
  iteration, tensor k's terms are added K - k + 1 times, and its gradient gets

    0.01 * (K - k + 1) * (xi_k + 1) / n_k.

  This transform keeps the per-tensor `gamma * xi_k / n_k` and drops the two
  quirks: (a) the `+ mean(theta_k)` term, a constant `+1/n_k` drift on every
  element (a bias, not isotropic noise), and (b) the triangular weight
  K - k + 1, which makes the noise depend on the order in which a model
  registers its parameters. The official code also includes these terms in
  the logged loss; here the loss is untouched.

  Args:
    gamma: noise scale (the official code uses 1e-2), finite and >= 0. With
      gamma == 0 the updates pass through unchanged (the state keeps the same
      structure, counts steps and reports a zero noise norm).
    seed: seed of the transform's PRNG key.
    distribution: "gaussian" (default), "linf" or "sphere".

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: for gamma < 0 or not finite, or an unknown distribution.
  """
  gamma = _check_scale(gamma, "gamma", "isotropic_gradient_augmentation",
                       "1e-2")
  if distribution not in _DISTRIBUTIONS:
    raise ValueError(
        f"isotropic_gradient_augmentation: distribution={distribution!r} is "
        f"not one of {_DISTRIBUTIONS}; pick one of them.")

  def init_fn(params):
    del params
    return IsotropicGradientAugmentationState(
        key_data=jax.random.key_data(jax.random.key(seed)),
        count=jnp.zeros([], jnp.int32),
        noise_norm=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    if gamma == 0.0:
      return updates, state._replace(count=optax.safe_increment(state.count))
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key_data),
                             state.count)
    noise, squared_norm = _noise_and_squared_norm(updates, key, gamma,
                                                  distribution)
    noise_norm = jnp.sqrt(squared_norm)
    updates = jax.tree.map(lambda g, n: g + n, updates, noise)
    return updates, IsotropicGradientAugmentationState(
        key_data=state.key_data,
        count=optax.safe_increment(state.count),
        noise_norm=noise_norm)

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = [
    "AdversarialTerms",
    "IsotropicGradientAugmentationState",
    "adversarial_gradient_penalty",
    "adversarial_penalty",
    "dual_norm_penalty",
    "fgsm_adversarial_loss",
    "hashed_bits",
    "hashed_normal",
    "isotropic_gradient_augmentation",
    "isotropic_noise",
]
