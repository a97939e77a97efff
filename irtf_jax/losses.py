"""Training losses on (query, target) feature batches.

Row i of `query` should retrieve row i of `target`; every other target of the
batch is a negative. Under `jax.pmap` pass `axis_name`: each device then
scores its own queries against the targets of every device (all-gathered), so
the loss is the global-batch loss, as under `jax.jit` with a sharded batch.
A loss never knows the dataset or the model.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
from jax import lax
import jax.numpy as jnp
import optax


def _check_pair(query, target) -> None:
  """Query and target features: matching (B, D) matrices (trace-time)."""
  chex.assert_rank([query, target], 2)
  chex.assert_equal_shape([query, target])


def _global_targets(target, axis_name):
  """All targets of the global batch, and the global row of local query 0."""
  if axis_name is None:
    return target, 0
  gathered = lax.all_gather(target, axis_name, tiled=True)
  return gathered, lax.axis_index(axis_name) * target.shape[0]


def batch_classification_loss(query, target, *, axis_name=None):
  """Batch-based classification (TIRG): softmax cross-entropy over the batch.

    L = -mean_i log( exp(<q_i, t_i>) / sum_j exp(<q_i, t_j>) )

  The features carry the learned normalization scale, which acts as the
  inverse temperature.
  """
  _check_pair(query, target)
  targets, offset = _global_targets(target, axis_name)
  logits = jnp.dot(query, targets.T, preferred_element_type=jnp.float32)
  labels = offset + jnp.arange(query.shape[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def soft_triplet_loss(query, target, *, axis_name=None):
  """TIRG's soft triplet loss, in expectation over its negatives.

  TIRG stacks the 2B features [q; t], labels row i of each half i, and for
  every anchor a, its positive p (the other feature with its label) and
  negatives n (features with another label) averages
  log(1 + exp(||f_a - f_p||^2 - ||f_a - f_n||^2)). TIRG samples 3 negatives per
  anchor; this computes the mean over all of them, the expectation of TIRG's
  estimator, without its sampling noise.
  """
  _check_pair(query, target)
  targets, offset = _global_targets(target, axis_name)
  queries, _ = _global_targets(query, axis_name)
  n_global = targets.shape[0]
  features = jnp.concatenate([queries, targets]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.arange(n_global), jnp.arange(n_global)])
  sq_norms = jnp.sum(features * features, axis=-1)
  distances = sq_norms[:, None] + sq_norms[None, :] - 2 * features @ features.T
  # Anchors: this device's rows of both halves.
  local = offset + jnp.arange(query.shape[0])
  anchors = jnp.concatenate([local, local + n_global])
  positives = jnp.concatenate([local + n_global, local])
  d_anchor = distances[anchors]  # (2b, 2N)
  d_positive = jnp.take_along_axis(d_anchor, positives[:, None], axis=1)
  negative = labels[None, :] != labels[anchors][:, None]
  terms = jax.nn.softplus(d_positive - d_anchor)
  per_anchor = jnp.sum(jnp.where(negative, terms, 0.0), axis=1) / jnp.sum(
      negative, axis=1
  )
  return jnp.mean(per_anchor)


def similarity_matching_loss(query, target):
  """L_S = mean((f_comp - f_target)^2), the Gradient Augmentation paper's
  similarity matching term (weighted by eta = 1e-3 in its code)."""
  _check_pair(query, target)
  return jnp.mean(
      jnp.square(query.astype(jnp.float32) - target.astype(jnp.float32))
  )


RETRIEVAL_LOSSES: dict[str, Callable] = {
    "batch_classification": batch_classification_loss,
    "soft_triplet": soft_triplet_loss,
}


def retrieval_loss(name: str) -> Callable:
  if name not in RETRIEVAL_LOSSES:
    raise ValueError(
        f"config.loss.name: unknown {name!r}; allowed: "
        f"{', '.join(RETRIEVAL_LOSSES)}"
    )
  return RETRIEVAL_LOSSES[name]
