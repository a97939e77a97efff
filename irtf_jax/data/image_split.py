"""The split and loader shared by image-file datasets: MIT-States, Fashion200k.

What is the same for both (TIRG's protocol, Vo et al., CVPR 2019):
- the loader (`register_loader`) and its options (`OPTIONS`): image_size,
  on_bad_image, complete_text, num_train_queries, train_query_seed; see
  `load_split`;
- test split: the gallery is every image; each query's own image is removed
  from its ranking (`exclude_columns`);
- train split: its `queries` (train-split recall, the Ms of WHM) are
  `num_train_queries` (10,000, or the number of images if fewer) training
  queries drawn with seed `train_query_seed`; the gallery is their target
  images, one column per query in query order (repeats included, as in TIRG),
  and nothing is excluded from their ranking (-1);
- training queries: pairs of queries sharing a uniformly drawn source image
  (`paired_queries`), a pure function of (seed, step).

What differs, each dataset module says in its subclass of `ImageFileSplit`:
which images can be a source, how a source's targets are drawn, the test
queries and their texts.

Images come out as TIRG's test transform makes them
(`image_files.resize_and_center_crop`); how they are read from the dataset
folder and stored is `irtf_jax.data.image_files`'s.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from irtf_jax.data import image_files
from irtf_jax.data import options as options_lib
from irtf_jax.data import register
from irtf_jax.data.base import Query
from irtf_jax.data.base import step_rng
from irtf_jax.data.storage import RecordSplit

DEFAULT_IMAGE_SIZE = 224
# Number of training queries that measure train-split recall (TIRG's).
NUM_TRAIN_RECALL_QUERIES = 10_000
# Stream id of the train-recall queries in `step_rng`-style seeding: far from
# any training step, so they never repeat a training batch.
TRAIN_RECALL_STREAM = 2**31 - 1

OPTIONS = {
    "image_size": options_lib.integer(
        DEFAULT_IMAGE_SIZE, 1, " (224 is TIRG's)"
    ),
    "on_bad_image": options_lib.one_of(
        "error",
        image_files.ON_BAD_IMAGE,
        " ('error' stops at the first bad image, 'skip' leaves bad images out)",
    ),
    "complete_text": options_lib.boolean(False),
    "num_train_queries": options_lib.integer(NUM_TRAIN_RECALL_QUERIES, 0),
    "train_query_seed": options_lib.integer(0, 0),
}


def check_options(dataset: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The options of `load_split` for `dataset`, checked, defaults filled in.

  Raises:
    ValueError naming `config.data.options.<option>` (`options.resolve`).
  """
  return options_lib.resolve(dataset, OPTIONS, options)


def paired_queries(
    rng: np.random.Generator,
    count: int,
    sources: np.ndarray,
    draw_two: Callable[[np.random.Generator, int], tuple[Query, Query]],
) -> list[Query]:
  """`count` training queries, two per source image (TIRG's pairing).

  Queries 2k and 2k+1 share a uniformly drawn source from `sources`; `draw_two`
  gives its two queries (with different modifications where the source has
  more than one). An odd `count` drops the last query of the last pair.
  """
  if len(sources) == 0:
    raise ValueError(
        "this split has no image with a possible modification "
        "(every noun or caption has a single variant); training "
        "queries cannot be sampled"
    )
  queries: list[Query] = []
  while len(queries) < count:
    source = int(sources[rng.integers(len(sources))])
    queries.extend(draw_two(rng, source))
  return queries[:count]


class ImageFileSplit(RecordSplit):
  """One split of a dataset of image files, with TIRG's queries.

  Images come out resized and centre-cropped to S x S
  (`image_files.resize_and_center_crop`).

  Subclasses say what is specific to their dataset by implementing
  `_index_captions`, `_is_source`, `_test_queries` and `_draw_two` (and
  `vocabulary_texts`); the gallery, the queries of each split and the
  training sampler are set up here, the same for every dataset (see the
  module doc).

  Attributes:
    paths: each image's path relative to the dataset folder.
    complete_text: ComposeAE's texts (the whole target caption).
    caption_to_indices: caption -> the indices of its images, in order.
    queries: test split: the dataset's test queries; train split: the
      sampled queries that measure train-split recall.
    exclude_columns: per query, the gallery column removed from its ranking
      (its source image), or -1 for none; the `exclude` argument of
      `irtf_jax.metrics.recall_at_k`.
  """

  def __init__(
      self,
      source,
      *,
      name: str,
      split: str,
      metadata: Mapping[str, Any],
      image_size: int,
      complete_text: bool,
      num_train_queries: int,
      train_query_seed: int,
  ):
    """Sets up the split from its data source and the builder's metadata.

    Args:
      source: the split's random-access data source.
      name: the dataset's name.
      split: "train" or "test".
      metadata: the builder's metadata: `metadata[split]` holds the records'
        "paths" and "captions" in record order, and any dataset-specific
        entry `_test_queries` reads.
      image_size: S of the S x S images `images` returns.
      complete_text: ComposeAE's texts (the whole target caption).
      num_train_queries: train split: how many sampled queries measure
        train-split recall (at most the number of images).
      train_query_seed: seed of those queries.
    """
    super().__init__(
        source, name=name, split=split, captions=metadata[split]["captions"]
    )
    self.image_size = image_size
    self.paths = list(metadata[split]["paths"])
    self.complete_text = complete_text
    self.caption_to_indices: dict[str, list[int]] = {}
    for i, caption in enumerate(self.captions):
      self.caption_to_indices.setdefault(caption, []).append(i)
    self._index_captions()
    self._sources = np.asarray(
        [i for i, c in enumerate(self.captions) if self._is_source(c)], np.int64
    )
    if split == "test":
      self.queries = self._test_queries(metadata)
      self._gallery = np.arange(len(self.captions))
      self.exclude_columns = np.asarray(
          [q.source_index for q in self.queries], np.int64
      )
    else:
      count = min(num_train_queries, len(self.captions))
      self.queries = (
          paired_queries(
              step_rng(train_query_seed, TRAIN_RECALL_STREAM),
              count,
              self._sources,
              self._draw_two,
          )
          if count
          else []
      )
      self._gallery = np.asarray(
          [q.target_index for q in self.queries], np.int64
      )
      self.exclude_columns = np.full(len(self.queries), -1, np.int64)

  @property
  def gallery(self) -> np.ndarray:
    return self._gallery

  def sample_training_queries(
      self, seed: int, step: int, batch_size: int
  ) -> list[Query]:
    return paired_queries(
        step_rng(seed, step), batch_size, self._sources, self._draw_two
    )

  def _query_to(
      self,
      rng: np.random.Generator,
      source: int,
      text: str,
      target_caption: str,
  ) -> Query:
    """A training query from `source` to an image of `target_caption`, drawn
    uniformly among that caption's images."""
    candidates = self.caption_to_indices[target_caption]
    target = candidates[rng.integers(len(candidates))]
    return Query(source, text, target_caption, int(target))

  def images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 (n, S, S, 3); one batched read of the records."""
    indices = [int(i) for i in np.asarray(indices, np.int64).reshape(-1)]
    if not indices:
      return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    records = self._source.__getitems__(indices)
    return np.stack([
        self._decode_record(record, index)
        for record, index in zip(records, indices)
    ])

  def _decode(self, index: int) -> np.ndarray:
    return self._decode_record(self._source[int(index)], index)

  def _decode_record(self, record, index: int) -> np.ndarray:
    encoded = record["image"]
    source = f"{self.name}/{self.split}[{index}]"
    try:
      with Image.open(io.BytesIO(encoded)) as img:
        return image_files.resize_and_center_crop(img, self.image_size)
    except Exception as e:
      raise ValueError(
          f"{source}: unreadable stored image ({e}); delete the "
          "prepared data and prepare again"
      ) from e

  def _index_captions(self) -> None:
    """Builds the dataset's pairing index from `caption_to_indices`."""
    raise NotImplementedError

  def _is_source(self, caption: str) -> bool:
    """Whether an image with `caption` has a target to be modified into."""
    raise NotImplementedError

  def _test_queries(self, metadata: Mapping[str, Any]) -> list[Query]:
    """The test queries, each with its `target_index`."""
    raise NotImplementedError

  def _draw_two(
      self, rng: np.random.Generator, source: int
  ) -> tuple[Query, Query]:
    """Two training queries from image `source`, targets differing if able."""
    raise NotImplementedError


def load_split(
    split_cls: type[ImageFileSplit],
    builder_cls,
    split: str,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    options: Mapping[str, Any],
) -> ImageFileSplit:
  """Prepares `builder_cls` once, returns `split_cls`'s split.

  Args:
    split_cls: the dataset's `ImageFileSplit` subclass.
    builder_cls: the dataset's `image_files.ImageFilesBuilder` subclass; its
      `name` is the dataset's.
    split: "train" or "test".
    data_dir: where the prepared array_record files are kept.
    manual_dir: the dataset folder (only needed to prepare).
    options: the loader options of `OPTIONS`, resolved by `check_options`:
      image_size (S of the S x S images `images` returns), on_bad_image
      ("error" or "skip", see `irtf_jax.data.image_files`), complete_text,
      num_train_queries, train_query_seed (see `ImageFileSplit`).
  """
  sources, metadata = image_files.prepare_with_metadata(
      builder_cls,
      data_dir=data_dir,
      manual_dir=manual_dir,
      image_size=options["image_size"],
      on_bad_image=options["on_bad_image"],
  )
  return split_cls(
      sources[split],
      name=builder_cls.name,
      split=split,
      metadata=metadata,
      image_size=options["image_size"],
      complete_text=options["complete_text"],
      num_train_queries=options["num_train_queries"],
      train_query_seed=options["train_query_seed"],
  )


def register_loader(
    split_cls: type[ImageFileSplit], builder_cls
) -> Callable[..., ImageFileSplit]:
  """Registers `load_split` for an image-file dataset, `builder_cls.name`.

  `data.load(name, split, data_dir=..., manual_dir=..., **options)` then
  checks the options against `OPTIONS` and returns
  `load_split(split_cls, builder_cls, split, ...)`.

  Args:
    split_cls: the dataset's `ImageFileSplit` subclass.
    builder_cls: the dataset's `image_files.ImageFilesBuilder` subclass; its
      `name` is the dataset's.

  Returns:
    The registered loader, `load(split, *, data_dir, manual_dir, options)`.
  """
  name = builder_cls.name
  return register(name, check_options=functools.partial(check_options, name))(
      functools.partial(load_split, split_cls, builder_cls)
  )
