"""losses against NumPy transcriptions of TIRG's definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irtf_jax import losses


def _features(seed=0, batch=5, dim=3):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))


def test_batch_classification_is_softmax_cross_entropy_over_the_batch():
  query, target = _features()
  logits = query @ target.T
  log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  want = -np.mean(np.diag(log_softmax))
  got = losses.batch_classification_loss(
      jnp.asarray(query, jnp.float32), jnp.asarray(target, jnp.float32)
  )
  # The losses compute in float32 by design: a few dozen roundings of
  # relative size 6e-8 each, against a float64 reference.
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_soft_triplet_is_the_mean_over_all_of_tirgs_triplets():
  """TIRG enumerates, for every anchor i of [q; t], its positive j (the
  other feature with i's label) and every negative k (another label), and
  averages log(1 + exp(d_ij - d_ik)) with d the squared distance; it then
  samples 3 negatives per anchor. Here: all of them, per anchor, averaged."""
  query, target = _features(seed=1)
  features = np.concatenate([query, target])
  labels = list(range(len(query))) * 2
  per_anchor = []
  for i in range(len(features)):
    j = next(
        j for j in range(len(features)) if labels[j] == labels[i] and j != i
    )
    d = lambda a, b: np.sum((features[a] - features[b]) ** 2)
    terms = [
        np.log1p(np.exp(d(i, j) - d(i, k)))
        for k in range(len(features))
        if labels[k] != labels[i]
    ]
    per_anchor.append(np.mean(terms))
  got = losses.soft_triplet_loss(
      jnp.asarray(query, jnp.float32), jnp.asarray(target, jnp.float32)
  )
  np.testing.assert_allclose(got, np.mean(per_anchor), rtol=1e-5)


def test_similarity_matching_and_the_registry():
  query, target = _features(seed=2)
  np.testing.assert_allclose(
      losses.similarity_matching_loss(
          jnp.asarray(query, jnp.float32), jnp.asarray(target, jnp.float32)
      ),
      np.mean((query - target) ** 2),
      rtol=1e-6,
  )
  assert losses.retrieval_loss("soft_triplet") is losses.soft_triplet_loss
  with pytest.raises(ValueError, match="config.loss.name: unknown 'hinge'"):
    losses.retrieval_loss("hinge")


@pytest.mark.parametrize(
    "loss", [losses.batch_classification_loss, losses.soft_triplet_loss]
)
def test_pmap_with_the_axis_equals_the_global_batch(loss):
  query, target = (jnp.asarray(x, jnp.float32) for x in _features(3, 8, 4))
  devices = jax.device_count()
  split = lambda x: x.reshape(devices, -1, x.shape[-1])
  local = jax.pmap(
      lambda q, t: jax.lax.pmean(loss(q, t, axis_name="d"), "d"), axis_name="d"
  )(split(query), split(target))
  np.testing.assert_allclose(local[0], loss(query, target), rtol=1e-5)


def test_mismatched_features_are_refused():
  query, target = (jnp.zeros(s) for s in ((4, 3), (5, 3)))
  for loss in (
      losses.batch_classification_loss,
      losses.soft_triplet_loss,
      losses.similarity_matching_loss,
  ):
    with pytest.raises(AssertionError):
      loss(query, target)
