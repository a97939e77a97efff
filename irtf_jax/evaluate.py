"""Evaluating a model on a dataset split: Recall@K under TIRG's protocol.

`FeatureExtractor` embeds the queries and the gallery of a split with a
model, data-parallel, encoding each distinct image once and leaving the
features on device; `evaluate_split` ranks
them with `irtf_jax.ranking.top_k_neighbours` and turns the neighbours into
recall for each labeling of the gallery (the caption, and the split's
`caption_views`); `train_recall_split` picks what train-split recall is
measured on.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from irtf_jax import metrics
from irtf_jax import ranking
from irtf_jax.data import base as data_base
from irtf_jax.data import pipeline
from irtf_jax.models import normalize_images


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


class FeatureExtractor:
  """Gallery and query features of a model, data-parallel, on device.

  Each distinct image is decoded and encoded once (`encode_images`): its
  target feature and what a query composes of it. The queries, sorted by
  reference image, are composed right after their image's batch, so the
  features of a batch of images are on device only while its queries need
  them; each device composes the queries on the images it encoded, so no
  call exchanges data between devices. Against encoding every query's image
  again (TIRG's test_retrieval.py), this saves one image-encoder pass per
  query whose image is also in the gallery or starts another query: most of
  them, since the reference images of TIRG's protocol are gallery images.
  Batches are padded to one shape, so each function compiles once.

  With `decode_threads` > 0 the image batches are decoded ahead in that many
  threads (Pillow releases the GIL while it decodes and resizes), so an
  accelerator is not kept waiting on one host core; the features do not
  depend on it.
  """

  def __init__(
      self,
      model,
      parallel,
      batch_size: int,
      show_progress: bool = True,
      decode_threads: int = 0,
  ):
    if batch_size % parallel.num_devices:
      raise ValueError(
          f"config.eval.batch_size: {batch_size} is not divisible "
          f"by the {parallel.num_devices} devices"
      )
    self.parallel = parallel
    self.batch_size = batch_size
    # Batch rows [d r, (d + 1) r) of a sharded batch live on device d.
    self.rows_per_device = batch_size // parallel.num_devices
    self.show_progress = show_progress
    if decode_threads < 0:
      raise ValueError(
          f"decode_threads={decode_threads} (config.data.workers) must be"
          " >= 0: the threads that decode evaluation images, 0 to decode in"
          " the evaluating one"
      )
    self.decode_threads = decode_threads
    replicated, sharded = parallel.replicated, parallel.batch_sharding

    def encode_images(variables, images):
      return model.apply(
          variables,
          normalize_images(images),
          train=False,
          method=model.encode_images,
      )

    def compose_queries(variables, composer_inputs, rows, tokens, lengths):
      # Per device: `rows` index this device's rows of `composer_inputs`.
      return model.apply(
          variables,
          composer_inputs[rows],
          tokens,
          lengths,
          train=False,
          method=model.compose_query,
      )

    self._encode_images = jax.jit(
        encode_images,
        in_shardings=(replicated, sharded),
        out_shardings=(sharded, sharded),
    )
    # shard_map: each device composes queries on the images it encoded
    # (`_device_slots`), so composing exchanges nothing between devices. A
    # gather across devices here put a collective in every call, and on a
    # CPU host's eight fake devices one of them waited out XLA's timeout for
    # two devices that never joined.
    self._compose_queries = jax.jit(
        jax.shard_map(
            compose_queries,
            mesh=parallel.mesh,
            in_specs=(replicated.spec,) + 4 * (sharded.spec,),
            out_specs=sharded.spec,
            # Nothing here communicates; the model's scans need not say so.
            check_vma=False,
        )
    )

  def _put(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(
        _pad_rows(x, self.batch_size), self.parallel.batch_sharding
    )

  def _device_slots(self, positions: np.ndarray) -> list[np.ndarray]:
    """The compose calls for queries on images at `positions` of a batch.

    Device d encoded batch rows [d r, (d + 1) r), r = batch_size / devices,
    and its r query slots take only queries on those images. Each call is a
    (batch_size,) array of indices into `positions`, -1 for a padding slot.
    """
    per_device = self.rows_per_device
    by_device = [
        np.flatnonzero(positions // per_device == d)
        for d in range(self.parallel.num_devices)
    ]
    calls = max(-(-len(mine) // per_device) for mine in by_device)
    slots = np.full((calls, self.parallel.num_devices, per_device), -1)
    for d, mine in enumerate(by_device):
      for call in range(calls):
        part = mine[call * per_device : (call + 1) * per_device]
        slots[call, d, : len(part)] = part
    return list(slots.reshape(calls, self.batch_size))

  def features(
      self,
      variables,
      split,
      gallery: np.ndarray,
      queries: Sequence,
      vocab,
      max_length: int,
      description: str = "features",
  ) -> tuple[jax.Array, jax.Array]:
    """(gallery features (N, D), query features (Q, D)), in the given order.

    Args:
      split: what `split.images(indices)` decodes.
      gallery: image indices of the gallery.
      queries: objects with `source_index` and `text` (`data.Query`).
      vocab: texts -> (token ids, lengths), e.g. a `Vocabulary`.
    """
    gallery = np.asarray(gallery, np.int64)
    sources = np.asarray([q.source_index for q in queries], np.int64)
    images = np.union1d(gallery, sources)
    by_source = np.argsort(sources, kind="stable")
    sorted_sources = sources[by_source]
    targets, composed, composed_ids = [], [], []
    batches = [
        images[start : start + self.batch_size]
        for start in range(0, len(images), self.batch_size)
    ]
    decoded = pipeline.mapped_ahead(split.images, batches, self.decode_threads)
    with contextlib.closing(decoded), tqdm.tqdm(
        total=len(images) + len(queries),
        desc=description,
        unit="img",
        leave=False,
        disable=not self.show_progress,
        dynamic_ncols=True,
    ) as bar:
      for pixels, batch in zip(decoded, batches):
        composer_inputs, target = self._encode_images(
            variables, self._put(pixels)
        )
        targets.append(target)
        # Every source is among `images`, so those within this batch's range
        # are this batch's.
        first = np.searchsorted(sorted_sources, batch[0], "left")
        stop = np.searchsorted(sorted_sources, batch[-1], "right")
        on_batch = by_source[first:stop]
        positions = np.searchsorted(batch, sources[on_batch])
        for slots in self._device_slots(positions):
          # Padding slots repeat one of the call's queries (any row in
          # range is one of the device's own).
          picked = np.where(slots >= 0, slots, slots.max())
          tokens, lengths = vocab.encode(
              [queries[i].text for i in on_batch[picked]], max_length
          )
          rows = (positions[picked] % self.rows_per_device).astype(np.int32)
          composed.append(
              self._compose_queries(
                  variables,
                  composer_inputs,
                  self._put(rows),
                  self._put(tokens),
                  self._put(lengths),
              )
          )
          composed_ids.append(np.where(slots >= 0, on_batch[picked], -1))
        bar.update(len(batch) + len(on_batch))
    # Batch b holds images[b B : (b + 1) B] in rows b B ...: row = position.
    gallery_features = jnp.concatenate(targets)[
        np.searchsorted(images, gallery)
    ]
    if not composed:
      return gallery_features, gallery_features[:0]
    composed_ids = np.concatenate(composed_ids)
    row_of_query = np.empty(len(queries), np.int64)
    row_of_query[composed_ids[composed_ids >= 0]] = np.flatnonzero(
        composed_ids >= 0
    )
    return gallery_features, jnp.concatenate(composed)[row_of_query]


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
  gallery_features, query_features = extractor.features(
      variables, split, gallery, queries, vocab, max_length, name
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
