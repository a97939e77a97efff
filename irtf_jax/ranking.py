"""Exact ranking of a gallery for a set of queries, on device, and Recall@K.

Ranking follows TIRG's protocol (see `irtf_jax.metrics`): the score of query i
and gallery image j is the dot product <q_i, g_j> (cosine similarity when the
features are L2-normalized), the query's source image is removed from its
ranking, and ties go to the lower gallery index, the order of `lax.top_k`.

Only the (Q, k) best neighbours ever leave the device: queries are ranked in
chunks of C rows, two chunks at a time, each chunk's (C, N) score block
living only inside one jit-compiled call, so device memory is
O(C N + (Q + N) D) and host memory O(Q k). Every chunk has the same shape
(`query_chunks`: equal chunks, the last padded by fewer rows than there are
chunks), so the chunk function compiles once per (C, N, D, k).
"""

from __future__ import annotations

from concurrent import futures
import functools
import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from irtf_jax import metrics


def candidate_block_size(gallery_size: int, k: int) -> int:
  """Columns per block of the two-stage top-k (0: one plain top_k).

  The first stage selects among N / b block maxima and the second among the
  k b columns of the chosen blocks; their sum N / b + k b is least at
  b = sqrt(N / k). The block is the power of two nearest to that, at least 8,
  and at most the largest whose k blocks hold a quarter of the gallery (so
  the second stage sorts at most N / 4 candidates); 0 where even blocks of 8
  would hold more.
  """
  if 4 * k * 8 > gallery_size:
    return 0
  largest = 8
  while 4 * k * 2 * largest <= gallery_size:
    largest *= 2
  # On a tie between b and 2 b (N / k = 2 b^2) the larger.
  balanced = 2 ** math.floor(math.log2(gallery_size / k) / 2 + 0.5)
  return min(max(balanced, 8), largest)


def query_chunks(num_queries: int, chunk_size: int) -> tuple[int, int]:
  """(rows per chunk, number of chunks) for Q queries, chunks of at most C.

  The Q queries are split into ceil(Q / C) chunks of ceil(Q / chunks) rows
  each, so the padding of the last chunk (whose rows are scored and dropped)
  is less than one row per chunk, where chunks of exactly C rows would pad up
  to C - 1: 1,025 queries in chunks of at most 1,024 are two chunks of 513
  rows, not two of 1,024 (1.998x the scoring work); 30,000 are 30 chunks of
  1,000, not of 1,024 (1.024x).
  """
  count = -(-num_queries // chunk_size)
  return -(-num_queries // count), count


def _block_major(gallery_features: jax.Array, block: int) -> jax.Array:
  """(N, D) gallery -> (b * nb, D), row i * nb + j holding gallery row j b + i.

  Block j (gallery columns j b .. j b + b - 1) then lies at stride nb in each
  score row, so a (C, b, nb) view of the scores reduces blocks over its middle
  axis: nb-wide vector maxima instead of a reduction over b adjacent
  columns. The rows padding N to nb b repeat the last gallery row, so the
  last block's maximum is that of its real columns.
  """
  size, dim = gallery_features.shape
  num_blocks = -(-size // block)
  padded = jnp.pad(
      gallery_features, ((0, num_blocks * block - size), (0, 0)), mode="edge"
  )
  return (
      padded.reshape(num_blocks, block, dim)
      .transpose(1, 0, 2)
      .reshape(block * num_blocks, dim)
  )


@functools.partial(
    jax.jit, static_argnames=("k", "precision", "block", "gallery_size")
)
def _top_k_chunk(
    query_chunk: jax.Array,
    gallery_blocks: jax.Array,
    exclude_chunk: jax.Array,
    k: int,
    precision: lax.Precision,
    block: int,
    gallery_size: int,
) -> tuple[jax.Array, jax.Array]:
  """Top-k gallery columns of one chunk of queries.

  The selection is exact in two stages. With the excluded column masked,
  the row's k best columns lie in the k blocks of `block` consecutive columns
  with the highest maxima (a block holding one of them has a maximum at least
  the row's k-th best score, and among equal maxima `lax.top_k` keeps the
  lower block, whose columns also win ties). Unmasked, only the excluded
  column's block can move up, so those k blocks are among the k + 1 of
  highest unmasked maxima. `lax.top_k` runs over the block maxima, then over
  the chosen blocks' columns in increasing column order (the excluded one
  masked, and those below the least chosen maximum, which cannot rank),
  instead of over all N columns. `block` = 1 is one plain `lax.top_k`.

  Args:
    query_chunk: (C, D) float32 query features.
    gallery_blocks: (block * nb, D) float32 gallery features in
      `_block_major` order (for `block` = 1 the gallery itself). The score
      matmul contracts the feature axis of both operands; on XLA:CPU the
      ranking took 0.89x the time it took with a (D, N) transposed gallery
      (30k x 30k, 2 cores, same process).
    exclude_chunk: (C,) int32 column removed from each query's ranking, -1
      for none.
    k: number of neighbours.
    precision: matmul precision of the scores.
    block: columns per block of the two-stage selection (1: one top_k).
    gallery_size: N, the number of real gallery columns.

  Returns:
    scores (C, k) float32, descending, and indices (C, k) int32; a slot that
    could only be filled by the excluded column (k > N - 1) has index -1.
  """
  rows = query_chunk.shape[0]
  num_blocks = gallery_blocks.shape[0] // block
  scores = lax.dot_general(
      query_chunk,
      gallery_blocks,
      (((1,), (1,)), ((), ())),
      precision=precision,
  ).reshape(rows, block, num_blocks)

  def masked(values, columns):
    # Padding columns and the excluded one score -inf; padding columns come
    # after every real column, so no real column loses a tie to them.
    drop = (columns >= gallery_size) | (columns == exclude_chunk[:, None, None])
    return jnp.where(drop, -jnp.inf, values)

  if block == 1:
    candidates = masked(
        scores, lax.broadcasted_iota(jnp.int32, (1, 1, num_blocks), 2)
    )
    candidate_columns = None
  else:
    # Maxima of the unmasked scores: masking first would write the whole
    # (C, N) block once more. Only the excluded column's block can rank higher
    # than with it masked, so k + 1 blocks hold the k best of the rest.
    _, best_blocks = lax.top_k(jnp.max(scores, axis=1), k + 1)
    best_blocks = jnp.sort(best_blocks, axis=1)[:, None, :]  # (C, 1, k + 1)
    offsets = lax.broadcasted_iota(jnp.int32, (1, block, 1), 1)
    columns = best_blocks * block + offsets  # (C, block, k + 1)
    chosen = jnp.take_along_axis(scores, best_blocks, axis=2)
    # At least k of the k + 1 chosen blocks have their maximum at a column
    # other than the excluded one (a block's maximum is at a real column), so
    # the k-th best score is at least the least of the chosen blocks' maxima.
    # Columns below it cannot rank; as -inf, lax.top_k passes over them in
    # about half the time (20 -> 9 ms for 1,000 rows of 1,616 candidates).
    floor = jnp.min(jnp.max(chosen, axis=1), axis=1)[:, None, None]
    candidates = masked(chosen, columns)
    candidates = jnp.where(candidates < floor, -jnp.inf, candidates)
    # Block-major, so candidates run in increasing column order.
    candidates = jnp.swapaxes(candidates, 1, 2)
    candidate_columns = jnp.swapaxes(columns, 1, 2).reshape(rows, -1)
  top_scores, top_indices = lax.top_k(candidates.reshape(rows, -1), k)
  if candidate_columns is not None:
    top_indices = jnp.take_along_axis(candidate_columns, top_indices, axis=1)
  top_indices = jnp.where(
      top_indices == exclude_chunk[:, None], -1, top_indices
  )
  return top_scores, top_indices


_block_major_jit = jax.jit(_block_major, static_argnames="block")

# Chunks ranked at once, each by its own host thread. XLA:CPU runs a compiled
# call on the thread that dispatched it (an asynchronously dispatched second
# call waits for the first) and its TopK on one core, so with one thread a
# core idles through every chunk's selection; a second thread's matmul fills
# it (0.90x the time of one thread at 30k x 30k on 2 cores, same process). On
# accelerators the calls queue on the device as before.
_CONCURRENT_CHUNKS = 2


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
    chunk_size: at most this many queries are scored per compiled call (see
      `query_chunks`); two calls run at once, so device memory for scores is
      at most about 8 * chunk_size * N bytes.
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

  chunk_size, num_chunks = query_chunks(num_queries, int(chunk_size))
  padding = num_chunks * chunk_size - num_queries
  if padding:
    # Padded rows are zero queries with nothing excluded; their results are dropped.
    query_features = jnp.pad(query_features, ((0, padding), (0, 0)))
    exclude = np.pad(exclude, (0, padding), constant_values=-1)
  exclude = jnp.asarray(exclude)
  block = max(candidate_block_size(gallery_size, k), 1)
  gallery_blocks = _block_major_jit(gallery_features, block)
  # JAX's configuration contexts are thread-local: the pool's threads take
  # the caller's device (or uncommitted inputs would be ranked on the default
  # one) and matmul precision (for precision=None).
  device = jax.config.jax_default_device
  matmul_precision = jax.config.jax_default_matmul_precision

  def rank_chunk(start):
    with jax.default_device(device), jax.default_matmul_precision(
        matmul_precision
    ):
      return jax.block_until_ready(
          _top_k_chunk(
              lax.dynamic_slice_in_dim(query_features, start, chunk_size),
              gallery_blocks,
              lax.dynamic_slice_in_dim(exclude, start, chunk_size),
              k=k,
              precision=precision,
              block=block,
              gallery_size=gallery_size,
          )
      )

  with futures.ThreadPoolExecutor(
      _CONCURRENT_CHUNKS, thread_name_prefix="irtf_jax-ranking"
  ) as pool:
    ranked = list(
        pool.map(rank_chunk, range(0, num_chunks * chunk_size, chunk_size))
    )
  chunk_scores, chunk_indices = zip(*ranked)
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
