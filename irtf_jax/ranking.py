"""Exact ranking of a gallery for a set of queries, on device, and Recall@K.

Ranking follows TIRG's protocol (see `irtf_jax.metrics`): the score of query i
and gallery image j is the dot product <q_i, g_j> (cosine similarity when the
features are L2-normalized), the query's source image is removed from its
ranking, and ties go to the lower gallery index, the order of `lax.top_k`.

Only the (Q, k) best neighbours ever leave the device: queries are ranked in
chunks of C rows, each chunk's (C, N) score block living only inside one
jit-compiled call, so device memory is O(C N + (Q + N) D) and host memory
O(Q k). Every chunk has the same shape (the last one is padded), so the chunk
function compiles once per (C, N, D, k).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from irtf_jax import metrics


def candidate_block_size(gallery_size: int, k: int) -> int:
  """Columns per block of the two-stage top-k (0: one plain top_k).

  The largest power of two b >= 8 whose k blocks hold at most a quarter of
  the gallery, so the exact second stage sorts at most N / 4 candidates.
  """
  block = 0
  while k * (2 * max(block, 4)) * 4 <= gallery_size:
    block = 2 * max(block, 4)
  return block


@functools.partial(jax.jit, static_argnames=("k", "precision", "block"))
def _top_k_chunk(
    query_chunk: jax.Array,
    gallery_t: jax.Array,
    exclude_chunk: jax.Array,
    k: int,
    precision: lax.Precision,
    block: int,
) -> tuple[jax.Array, jax.Array]:
  """Top-k gallery columns of one chunk of queries.

  With `block` > 0 the selection is exact in two stages: the row's k best
  columns lie in the k blocks of `block` consecutive columns with the highest
  maxima (a block holding one of them has a maximum at least the row's k-th
  best score, and among equal maxima `lax.top_k` keeps the lower block, whose
  columns also win ties), so `lax.top_k` runs over the block maxima, then over
  the k chosen blocks' columns in increasing column order, instead of over all
  N columns.

  Args:
    query_chunk: (C, D) float32 query features.
    gallery_t: (D, N) float32 gallery features, transposed (so the score
      matmul reads both operands row-major).
    exclude_chunk: (C,) int32 column removed from each query's ranking, -1 for none.
    k: number of neighbours.
    precision: matmul precision of the scores.
    block: columns per block of the two-stage selection, 0 for one top_k.

  Returns:
    scores (C, k) float32, descending, and indices (C, k) int32; a slot that
    could only be filled by the excluded column (k > N - 1) has index -1.
  """
  scores = jnp.dot(query_chunk, gallery_t, precision=precision)
  columns = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
  scores = jnp.where(columns == exclude_chunk[:, None], -jnp.inf, scores)
  if block:
    rows, size = scores.shape
    num_blocks = -(-size // block)
    # Padding columns are -inf and come after every real column, so no real
    # column loses a tie to them.
    padded = jnp.pad(
        scores,
        ((0, 0), (0, num_blocks * block - size)),
        constant_values=-jnp.inf,
    ).reshape(rows, num_blocks, block)
    _, best_blocks = lax.top_k(jnp.max(padded, axis=2), k)
    best_blocks = jnp.sort(best_blocks, axis=1)
    candidates = jnp.take_along_axis(padded, best_blocks[:, :, None], axis=1)
    candidate_columns = best_blocks[:, :, None] * block + jnp.arange(
        block, dtype=jnp.int32
    )
    top_scores, positions = lax.top_k(candidates.reshape(rows, k * block), k)
    top_indices = jnp.take_along_axis(
        candidate_columns.reshape(rows, k * block), positions, axis=1
    )
  else:
    top_scores, top_indices = lax.top_k(scores, k)
  top_indices = jnp.where(
      top_indices == exclude_chunk[:, None], -1, top_indices
  )
  return top_scores, top_indices


_transpose = jax.jit(jnp.transpose)


def top_k_neighbours(
    query_features,
    gallery_features,
    k: int,
    exclude=None,
    chunk_size: int = 1024,
    precision: lax.Precision = lax.Precision.HIGHEST,
) -> tuple[np.ndarray, np.ndarray]:
  """The k best-scored gallery images of every query, computed on device in query chunks.

  For query i, gallery column j has score s_ij = <q_i, g_j>; the column
  `exclude[i]` gets s_ij = -inf. The k columns of highest score are returned in
  ranking order (descending score, the lower index first among ties). The
  (Q, N) score matrix is never formed: each chunk of `chunk_size` queries is
  scored and reduced to its top k inside one compiled call.

  Args:
    query_features: (Q, D) float query features (host or device array).
    gallery_features: (N, D) float gallery features (host or device array).
    k: neighbours per query, in [1, N].
    exclude: optional (Q,) integer array, the gallery column removed from each
      query's ranking (its source image), -1 for none.
    chunk_size: queries scored per compiled call; device memory for scores is
      about 4 * chunk_size * N bytes.
    precision: matmul precision; the default HIGHEST keeps full float32 on
      accelerators (TPU and TF32 GPU defaults would perturb the ranking).

  Returns:
    `(scores, indices)`, host arrays of shape (Q, k): float32 scores in
    descending order and int32 gallery indices. An index is -1 only where the
    slot falls beyond the N - 1 columns left after exclusion (k = N).

  Raises:
    ValueError: on mismatched shapes, k outside [1, N], a non-positive
      `chunk_size` or bad `exclude` entries.
  """
  # Scores are float32 whatever the feature dtype (a no-op for float32 features).
  query_features = jnp.asarray(query_features, jnp.float32)
  gallery_features = jnp.asarray(gallery_features, jnp.float32)
  if query_features.ndim != 2 or gallery_features.ndim != 2:
    raise ValueError(
        f"query_features {query_features.shape} and gallery_features "
        f"{gallery_features.shape} must be (Q, D) and (N, D) matrices."
    )
  num_queries, dim = query_features.shape
  gallery_size, gallery_dim = gallery_features.shape
  if dim != gallery_dim:
    raise ValueError(
        f"query_features have D={dim} but gallery_features D={gallery_dim}: "
        "both must come from the same embedding."
    )
  (k,) = metrics.check_ks((k,), gallery_size)
  if (
      isinstance(chunk_size, bool)
      or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1
  ):
    raise ValueError(
        f"chunk_size={chunk_size!r} must be a positive integer (queries per"
        " chunk)."
    )
  exclude = metrics.check_exclude(exclude, num_queries, gallery_size).astype(
      np.int32
  )
  if num_queries == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)

  chunk_size = min(int(chunk_size), num_queries)
  num_chunks = -(-num_queries // chunk_size)
  padding = num_chunks * chunk_size - num_queries
  if padding:
    # Padded rows are zero queries with nothing excluded; their results are dropped.
    query_features = jnp.pad(query_features, ((0, padding), (0, 0)))
    exclude = np.pad(exclude, (0, padding), constant_values=-1)
  exclude = jnp.asarray(exclude)
  gallery_t = _transpose(gallery_features)
  block = candidate_block_size(gallery_size, k)
  chunk_scores, chunk_indices = [], []
  for start in range(0, num_chunks * chunk_size, chunk_size):
    top_scores, top_indices = _top_k_chunk(
        lax.dynamic_slice_in_dim(query_features, start, chunk_size),
        gallery_t,
        lax.dynamic_slice_in_dim(exclude, start, chunk_size),
        k=k,
        precision=precision,
        block=block,
    )
    chunk_scores.append(top_scores)
    chunk_indices.append(top_indices)
  # One transfer of the (Q, k) result at the end; the chunks stay on device meanwhile.
  scores = np.asarray(jnp.concatenate(chunk_scores))[:num_queries]
  indices = np.asarray(jnp.concatenate(chunk_indices))[:num_queries]
  return scores, indices


def recall_from_neighbours(
    indices, query_target_ids, gallery_ids, ks: Sequence[int] = (1, 5, 10, 50)
) -> dict[int, float]:
  """Recall@K from precomputed top-k neighbours (TIRG's protocol).

  Query i hits at K when some of its first K neighbours j has
  `gallery_ids[j] == query_target_ids[i]`; Recall@K is the fraction of hits.
  The neighbours are computed once by `top_k_neighbours` and reused for
  several labelings of the same gallery (e.g. MIT-States' full caption,
  adjective-only and noun-only recall).

  Args:
    indices: (Q, k) integer gallery indices in ranking order, -1 for an empty slot.
    query_target_ids: (Q,) integer label (caption id) of each query's target.
    gallery_ids: (N,) integer label (caption id) of each gallery image.
    ks: cut-offs K, each in [1, k].

  Returns:
    `{K: recall}` with python floats in [0, 1].

  Raises:
    ValueError: on mismatched shapes, K > k, indices outside [-1, N) or an
      empty query set.
  """
  indices = metrics.check_query_matrix(
      indices, "indices", "the (Q, k) neighbours of top_k_neighbours"
  )
  gallery_ids = np.asarray(gallery_ids)
  num_queries, num_neighbours = indices.shape
  if gallery_ids.ndim != 1:
    raise ValueError(
        f"gallery_ids has shape {gallery_ids.shape}: pass one caption id per "
        "gallery image, shape (N,)."
    )
  gallery_size = gallery_ids.shape[0]
  query_target_ids, gallery_ids = metrics.check_labels(
      query_target_ids, gallery_ids, num_queries, gallery_size
  )
  ks = tuple(ks)
  for k in ks:
    if (
        isinstance(k, (int, np.integer))
        and not isinstance(k, bool)
        and k > num_neighbours
    ):
      raise ValueError(
          f"ks contains K={k} but only k={num_neighbours} neighbours were"
          " ranked: call top_k_neighbours with k >= max(ks)."
      )
  ks = metrics.check_ks(ks, num_neighbours)
  if ((indices < -1) | (indices >= gallery_size)).any():
    raise ValueError(
        f"indices has entries outside [-1, {gallery_size}): they must be"
        f" gallery columns of this gallery_ids (N={gallery_size})."
    )
  valid = indices >= 0
  neighbour_ids = gallery_ids[np.where(valid, indices, 0)]
  hits = valid & (neighbour_ids == query_target_ids[:, None])
  # A query hits at K iff its first hit lies within the first K neighbours.
  first_hit = np.where(
      hits.any(axis=1), np.argmax(hits, axis=1), num_neighbours
  )
  return {k: float(np.mean(first_hit < k)) for k in ks}
