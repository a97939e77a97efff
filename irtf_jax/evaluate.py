"""Evaluating a model on a dataset split: Recall@K under TIRG's protocol.

`FeatureExtractor` embeds the queries and the gallery of a split with a
model, data-parallel, leaving the features on device; `evaluate_split` ranks
them with `irtf_jax.ranking.top_k_neighbours` and turns the neighbours into
recall for each labeling of the gallery (the caption, and the split's
`caption_views`); `train_recall_split` picks what train-split recall is
measured on.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from irtf_jax import metrics
from irtf_jax import ranking
from irtf_jax.data import base as data_base
from irtf_jax.models import normalize_images


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield np.arange(start, min(start + batch_size, n))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


class FeatureExtractor:
  """Query and gallery features of a model, batch by batch, data-parallel.

  Batches are padded to one shape (so each function compiles once), sharded
  over the devices, and the features stay on device until ranking.
  """

  def __init__(
      self, model, parallel, batch_size: int, show_progress: bool = True
  ):
    if batch_size % parallel.num_devices:
      raise ValueError(
          f"config.eval.batch_size: {batch_size} is not divisible "
          f"by the {parallel.num_devices} devices"
      )
    self.parallel = parallel
    self.batch_size = batch_size
    self.show_progress = show_progress
    replicated, sharded = parallel.replicated, parallel.batch_sharding

    def embed_target(variables, images):
      return model.apply(
          variables,
          normalize_images(images),
          train=False,
          method=model.embed_target,
      )

    def embed_query(variables, images, tokens, lengths):
      return model.apply(
          variables,
          normalize_images(images),
          tokens,
          lengths,
          train=False,
          method=model.embed_query,
      )

    self._embed_target = jax.jit(
        embed_target, in_shardings=(replicated, sharded), out_shardings=sharded
    )
    self._embed_query = jax.jit(
        embed_query,
        in_shardings=(replicated, sharded, sharded, sharded),
        out_shardings=sharded,
    )

  def _run(self, fn, variables, n, make_inputs, description):
    chunks = []
    with tqdm.tqdm(
        total=n,
        desc=description,
        unit="img",
        leave=False,
        disable=not self.show_progress,
        dynamic_ncols=True,
    ) as bar:
      for rows in _batches(n, self.batch_size):
        inputs = [_pad_rows(x, self.batch_size) for x in make_inputs(rows)]
        inputs = [
            jax.device_put(x, self.parallel.batch_sharding) for x in inputs
        ]
        chunks.append(fn(variables, *inputs)[: len(rows)])
        bar.update(len(rows))
    return jnp.concatenate(chunks)

  def gallery(
      self, variables, split, indices: np.ndarray, description: str = "gallery"
  ) -> jax.Array:
    return self._run(
        self._embed_target,
        variables,
        len(indices),
        lambda rows: [split.images(indices[rows])],
        description,
    )

  def queries(
      self,
      variables,
      split,
      queries,
      vocab,
      max_length: int,
      description: str = "queries",
  ) -> jax.Array:
    def make_inputs(rows):
      chosen = [queries[i] for i in rows]
      tokens, lengths = vocab.encode([q.text for q in chosen], max_length)
      images = split.images(np.asarray([q.source_index for q in chosen]))
      return [images, tokens, lengths]

    return self._run(
        self._embed_query, variables, len(queries), make_inputs, description
    )


def evaluate_split(
    extractor: FeatureExtractor,
    variables,
    split,
    *,
    vocab,
    max_length: int,
    ks: Sequence[int],
    max_queries: int = 0,
    seed: int = 0,
    chunk_size: int = 1024,
    name: str = "eval",
) -> tuple[dict[str, float], list, np.ndarray]:
  """Recall@K of `split.queries` against `split.gallery` (TIRG's protocol).

  Args:
    max_queries: evaluate a fixed random subset of this many queries
      (0: all), drawn from `seed`.
    name: the split's name in the progress bars.

  Returns:
    ({"recall@K": r, "<view>/recall@K": r, ...} in [0, 1], the queries
    evaluated, and the top-k gallery image indices of each (Q, max(ks))).
  """
  gallery = np.asarray(split.gallery)
  queries = list(split.queries)
  exclude = split.excluded_columns()
  if max_queries and len(queries) > max_queries:
    chosen = np.sort(
        np.random.default_rng(seed).choice(
            len(queries), max_queries, replace=False
        )
    )
    queries = [queries[i] for i in chosen]
    exclude = exclude[chosen]
  gallery_features = extractor.gallery(
      variables, split, gallery, f"{name} gallery"
  )
  query_features = extractor.queries(
      variables, split, queries, vocab, max_length, f"{name} queries"
  )
  k = min(max(ks), len(gallery))
  ks = tuple(x for x in ks if x <= k)
  _, neighbours = ranking.top_k_neighbours(
      query_features,
      gallery_features,
      k,
      exclude=exclude,
      chunk_size=chunk_size,
  )
  gallery_captions = [split.captions[i] for i in gallery]
  target_captions = [q.target_caption for q in queries]
  results = {}
  views = {"": lambda caption: caption, **dict(split.caption_views)}
  for view, label_of in views.items():
    gallery_ids, target_ids = metrics.caption_ids(
        [label_of(c) for c in gallery_captions],
        [label_of(c) for c in target_captions],
    )
    recall = ranking.recall_from_neighbours(
        neighbours, target_ids, gallery_ids, ks
    )
    prefix = f"{view}/" if view else ""
    results.update({f"{prefix}recall@{kk}": v for kk, v in recall.items()})
  return results, queries, gallery[np.maximum(neighbours, 0)]


TRAIN_GALLERIES = ("all", "test_size")


def train_recall_split(
    train_split,
    test_split,
    *,
    train_gallery: str,
    max_train_queries: int,
    max_test_queries: int,
):
  """The split and query limit that train-split recall (Ms) is measured on.

  Args:
    train_gallery: "all": the train split's queries against its whole gallery,
      at most `max_train_queries` of them (0: all); "test_size": its first
      whole families (`data.base.first_families`) holding as many images as
      the test gallery, and as many queries as the test evaluation ranks, so
      that train and test recall come from galleries of one size and
      structure and their gap is generalization, not gallery density.

  Returns:
    (split, max_queries) for `evaluate_split`.
  """
  if train_gallery == "all":
    return train_split, max_train_queries
  if train_gallery != "test_size":
    raise ValueError(
        f"config.eval.train_gallery: unknown {train_gallery!r}; "
        f"allowed: {', '.join(TRAIN_GALLERIES)}"
    )
  if len(train_split.gallery) != len(train_split.captions):
    raise ValueError(
        f"config.eval.train_gallery='test_size': the {train_split.name} train "
        "split does not rank against its own images; use 'all'"
    )
  num_test = len(test_split.queries)
  if max_test_queries:
    num_test = min(num_test, max_test_queries)
  return (
      data_base.first_families(train_split, len(test_split.gallery)),
      num_test,
  )
