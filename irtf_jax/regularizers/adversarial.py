"""Explicit adversarial gradient augmentation, and the FGSM baseline.

Adversarial GA (Huang, Zhang, Zhou, Gao, "Adversarial and Isotropic Gradient
Augmentation for Image Retrieval with Text Feedback", IEEE TMM 25 (2023)
7415-7427) replaces FGSM adversarial training by its first-order form, a
penalty on the dual norm of the loss gradient w.r.t. the input:

  L_GA^A = (eps / 2) * ||dL/dx||_q,        1/p + 1/q = 1.

FGSM adversarial training minimises `(L(x) + max_{||delta||_p <= eps}
L(x + delta)) / 2`. To first order `L(x + delta) ~ L(x) + <dL/dx, delta>`,
and by Hoelder's inequality the maximum of the linear term over the p-ball is
`eps * ||dL/dx||_q` (attained by `delta = eps * sign(dL/dx)` for p = inf,
q = 1). The objective is therefore `L(x) + (eps / 2) * ||dL/dx||_q`; the 1/2
comes from averaging the clean and the adversarial loss. The derivation and
the official code's conventions are in docs/gradient_augmentation.md.

Both wrappers differentiate a loss w.r.t. one of its arguments, or w.r.t. the
leaves of it that `wrt` selects (a Flax-style `loss_fn(params, batch)` with a
dict batch: `wrt=lambda batch: batch["query_image"]`); the other leaves
(token ids, labels) are left alone.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from irtf_jax.regularizers import _checks
from irtf_jax.regularizers._perturbed import Selector
from irtf_jax.regularizers._perturbed import batch_size
from irtf_jax.regularizers._perturbed import input_gradient

DUAL_NORM_ORDERS = (1.0, 2.0, math.inf)


class AdversarialTerms(NamedTuple):
  """The terms of an adversarially regularized loss, for logging.

  Attributes:
    loss: the clean loss L (loss_fn's value).
    penalty: the adversarial gradient penalty P.
  """

  loss: jax.Array
  penalty: jax.Array


def _check_q(q: Any, caller: str) -> float:
  """`q` as a float in {1, 2, inf}, or a one-line ValueError."""
  try:
    value = float(q)
  except (TypeError, ValueError):
    value = None
  if value not in DUAL_NORM_ORDERS:
    raise ValueError(
        f"{caller}: q must be 1, 2 or inf, got {q!r}; pass q=1.0 (l-inf "
        "perturbation), 2.0 (l2) or float('inf') (l1)."
    )
  return value


def dual_norm_penalty(
    input_grad: Any, *, epsilon: Any, q: float = 1.0
) -> jax.Array:
  """The adversarial GA penalty from the gradient of a batch-mean loss.

  With `g_i = B * dL/dx_i` (example i of the batched pytree `input_grad`, its
  leaves flattened and concatenated, B the leading batch size) and `d` the
  number of elements of one example,

    P = (epsilon / 2) * d ** (1 - 1/q) * mean_i ||g_i||_q.

  At g_i = 0 the 2-norm uses the subgradient 0 (as PyTorch's norm does), so a
  loss that does not depend on x contributes no NaN to the gradient.

  Args:
    input_grad: pytree of arrays sharing a leading batch axis: dL/dx.
    epsilon: perturbation radius, >= 0; may be traced.
    q: dual norm order, 1, 2 or inf.

  Returns:
    The scalar penalty P.
  """
  epsilon = _checks.check_scale(epsilon, "epsilon", "dual_norm_penalty", "1e-6")
  q = _check_q(q, "dual_norm_penalty")
  leaves = jax.tree.leaves(input_grad)
  batch = batch_size(leaves, "dual_norm_penalty", "input_grad")
  rows = [leaf.reshape(batch, -1) * batch for leaf in leaves]
  example_size = sum(row.shape[1] for row in rows)
  if q == 1.0:
    norms = sum(jnp.sum(jnp.abs(row), axis=1) for row in rows)
  elif q == 2.0:
    squared = sum(jnp.sum(jnp.square(row), axis=1) for row in rows)
    positive = squared > 0
    norms = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1)), 0)
  else:
    norms = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(row), axis=1) for row in rows]
    )
  scale = 0.5 * float(example_size) ** (1.0 - 1.0 / q)
  return epsilon * scale * jnp.mean(norms)


def adversarial_gradient_penalty(
    loss_fn: Callable[..., Any],
    *,
    epsilon: Any,
    q: float = 1.0,
    argnums: int = 1,
    wrt: Selector = None,
    has_aux: bool = False,
) -> Callable[..., tuple[jax.Array, Any]]:
  """Wraps a loss with the explicit adversarial GA penalty.

  The wrapped function takes loss_fn's arguments and returns

    (L + P, terms)            or, with has_aux,   (L + P, (aux, terms)),

  `terms = AdversarialTerms(loss=L, penalty=P)`, so one call of
  `jax.value_and_grad(wrapped, has_aux=True)` trains on it and logs both. L is
  loss_fn's value (a mean over the batch) and

    P = (epsilon / 2) * d ** (1 - 1/q) * mean_i || B * dL/dx_i ||_q,

  where x is the perturbed input (the leaves of positional argument `argnums`
  that `wrt` selects, sharing a leading batch axis of size B), x_i its
  example i with those leaves flattened together, and d the number of
  elements of one example. The factor B turns the gradient of a batch-mean
  loss into example i's own gradient and d ** (1 - 1/q) keeps one scale of
  epsilon across norms; both follow the official implementation, so epsilon
  means what it meant there (1e-6, q = 1, on the normalized query pixels).

  The gradient of P w.r.t. the other arguments (the parameters) comes from
  differentiating through `jax.grad` (double backpropagation): about one more
  forward and two more backward passes. A concrete `epsilon == 0` skips that
  work (P is 0); a traced epsilon always pays it.

  Under `jax.jit` with the batch sharded over devices the wrapper sees the
  global batch. Under `jax.pmap` (local batch and mean, then `lax.pmean` of
  gradients) P equals the global one when L is a mean of per-example terms;
  for a loss coupling examples (in-batch negatives) the local batch is the
  set of negatives, as it is for the loss itself.

  Example (a Flax loss on a dict batch with integer tokens; epsilon
  scheduled by building the wrapper inside the step):

  >>> import jax, jax.numpy as jnp
  >>> def loss_fn(params, batch):
  ...   words = params["embed"][batch["tokens"]].mean(axis=1)
  ...   return jnp.mean((batch["image"] @ params["w"] - words) ** 2)
  >>> params = {"embed": jnp.ones((5, 2)), "w": 2 * jnp.eye(3, 2)}
  >>> batch = {"image": jnp.ones((4, 3)), "tokens": jnp.zeros((4, 2), int)}
  >>> step = 10
  >>> epsilon = 1e-2 * jnp.minimum(1.0, step / 100)  # a warm-up schedule
  >>> objective = adversarial_gradient_penalty(
  ...     loss_fn, epsilon=epsilon, wrt=lambda batch: batch["image"])
  >>> (total, terms), grads = jax.value_and_grad(objective, has_aux=True)(
  ...     params, batch)
  >>> print(f"{terms.loss:.3f} + {terms.penalty:.4f} = {total:.4f}")
  1.000 + 0.0020 = 1.0020

  Args:
    loss_fn: `loss_fn(*args, **kwargs)` returning a scalar batch-mean loss, or
      `(loss, aux)` with `has_aux`.
    epsilon: perturbation radius, >= 0: a number, or a traced scalar (jit,
      vmap over a sweep, a schedule evaluated at the step).
    q: dual norm order: 1 (l-inf perturbations, the official setting), 2, or
      inf (l1 perturbations).
    argnums: position of the argument holding the input to perturb.
    wrt: which leaves of that argument to perturb: a callable on it
      (`lambda batch: batch["query_image"]`, index or attribute access only),
      a dict key (`"query_image"`), or None for all of its leaves.
    has_aux: whether loss_fn returns `(loss, aux)`; aux (e.g. BatchNorm
      statistics) comes from the single clean forward pass, unchanged.

  Returns:
    The regularized loss, returning `(L + P, terms)` or `(L + P, (aux,
    terms))`.

  Raises:
    ValueError: for a negative or non-finite epsilon, q not in {1, 2, inf},
      or (when called) argnums / wrt that select no floating batched input.
  """
  caller = "adversarial_gradient_penalty"
  epsilon = _checks.check_scale(epsilon, "epsilon", caller, "1e-6")
  q = _check_q(q, caller)
  skip = _checks.is_zero(epsilon)

  @functools.wraps(loss_fn)
  def regularized_loss(*args, **kwargs):
    if skip:
      value = loss_fn(*args, **kwargs)
      loss, aux = value if has_aux else (value, None)
      penalty = jnp.zeros_like(loss)
    else:
      loss, aux, grads, _, _ = input_gradient(
          loss_fn, args, kwargs, argnums, wrt, has_aux, caller
      )
      penalty = dual_norm_penalty(grads, epsilon=epsilon, q=q).astype(
          jnp.result_type(loss)
      )
    terms = AdversarialTerms(loss=loss, penalty=penalty)
    return loss + penalty, ((aux, terms) if has_aux else terms)

  return regularized_loss


def fgsm_adversarial_loss(
    loss_fn: Callable[..., Any],
    *,
    epsilon: Any,
    argnums: int = 1,
    wrt: Selector = None,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Wraps a loss with FGSM adversarial training (Goodfellow, Shlens,
  Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015).

  The wrapped function has loss_fn's signature and return structure (a value,
  or `(value, aux)` with `has_aux`), the value being

    (L(x) + L(x + epsilon * sign(dL/dx))) / 2,

  x the leaves of argument `argnums` that `wrt` selects (as in
  `adversarial_gradient_penalty`). The perturbation is a constant
  (`stop_gradient`): gradients w.r.t. the other arguments are the mean of the
  clean and the adversarial gradient, with no second-order term. Its
  first-order expansion is the adversarial GA penalty with q = 1, without the
  batch and dimension factors.

  Args:
    loss_fn: `loss_fn(*args, **kwargs)` returning a scalar, or `(loss, aux)`
      with `has_aux`.
    epsilon: l-inf radius, >= 0 (may be traced); a concrete 0 returns loss_fn.
    argnums: position of the argument holding the input to perturb.
    wrt: which of its leaves to perturb (see `adversarial_gradient_penalty`).
    has_aux: whether loss_fn returns `(loss, aux)`; the clean pass's aux is
      returned (the adversarial pass's, e.g. BatchNorm statistics of
      perturbed inputs, is dropped).

  Returns:
    The adversarially trained loss function.
  """
  caller = "fgsm_adversarial_loss"
  epsilon = _checks.check_scale(epsilon, "epsilon", caller, "1e-2")
  if _checks.is_zero(epsilon):
    return loss_fn

  @functools.wraps(loss_fn)
  def adversarial_loss(*args, **kwargs):
    loss, aux, grads, selected, loss_of = input_gradient(
        loss_fn, args, kwargs, argnums, wrt, has_aux, caller
    )
    perturbed = [
        x + jax.lax.stop_gradient(epsilon * jnp.sign(g)).astype(x.dtype)
        for x, g in zip(selected, grads)
    ]
    adversarial_value = loss_of(perturbed)
    adversarial = adversarial_value[0] if has_aux else adversarial_value
    total = (loss + adversarial) / 2
    return (total, aux) if has_aux else total

  return adversarial_loss
