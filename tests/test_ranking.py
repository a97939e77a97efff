"""Tests of the chunked on-device ranking of irtf_jax.ranking."""

from __future__ import annotations

import importlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irtf_jax import metrics
from irtf_jax import ranking


def integer_features(rng, rows, dim):
  """Small-integer features: every dot product is exact in float32 and many tie."""
  return rng.integers(-1, 2, size=(rows, dim)).astype(np.float32)


def numpy_top_k(query_features, gallery_features, k, exclude):
  """Reference: float64 scores, stable descending argsort, excluded column dropped."""
  scores = (
      query_features.astype(np.float64) @ gallery_features.astype(np.float64).T
  )
  indices = np.full((len(scores), k), -1, np.int64)
  top_scores = np.full((len(scores), k), -np.inf)
  for i, row in enumerate(scores):
    order = np.argsort(-row, kind="stable")
    order = order[order != exclude[i]][:k]
    indices[i, : len(order)] = order
    top_scores[i, : len(order)] = row[order]
  return top_scores, indices


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 30, 64])
def test_top_k_matches_stable_argsort(chunk_size):
  rng = np.random.default_rng(0)
  queries, gallery = integer_features(rng, 30, 6), integer_features(rng, 45, 6)
  exclude = rng.integers(-1, 45, size=30)
  scores, indices = ranking.top_k_neighbours(
      queries, gallery, 12, exclude=exclude, chunk_size=chunk_size
  )
  expected_scores, expected_indices = numpy_top_k(queries, gallery, 12, exclude)
  assert indices.shape == (30, 12) and scores.shape == (30, 12)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.parametrize("gallery_size", [384, 500, 1029, 3001])
def test_two_stage_top_k_matches_stable_argsort(gallery_size):
  """Galleries large enough for the block-maxima stage (blocks of 8 columns,
  16 at 3001; a ragged last block at 500, 1029 and 3001), with ties
  everywhere: integer features in {-1, 0, 1}^4 take few distinct scores."""
  k = 12
  assert ranking.candidate_block_size(gallery_size, k) >= 8
  rng = np.random.default_rng(gallery_size)
  queries = integer_features(rng, 40, 4)
  gallery = integer_features(rng, gallery_size, 4)
  exclude = rng.integers(-1, gallery_size, size=40)
  scores, indices = ranking.top_k_neighbours(
      queries, gallery, k, exclude=exclude, chunk_size=16
  )
  expected_scores, expected_indices = numpy_top_k(queries, gallery, k, exclude)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.parametrize("answer_step", [0.0, 0.01])
def test_two_stage_top_k_when_the_best_blocks_are_excluded_or_padding(
    answer_step,
):
  """Every real score is negative but the excluded column's: the block
  maxima must not let that column or the columns padding the ragged last
  block (500 = 62 blocks of 8 + 4) push out one of the k blocks that hold the
  answer. With distinct answer scores the k-th answer is the least maximum
  of the k + 1 chosen blocks, the floor below which candidates are dropped."""
  k, gallery_size, excluded = 12, 500, 100
  assert ranking.candidate_block_size(gallery_size, k) == 8
  gallery = np.zeros((gallery_size, 4), np.float32)
  gallery[:, 0] = -2.0
  # The answer, one per block.
  gallery[np.arange(k) * 40 + 3, 0] = -1.0 - answer_step * np.arange(k)
  gallery[excluded, 0] = 5.0
  queries = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
  exclude = np.array([excluded])
  scores, indices = ranking.top_k_neighbours(
      queries, gallery, k, exclude=exclude
  )
  expected_scores, expected_indices = numpy_top_k(queries, gallery, k, exclude)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


def test_candidate_block_size():
  # Brute force over powers of two: b >= 8 whose k blocks hold at most a
  # quarter of the gallery, least first-stage plus second-stage candidates
  # N / b + k b (the larger b on a tie of the two), 0 where none qualifies.
  assert ranking.candidate_block_size(383, 12) == 0
  assert ranking.candidate_block_size(384, 12) == 8
  assert ranking.candidate_block_size(30000, 100) == 16
  assert ranking.candidate_block_size(100000, 100) == 32
  for size, k in (
      (30000, 50),
      (30000, 100),
      (100000, 100),
      (1000, 3),
      (3001, 12),
      (10**6, 1),
      (2**12, 2),
      (383, 12),
  ):
    allowed = [2**e for e in range(3, 30) if 4 * k * 2**e <= size]
    best = min(allowed, key=lambda b: (size / b + k * b, -b), default=0)
    assert ranking.candidate_block_size(size, k) == best, (size, k)


def test_top_k_of_the_whole_gallery_marks_the_excluded_slot():
  rng = np.random.default_rng(1)
  queries, gallery = integer_features(rng, 9, 4), integer_features(rng, 8, 4)
  exclude = np.array([-1, 0, 7, 3, -1, 5, 1, 2, 6])
  scores, indices = ranking.top_k_neighbours(
      queries, gallery, 8, exclude=exclude, chunk_size=4
  )
  expected_scores, expected_indices = numpy_top_k(queries, gallery, 8, exclude)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)
  assert (indices[exclude >= 0, -1] == -1).all() and (
      indices[exclude < 0] >= 0
  ).all()


@pytest.mark.parametrize(
    "num_queries, chunk_size",
    [
        (1, 1024),
        (1024, 1024),
        (1025, 1024),
        (30000, 1024),
        (23, 5),
        (7, 3),
        (100, 7),
    ],
)
def test_query_chunks_are_equal_and_cover_the_queries(num_queries, chunk_size):
  rows, count = ranking.query_chunks(num_queries, chunk_size)
  assert count == -(-num_queries // chunk_size)  # no more calls than needed
  assert rows <= chunk_size
  assert 0 <= rows * count - num_queries < count  # under one padded row each


def test_chunks_are_balanced(monkeypatch):
  # 11 queries in chunks of at most 10: two chunks of 6 rows, not of 10.
  assert ranking.query_chunks(11, 10) == (6, 2)
  rows = []
  rank_chunk = ranking._top_k_chunk

  def recording(query_chunk, *args, **kwargs):
    rows.append(query_chunk.shape[0])
    return rank_chunk(query_chunk, *args, **kwargs)

  monkeypatch.setattr(ranking, "_top_k_chunk", recording)
  rng = np.random.default_rng(5)
  queries, gallery = integer_features(rng, 11, 6), integer_features(rng, 9, 6)
  exclude = rng.integers(-1, 9, 11)
  scores, indices = ranking.top_k_neighbours(
      queries, gallery, 4, exclude=exclude, chunk_size=10
  )
  assert rows == [6, 6]
  ref_scores, ref_indices = numpy_top_k(queries, gallery, 4, exclude)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_array_equal(scores, ref_scores)


def test_chunks_compile_once():
  rng = np.random.default_rng(2)
  queries, gallery = integer_features(rng, 23, 11), integer_features(
      rng, 19, 11
  )
  before = ranking._top_k_chunk._cache_size()
  ranking.top_k_neighbours(
      queries, gallery, 5, chunk_size=5
  )  # 5 chunks, the last padded
  assert ranking._top_k_chunk._cache_size() == before + 1


def test_chunks_run_under_the_callers_jax_contexts(monkeypatch):
  # The chunks are ranked in pool threads, where the caller's thread-local
  # `jax.default_device` and `jax.default_matmul_precision` would not hold
  # unless they are handed them.
  devices, precisions = [], []
  rank_chunk = ranking._top_k_chunk

  def recording(*args, **kwargs):
    result = rank_chunk(*args, **kwargs)
    devices.append(result[0].devices())
    precisions.append(jax.config.jax_default_matmul_precision)
    return result

  monkeypatch.setattr(ranking, "_top_k_chunk", recording)
  rng = np.random.default_rng(3)
  queries, gallery = integer_features(rng, 20, 4), integer_features(rng, 9, 4)
  chosen = jax.devices()[-1]
  assert chosen != jax.devices()[0]  # tests/conftest.py: 8 CPU devices
  with jax.default_device(chosen), jax.default_matmul_precision("float32"):
    _, indices = ranking.top_k_neighbours(queries, gallery, 3, chunk_size=5)
  assert devices == [{chosen}] * 4
  assert precisions == ["float32"] * 4
  expected = numpy_top_k(queries, gallery, 3, np.full(20, -1))[1]
  np.testing.assert_array_equal(indices, expected)


@pytest.mark.parametrize("chunk_size", [4, 9, 50])
@pytest.mark.parametrize("features", ["integer", "gaussian"])
def test_recall_from_neighbours_matches_recall_at_k(chunk_size, features):
  rng = np.random.default_rng(3)
  num_queries, gallery_size, dim = 36, 40, 5
  if features == "integer":
    queries = integer_features(rng, num_queries, dim)
    gallery = integer_features(rng, gallery_size, dim)
  else:
    queries = rng.standard_normal((num_queries, dim)).astype(np.float32)
    gallery = rng.standard_normal((gallery_size, dim)).astype(np.float32)
  gallery_ids = np.arange(gallery_size) % 10  # every caption four times
  exclude = rng.integers(-1, gallery_size, size=num_queries)
  targets = rng.integers(0, 10, size=num_queries)
  targets[::3] = gallery_ids[
      np.maximum(exclude[::3], 0)
  ]  # excluded column often a hit
  ks = (1, 3, 5, 10, 20)
  _, indices = ranking.top_k_neighbours(
      queries, gallery, max(ks), exclude=exclude, chunk_size=chunk_size
  )
  scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
  expected = metrics.recall_at_k(
      scores, targets, gallery_ids, ks, exclude=exclude
  )
  assert (
      ranking.recall_from_neighbours(indices, targets, gallery_ids, ks)
      == expected
  )


def test_one_ranking_serves_several_labelings():
  rng = np.random.default_rng(4)
  queries, gallery = integer_features(rng, 20, 6), integer_features(rng, 30, 6)
  captions = rng.integers(
      0, 12, size=30
  )  # caption c = (adjective c // 4, noun c % 4)
  target_captions = rng.integers(0, 12, size=20)
  exclude = rng.integers(0, 30, size=20)
  ks = (1, 5, 10)
  _, indices = ranking.top_k_neighbours(
      jnp.asarray(queries),
      jnp.asarray(gallery),
      10,
      exclude=exclude,
      chunk_size=8,
  )
  scores = queries @ gallery.T
  for view in (lambda c: c, lambda c: c // 4, lambda c: c % 4):
    expected = metrics.recall_at_k(
        scores, view(target_captions), view(captions), ks, exclude=exclude
    )
    assert (
        ranking.recall_from_neighbours(
            indices, view(target_captions), view(captions), ks
        )
        == expected
    )


def test_recall_from_neighbours_by_hand():
  indices = np.array([[2, 0, -1], [1, 2, 0]])
  gallery_ids = np.array([5, 6, 5])
  # Query 0 (target 5): neighbour 2 is a hit at K=1. Query 1 (target 5): first hit at slot 1.
  recall = ranking.recall_from_neighbours(
      indices, [5, 5], gallery_ids, ks=(1, 2)
  )
  assert recall == {1: 0.5, 2: 1.0}
  # An empty slot (-1) is never a hit, whatever gallery_ids[-1] is.
  assert ranking.recall_from_neighbours(
      indices[:1, 2:], [5], gallery_ids, ks=(1,)
  ) == {1: 0.0}


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: ranking.top_k_neighbours(
                np.zeros((3, 4)), np.zeros((5, 4)), 6
            ),
            "K=6",
        ),
        (
            lambda: ranking.top_k_neighbours(
                np.zeros((3, 4)), np.zeros((5, 2)), 2
            ),
            "D=4",
        ),
        (
            lambda: ranking.top_k_neighbours(
                np.zeros((3, 4)), np.zeros((5, 4)), 2, chunk_size=0
            ),
            "chunk_size",
        ),
        (
            lambda: ranking.top_k_neighbours(
                np.zeros((3, 4)), np.zeros((5, 4)), 2, exclude=[0, 1]
            ),
            "exclude has shape",
        ),
        (
            lambda: ranking.top_k_neighbours(
                np.zeros((3, 4)), np.zeros((5, 4)), 2, exclude=[0, 1, 5]
            ),
            r"exclude\[2\] = 5",
        ),
        (
            lambda: ranking.recall_from_neighbours(
                np.zeros((2, 3), int), [0, 0], [0, 1], ks=(4,)
            ),
            "k >= max",
        ),
        (
            lambda: ranking.recall_from_neighbours(
                np.zeros((2, 3), int), [0], [0, 1], ks=(1,)
            ),
            "query_target_ids",
        ),
        (
            lambda: ranking.recall_from_neighbours(
                np.full((2, 3), 2), [0, 0], [0, 1], ks=(1,)
            ),
            "outside",
        ),
    ],
)
def test_bad_input_is_rejected(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_ranking_benchmark_runs_and_agrees(tmp_path, capsys, monkeypatch):
  monkeypatch.syspath_prepend(
      str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
  )
  benchmark = importlib.import_module("ranking")
  json_out = tmp_path / "ranking.json"
  status = benchmark.main([
      "--queries=40",
      "--gallery=150",
      "--dim=8",
      "--naive-queries=15",
      "--repeats=1",
      "--chunk-size=16",
      f"--json-out={json_out}",
  ])
  printed = json.loads(capsys.readouterr().out)
  assert status == 0 and printed == json.loads(json_out.read_text())
  assert printed["recalls_identical"] and printed["naive"]["extrapolated"]
  assert (
      printed["project"]["recall_on_naive_queries"]
      == printed["naive"]["recall"]
  )
  assert sorted(printed["project"]["recall"], key=int) == [
      "1",
      "5",
      "10",
      "50",
      "100",
  ]
  assert printed["queries"] == 40 and printed["gallery"] == 150
  for method in ("project", "naive"):
    assert printed[method]["seconds"] > 0 and printed[method]["peak_rss_mb"] > 0
