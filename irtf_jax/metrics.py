"""Retrieval metrics: Recall@K under TIRG's protocol, and the weighted harmonic mean (WHM).

Recall@K (Vo et al., "Composing Text and Image for Image Retrieval - An
Empirical Odyssey", CVPR 2019): a query is a hit at K when some gallery image
among its K best-scored ones carries the target's *label* (its caption id),
not necessarily the target image itself; the query's own source image is
removed from its ranking. Recall@K is the fraction of queries that hit at K.

Ranking order and ties: gallery column `a` ranks before column `b` when
`scores[a] > scores[b]`, or when `scores[a] == scores[b]` and `a < b` (the
lower gallery index first). This is the order of `jax.lax.top_k` and of a
stable descending sort, and every ranking function of the project follows it,
so the host metric here and the on-device ranking of `irtf_jax.ranking`
agree exactly, ties included.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# Host memory for temporaries of `recall_at_k`: queries are processed in row
# blocks of about this many score entries.
_BLOCK_ENTRIES = 1 << 22


def check_ks(ks: Iterable[int], gallery_size: int) -> tuple[int, ...]:
  """Validates the cut-offs K of Recall@K.

  Args:
    ks: the cut-offs.
    gallery_size: N, the number of gallery columns ranked.

  Returns:
    The cut-offs as a tuple of python ints.

  Raises:
    ValueError: when `ks` is empty or some K is not an integer in [1, N].
  """
  ks = tuple(ks)
  if not ks:
    raise ValueError(
        "ks is empty: pass at least one cut-off K, e.g. ks=(1, 5, 10, 50)."
    )
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise ValueError(
          f"ks contains {k!r}: every cut-off K must be a positive integer."
      )
    if not 1 <= k <= gallery_size:
      raise ValueError(
          f"ks contains K={k} but the gallery has N={gallery_size} images: "
          f"every K must lie in [1, {gallery_size}]; drop K={k} or enlarge the "
          "gallery."
      )
  return tuple(int(k) for k in ks)


def check_query_matrix(array, name: str, expected: str) -> np.ndarray:
  """Validates a matrix with one row per query (scores, neighbour indices).

  Args:
    array: the (Q, M) matrix.
    name: its argument name, for the error message.
    expected: what to pass instead, for the error message.

  Returns:
    `array` as a numpy array.

  Raises:
    ValueError: when it is not 2-D or has no rows (recall needs a query).
  """
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f"{name} has shape {array.shape}: pass {expected}.")
  if array.shape[0] == 0:
    raise ValueError(f"{name} has no rows: recall needs at least one query.")
  return array


def check_exclude(exclude, num_queries: int, gallery_size: int) -> np.ndarray:
  """Validates the per-query excluded gallery column (the query's source image).

  Args:
    exclude: None (nothing excluded) or an integer array of shape (Q,) whose
      entry i is the gallery column removed from query i's ranking, or -1 for
      none.
    num_queries: Q.
    gallery_size: N.

  Returns:
    An int64 array of shape (Q,), -1 where nothing is excluded.

  Raises:
    ValueError: on a wrong shape, a non-integer dtype or an entry outside [-1, N).
  """
  if exclude is None:
    return np.full((num_queries,), -1, np.int64)
  exclude = np.asarray(exclude)
  if exclude.shape != (num_queries,):
    raise ValueError(
        f"exclude has shape {exclude.shape} but there are Q={num_queries}"
        f" queries: pass one gallery column per query, shape ({num_queries},),"
        " -1 for none."
    )
  if exclude.size and not np.issubdtype(exclude.dtype, np.integer):
    raise ValueError(
        f"exclude has dtype {exclude.dtype}: pass integer gallery columns "
        "(-1 for none)."
    )
  bad = np.flatnonzero((exclude < -1) | (exclude >= gallery_size))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
        f"exclude[{i}] = {int(exclude[i])} is outside [-1, {gallery_size}):"
        " pass a gallery column index of the query's source image, or -1 for"
        " none."
    )
  return exclude.astype(np.int64)


def check_labels(
    query_target_ids, gallery_ids, num_queries: int, gallery_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Validates the integer labels (caption ids) of query targets and gallery images.

  Raises:
    ValueError: on a shape that does not match Q or N.
  """
  query_target_ids = np.asarray(query_target_ids)
  gallery_ids = np.asarray(gallery_ids)
  if query_target_ids.shape != (num_queries,):
    raise ValueError(
        f"query_target_ids has shape {query_target_ids.shape} but there are "
        f"Q={num_queries} queries: pass one target caption id per query."
    )
  if gallery_ids.shape != (gallery_size,):
    raise ValueError(
        f"gallery_ids has shape {gallery_ids.shape} but the gallery has "
        f"N={gallery_size} images: pass one caption id per gallery image."
    )
  return query_target_ids, gallery_ids


def caption_ids(
    gallery_captions: Sequence, target_captions: Sequence
) -> tuple[np.ndarray, np.ndarray]:
  """Integer labels for recall from caption strings (or any hashable labels).

  Equal captions get equal ids, so `gallery_ids[j] == target_ids[i]` holds
  exactly when the captions are equal. A target caption absent from the
  gallery gets -1, which matches no gallery image.

  Args:
    gallery_captions: one caption per gallery image (N).
    target_captions: one target caption per query (Q).

  Returns:
    `(gallery_ids, target_ids)`, int64 arrays of shapes (N,) and (Q,).
  """
  ids = {
      caption: i for i, caption in enumerate(dict.fromkeys(gallery_captions))
  }
  gallery_ids = np.fromiter(
      (ids[caption] for caption in gallery_captions),
      np.int64,
      count=len(gallery_captions),
  )
  target_ids = np.fromiter(
      (ids.get(caption, -1) for caption in target_captions),
      np.int64,
      count=len(target_captions),
  )
  return gallery_ids, target_ids


def _first_hit_ranks(
    scores: np.ndarray, hits: np.ndarray, exclude: np.ndarray
) -> np.ndarray:
  """0-based rank of each row's best-ranked hit, or N where a row has no hit.

  The best-ranked hit is the hit column of highest score, the lowest index
  among equal scores. Its rank is the number of columns ranked before it:
  `#{j : s_j > s*} + #{j < j* : s_j == s*}`, the excluded column not counted.

  Args:
    scores: (q, N) float scores.
    hits: (q, N) bool, already False at the excluded columns.
    exclude: (q,) excluded column per row, -1 for none.
  """
  num_rows, gallery_size = scores.shape
  rows = np.arange(num_rows)
  has_hit = hits.any(axis=1)
  best_score = np.where(hits, scores, -np.inf).max(axis=1, initial=-np.inf)
  # argmax of a boolean row returns its first True: the lowest-index hit among
  # the hits of the best score (this also holds when that score is -inf).
  best_column = np.argmax(hits & (scores == best_score[:, None]), axis=1)
  columns = np.arange(gallery_size)
  before = (scores > best_score[:, None]) | (
      (scores == best_score[:, None])
      & (columns[None, :] < best_column[:, None])
  )
  ranks = before.sum(axis=1)
  # The excluded column may score above the best hit: it is not ranked at all.
  excluded = exclude >= 0
  ranks -= excluded & before[rows, np.where(excluded, exclude, 0)]
  return np.where(has_hit, ranks, gallery_size)


def recall_at_k(
    scores,
    query_target_ids,
    gallery_ids,
    ks: Sequence[int] = (1, 5, 10, 50),
    exclude=None,
) -> dict[int, float]:
  """Recall@K of a full score matrix, on the host (TIRG's protocol).

  Query i hits at K when some gallery column j among its K best-ranked
  columns, the excluded column `exclude[i]` never ranked, has
  `gallery_ids[j] == query_target_ids[i]`:

    Recall@K = (1 / Q) * sum_i [ rank_i < K ],

  with rank_i the 0-based rank of query i's best-ranked hit (infinite when
  there is none). Ranking is by descending score, ties to the lower gallery
  index (see the module docstring). The work is O(Q N) without any sort.

  Args:
    scores: (Q, N) array, higher = more similar; no NaN.
    query_target_ids: (Q,) integer label (caption id) of each query's target.
    gallery_ids: (N,) integer label (caption id) of each gallery image.
    ks: cut-offs K, each in [1, N].
    exclude: optional (Q,) integer array, the gallery column removed from each
      query's ranking (its source image), -1 for none.

  Returns:
    `{K: recall}` with python floats in [0, 1].

  Raises:
    ValueError: on mismatched shapes, K outside [1, N], bad `exclude` entries,
      NaN scores or an empty query set.
  """
  scores = check_query_matrix(
      scores, "scores", "a (Q, N) matrix of query-by-gallery scores"
  )
  num_queries, gallery_size = scores.shape
  query_target_ids, gallery_ids = check_labels(
      query_target_ids, gallery_ids, num_queries, gallery_size
  )
  exclude = check_exclude(exclude, num_queries, gallery_size)
  ks = check_ks(ks, gallery_size)
  block = max(1, _BLOCK_ENTRIES // max(gallery_size, 1))
  ranks = np.empty((num_queries,), np.int64)
  for start in range(0, num_queries, block):
    stop = min(start + block, num_queries)
    block_scores = scores[start:stop]
    if np.isnan(block_scores).any():
      row = start + int(np.flatnonzero(np.isnan(block_scores).any(axis=1))[0])
      raise ValueError(
          f"scores row {row} contains NaN: rankings of NaN are undefined; "
          "fix the features that produced it."
      )
    hits = gallery_ids[None, :] == query_target_ids[start:stop, None]
    block_exclude = exclude[start:stop]
    excluded_rows = np.flatnonzero(block_exclude >= 0)
    hits[excluded_rows, block_exclude[excluded_rows]] = False
    ranks[start:stop] = _first_hit_ranks(block_scores, hits, block_exclude)
  return {k: float(np.mean(ranks < k)) for k in ks}


def weighted_harmonic_mean(ms, mt, alpha):
  """WHM: weighted harmonic mean of train-split recall Ms and test recall Mt.

  Huang et al., "Adversarial and Isotropic Gradient Augmentation for Image
  Retrieval with Text Feedback", IEEE TMM 25 (2023), judge the gap between
  fitting and generalization by a mean of Ms and Mt weighted by alpha. This is

    WHM = (1 + alpha) * Ms * Mt / (alpha * Mt + Ms),

  i.e. 1 / WHM = w / Ms + (1 - w) / Mt with weight w = alpha / (1 + alpha) on
  Ms: alpha = 0 gives Mt, alpha = 1 the plain harmonic mean 2 Ms Mt / (Ms + Mt),
  alpha -> inf tends to Ms. Swapping the roles of Ms and Mt inverts alpha:
  WHM(Ms, Mt, alpha) = WHM(Mt, Ms, 1 / alpha).

  Ambiguity: the paper's exact formula was not available to us; one of its
  slides reports (Ms + Mt) / 2 at alpha = 1, which only an arithmetic form
  such as (alpha * Ms + Mt) / (1 + alpha) yields. This function implements the
  harmonic form above, which the metric's name asks for.

  Units: WHM is homogeneous of degree 1 (WHM(c Ms, c Mt) = c WHM(Ms, Mt)), so
  Ms and Mt may be fractions in [0, 1] or percentages in [0, 100], as long as
  both use the same unit; the result is in that unit.

  Zeros: a weight of zero drops its term, so alpha = 0 gives Mt even when
  Ms = 0; otherwise a zero recall makes the harmonic mean 0, and the 0 / 0 of
  Ms = Mt = 0 returns 0.

  Args:
    ms: train-split recall Ms >= 0 (scalar or array).
    mt: test recall Mt >= 0 (scalar or array, broadcast against `ms`).
    alpha: weight alpha >= 0, finite.

  Returns:
    A python float for scalar inputs, else a float64 array.

  Raises:
    ValueError: on a negative or NaN recall, or alpha that is negative,
      infinite or NaN.
  """
  ms_array = np.asarray(ms, np.float64)
  mt_array = np.asarray(mt, np.float64)
  alpha_array = np.asarray(alpha, np.float64)
  for name, value in (("ms", ms_array), ("mt", mt_array)):
    if np.isnan(value).any() or (value < 0).any():
      raise ValueError(
          f"{name}={value} must be a non-negative recall (a fraction in [0, 1]"
          " or a percentage; both recalls in the same unit)."
      )
  if not np.isfinite(alpha_array).all() or (alpha_array < 0).any():
    raise ValueError(
        f"alpha={alpha} must be a finite weight >= 0 (0 gives Mt, 1 the "
        "harmonic mean)."
    )
  numerator = (1.0 + alpha_array) * ms_array * mt_array
  denominator = alpha_array * mt_array + ms_array
  with np.errstate(divide="ignore", invalid="ignore"):
    whm = np.where(
        denominator > 0,
        numerator / np.where(denominator > 0, denominator, 1.0),
        0.0,
    )
  whm = np.where(alpha_array == 0, mt_array, whm)
  if whm.ndim == 0:
    return float(whm)
  return whm
