"""Tests of irtf_jax.metrics against brute-force references written here."""

from __future__ import annotations

import fractions

import numpy as np
import pytest

from irtf_jax import metrics


def brute_force_recall(scores, query_target_ids, gallery_ids, ks, exclude):
  """Reference Recall@K: an explicit sort per query, descending score, lower index first."""
  scores = np.asarray(scores).tolist()
  num_queries, gallery_size = len(scores), len(scores[0])
  hits_at = {k: 0 for k in ks}
  for i in range(num_queries):
    ranked = sorted(
        (j for j in range(gallery_size) if j != exclude[i]),
        key=lambda j: (-scores[i][j], j),
    )
    for k in ks:
      if any(gallery_ids[j] == query_target_ids[i] for j in ranked[:k]):
        hits_at[k] += 1
  return {k: hits_at[k] / num_queries for k in ks}


def random_problem(
    rng, num_queries, gallery_size, num_captions, integer_scores
):
  if integer_scores:
    scores = rng.integers(-2, 3, size=(num_queries, gallery_size)).astype(
        np.float32
    )
  else:
    scores = rng.standard_normal((num_queries, gallery_size))
  gallery_ids = rng.integers(0, num_captions, size=gallery_size)
  query_target_ids = rng.integers(0, num_captions, size=num_queries)
  exclude = rng.integers(-1, gallery_size, size=num_queries)
  # Make the excluded column a hit for some queries, so exclusion changes recall.
  some = rng.random(num_queries) < 0.3
  query_target_ids[some & (exclude >= 0)] = gallery_ids[
      exclude[some & (exclude >= 0)]
  ]
  return scores, query_target_ids, gallery_ids, exclude


@pytest.mark.parametrize("integer_scores", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_brute_force(seed, integer_scores):
  rng = np.random.default_rng(seed)
  scores, targets, gallery_ids, exclude = random_problem(
      rng, 40, 31, 6, integer_scores
  )
  ks = (1, 2, 5, 10, 30, 31)
  expected = brute_force_recall(scores, targets, gallery_ids, ks, exclude)
  assert (
      metrics.recall_at_k(scores, targets, gallery_ids, ks, exclude=exclude)
      == expected
  )


def test_recall_at_k_without_exclusion_matches_brute_force():
  rng = np.random.default_rng(3)
  scores, targets, gallery_ids, _ = random_problem(
      rng, 25, 17, 4, integer_scores=True
  )
  ks = (1, 3, 17)
  expected = brute_force_recall(scores, targets, gallery_ids, ks, [-1] * 25)
  assert metrics.recall_at_k(scores, targets, gallery_ids, ks) == expected
  assert (
      metrics.recall_at_k(
          scores, targets, gallery_ids, ks, exclude=np.full(25, -1)
      )
      == expected
  )


def test_recall_at_k_in_several_row_blocks(monkeypatch):
  monkeypatch.setattr(
      metrics, "_BLOCK_ENTRIES", 50
  )  # 50 // 23 = 2 queries per block
  rng = np.random.default_rng(4)
  scores, targets, gallery_ids, exclude = random_problem(
      rng, 11, 23, 5, integer_scores=True
  )
  ks = (1, 4, 9)
  expected = brute_force_recall(scores, targets, gallery_ids, ks, exclude)
  assert (
      metrics.recall_at_k(scores, targets, gallery_ids, ks, exclude=exclude)
      == expected
  )


def test_ties_rank_the_lower_gallery_index_first():
  scores = np.ones((2, 3))
  gallery_ids = np.array([0, 1, 1])
  # Query 0 wants caption 1: column 0 (caption 0) wins the three-way tie.
  # Query 1 wants caption 0: column 0 is first.
  recall = metrics.recall_at_k(scores, np.array([1, 0]), gallery_ids, ks=(1, 2))
  assert recall == {1: 0.5, 2: 1.0}


def test_excluded_column_never_counts_and_never_takes_a_slot():
  scores = np.array([[9.0, 5.0, 1.0, 0.0]])
  gallery_ids = np.array([7, 8, 7, 9])
  # Without exclusion the top column is the hit.
  assert metrics.recall_at_k(scores, [7], gallery_ids, ks=(1,)) == {1: 1.0}
  # Excluding it: column 1 (miss) ranks first, column 2 (hit) second.
  assert metrics.recall_at_k(
      scores, [7], gallery_ids, ks=(1, 2), exclude=[0]
  ) == {1: 0.0, 2: 1.0}
  # Excluding a miss above the hit moves the hit up.
  assert metrics.recall_at_k(
      scores, [7], gallery_ids, ks=(1, 2), exclude=[1]
  ) == {1: 1.0, 2: 1.0}
  # The only hit excluded: no hit at any K.
  assert metrics.recall_at_k(
      scores, [9], gallery_ids, ks=(4,), exclude=[3]
  ) == {4: 0.0}


def test_infinite_scores_follow_the_same_order():
  scores = np.array([[-np.inf, -np.inf, np.inf, 0.0]])
  gallery_ids = np.array([1, 2, 3, 4])
  recall = metrics.recall_at_k(scores, [2], gallery_ids, ks=(1, 2, 3, 4))
  # Order: column 2 (+inf), 3 (0), 0 (-inf), 1 (-inf, higher index).
  assert recall == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}


# A valid call (2 queries, 3 gallery columns); each case changes it.
_VALID_RECALL_INPUT = dict(
    scores=np.zeros((2, 3)),
    query_target_ids=[0, 1],
    gallery_ids=[0, 1, 2],
    ks=(1,),
)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(query_target_ids=[0]), "query_target_ids"),
        (dict(gallery_ids=[0, 1]), "gallery_ids"),
        (dict(scores=np.zeros(3), query_target_ids=[0]), r"\(Q, N\)"),
        (dict(ks=(4,)), "K=4"),
        (dict(ks=(0,)), "K=0"),
        (dict(ks=()), "empty"),
        (dict(exclude=[0, 3]), r"exclude\[1\] = 3"),
        (dict(exclude=[0]), "exclude has shape"),
        (
            dict(
                scores=np.array([[0.0, np.nan]]),
                query_target_ids=[0],
                gallery_ids=[0, 1],
            ),
            "row 0",
        ),
        (dict(scores=np.zeros((0, 3)), query_target_ids=[]), "no rows"),
    ],
)
def test_recall_at_k_rejects_bad_input(changes, message):
  with pytest.raises(ValueError, match=message):
    metrics.recall_at_k(**{**_VALID_RECALL_INPUT, **changes})


def reference_whm(ms, mt, alpha):
  """1 / WHM = w / Ms + (1 - w) / Mt with w = alpha / (1 + alpha), in exact rationals."""
  ms, mt, alpha = (fractions.Fraction(x) for x in (ms, mt, alpha))
  weight = alpha / (1 + alpha)
  return float(1 / (weight / ms + (1 - weight) / mt))


@pytest.mark.parametrize(
    "ms, mt, alpha",
    [
        (0.5, 0.25, 1.0),
        (0.9, 0.3, 0.5),
        (0.2, 0.7, 2.0),
        (0.61, 0.44, 0.1),
        (0.05, 0.8, 10.0),
    ],
)
def test_whm_is_the_weighted_harmonic_mean(ms, mt, alpha):
  assert metrics.weighted_harmonic_mean(ms, mt, alpha) == pytest.approx(
      reference_whm(ms, mt, alpha), rel=1e-12
  )


def test_whm_closed_forms():
  assert metrics.weighted_harmonic_mean(0.8, 0.3, 0.0) == 0.3  # alpha = 0: Mt
  assert metrics.weighted_harmonic_mean(0.5, 0.25, 1.0) == pytest.approx(
      1 / 3
  )  # 2ab / (a + b)
  assert metrics.weighted_harmonic_mean(0.6, 0.6, 3.7) == pytest.approx(
      0.6
  )  # equal recalls
  # Tends to Ms as alpha grows.
  assert metrics.weighted_harmonic_mean(0.8, 0.3, 1e9) == pytest.approx(
      0.8, rel=1e-6
  )


@pytest.mark.parametrize(
    "ms, mt, alpha", [(0.9, 0.3, 0.5), (0.2, 0.7, 2.0), (0.4, 0.1, 1.0)]
)
def test_whm_symmetries(ms, mt, alpha):
  whm = metrics.weighted_harmonic_mean
  assert whm(ms, mt, alpha) == pytest.approx(
      whm(mt, ms, 1.0 / alpha), rel=1e-12
  )
  assert whm(ms, mt, 1.0) == pytest.approx(whm(mt, ms, 1.0), rel=1e-12)
  # Fractions or percentages: the same mean in the same unit.
  assert whm(100 * ms, 100 * mt, alpha) == pytest.approx(
      100 * whm(ms, mt, alpha), rel=1e-12
  )


def test_whm_zeros():
  whm = metrics.weighted_harmonic_mean
  assert whm(0.0, 0.0, 1.0) == 0.0  # 0 / 0
  assert whm(0.0, 0.5, 1.0) == 0.0  # a zero recall with positive weight
  assert whm(0.5, 0.0, 0.3) == 0.0
  assert whm(0.0, 0.5, 0.0) == 0.5  # zero weight on Ms drops it


def test_whm_broadcasts_arrays():
  ms = np.array([0.5, 0.9, 0.0])
  mt = np.array([0.25, 0.3, 0.0])
  result = metrics.weighted_harmonic_mean(ms, mt, 1.0)
  np.testing.assert_allclose(
      result, [1 / 3, 2 * 0.9 * 0.3 / 1.2, 0.0], rtol=1e-12
  )


@pytest.mark.parametrize(
    "ms, mt, alpha, message",
    [
        (-0.1, 0.5, 1.0, "ms="),
        (0.1, float("nan"), 1.0, "mt="),
        (0.1, 0.5, -1.0, "alpha="),
        (0.1, 0.5, float("inf"), "alpha="),
    ],
)
def test_whm_rejects_bad_input(ms, mt, alpha, message):
  with pytest.raises(ValueError, match=message):
    metrics.weighted_harmonic_mean(ms, mt, alpha)


def test_caption_ids_preserve_caption_equality():
  rng = np.random.default_rng(5)
  words = ["red cube", "blue cube", "red sphere", "wet dog", "dry dog"]
  gallery_captions = [words[i] for i in rng.integers(0, 4, size=26)]
  target_captions = [
      words[i] for i in rng.integers(0, 5, size=15)
  ]  # "dry dog" never in gallery
  gallery_ids, target_ids = metrics.caption_ids(
      gallery_captions, target_captions
  )
  for i, target in enumerate(target_captions):
    for j, caption in enumerate(gallery_captions):
      assert (target_ids[i] == gallery_ids[j]) == (target == caption)
  assert (target_ids[[t == "dry dog" for t in target_captions]] == -1).all()
  scores = rng.standard_normal((15, 26))
  exclude = rng.integers(-1, 26, size=15)
  expected = brute_force_recall(
      scores, target_captions, gallery_captions, (1, 5, 26), exclude
  )
  recall = metrics.recall_at_k(
      scores, target_ids, gallery_ids, (1, 5, 26), exclude=exclude
  )
  assert recall == expected
