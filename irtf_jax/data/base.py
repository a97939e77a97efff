"""What every dataset gives the trainer and the evaluator.

A dataset split is a gallery of images, each with a caption (the label that
decides a hit), plus the queries evaluated on that split and a sampler of
training queries. Loaders for real datasets and the generated `css_synth` all
return a `Split`, so the trainer never knows which dataset it trains on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Query:
  """One retrieval query: a source image plus a modification text.

  Attributes:
    source_index: index of the query image in the split's gallery.
    text: the modification text ("make the red circle large").
    target_caption: caption of the wanted image; any gallery image with this
      caption counts as a hit (TIRG's protocol).
    target_index: one gallery image with `target_caption` (the training target,
      and the image shown in qualitative pictures); -1 where none is known.
  """

  source_index: int
  text: str
  target_caption: str
  target_index: int = -1


class Split:
  """A dataset split as the trainer and evaluator see it.

  Subclasses set `name`, `split`, `captions` and `queries`, and implement
  `images` and `sample_training_queries`.

  Attributes:
    name: dataset name, e.g. "css_synth".
    split: "train" or "test".
    captions: one caption per image of the split.
    queries: the evaluation queries of this split under the dataset's protocol
      (test split: the published test queries; train split: the queries that
      measure train-split recall).
    gallery: indices of the images ranked for `queries` (default: all).
    exclude_columns: per query, the gallery column removed from its ranking,
      or -1 for none; None (the default) means "the query's source image",
      wherever it stands in the gallery (TIRG's protocol).
    caption_views: extra, coarser labels for recall (e.g. MIT-States'
      "adjective" and "noun"): name -> function caption -> label.
    vocabulary_texts: every text that training may produce (builds the word
      vocabulary of the text encoder).
  """

  name: str = ""
  split: str = ""
  captions: Sequence[str] = ()
  queries: Sequence[Query] = ()
  caption_views: Mapping[str, Callable[[str], str]] = {}
  exclude_columns: np.ndarray | None = None

  @property
  def gallery(self) -> np.ndarray:
    return np.arange(len(self.captions))

  def excluded_columns(self) -> np.ndarray:
    """`exclude_columns`, or each query's source position in the gallery."""
    if self.exclude_columns is not None:
      return np.asarray(self.exclude_columns, np.int64)
    position = {int(image): pos for pos, image in enumerate(self.gallery)}
    return np.asarray(
        [position.get(q.source_index, -1) for q in self.queries], np.int64
    )

  @property
  def vocabulary_texts(self) -> Sequence[str]:
    return [q.text for q in self.queries]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """Shape (H, W, 3) of one image as `images` returns it."""
    return tuple(self.images(np.zeros((1,), np.int64)).shape[1:])

  def __len__(self) -> int:
    return len(self.captions)

  def image(self, index: int) -> np.ndarray:
    """The image at `index`, uint8 HxWx3."""
    return self.images(np.asarray([index]))[0]

  def images(self, indices: np.ndarray) -> np.ndarray:
    """The images at `indices`, uint8 (len(indices), H, W, 3)."""
    raise NotImplementedError

  def sample_training_queries(
      self, seed: int, step: int, batch_size: int
  ) -> list[Query]:
    """The training queries of one batch, each with its `target_index`.

    A pure function of (seed, step, batch_size), so a resumed run sees exactly
    the batches an uninterrupted one sees.
    """
    raise NotImplementedError


def step_rng(seed: int, step: int) -> np.random.Generator:
  """A NumPy generator that depends only on (seed, step)."""
  return np.random.default_rng(np.random.SeedSequence([seed, step]))


class GalleryView(Split):
  """`split` seen through a subset of its images.

  The gallery is `images` (in their order in `split`); the queries are those
  of `split` whose source and target both lie in it; captions, images, texts
  and the training sampler are `split`'s.
  """

  def __init__(self, split: Split, images: Sequence[int]):
    if split.exclude_columns is not None:
      raise ValueError(
          f"{split.name}/{split.split}: its queries exclude "
          "chosen gallery columns, so a subset of its images "
          "is not a split of the same protocol"
      )
    self.parent = split
    self.name, self.split = split.name, split.split
    self.captions = split.captions
    self.caption_views = split.caption_views
    self._gallery = np.sort(np.asarray(images, np.int64))
    inside = set(self._gallery.tolist())
    self.queries = [
        q
        for q in split.queries
        if q.source_index in inside and q.target_index in inside
    ]

  @property
  def gallery(self) -> np.ndarray:
    return self._gallery

  @property
  def vocabulary_texts(self) -> Sequence[str]:
    return self.parent.vocabulary_texts

  def images(self, indices: np.ndarray) -> np.ndarray:
    return self.parent.images(indices)

  def sample_training_queries(
      self, seed: int, step: int, batch_size: int
  ) -> list[Query]:
    return self.parent.sample_training_queries(seed, step, batch_size)


def families(split: Split) -> list[np.ndarray]:
  """The images of `split`'s gallery grouped by the queries that link them.

  Two images are in one family when a chain of queries (source, target)
  joins them (CSS: a root scene and its modified variants). Families are
  listed by their first image in gallery order, each in gallery order.
  """
  gallery = np.asarray(split.gallery)
  parent = {int(i): int(i) for i in gallery}

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for q in split.queries:
    if q.source_index in parent and q.target_index in parent:
      a, b = root(q.source_index), root(q.target_index)
      parent[max(a, b)] = min(a, b)
  grouped: dict[int, list[int]] = {}
  for i in gallery:
    grouped.setdefault(root(int(i)), []).append(int(i))
  return [np.asarray(members) for members in grouped.values()]


def first_families(split: Split, num_images: int) -> GalleryView:
  """`split` restricted to its first whole families (`families`) holding at
  least `num_images` images (all of them if it has fewer): a gallery of the
  size of another split's with the same structure."""
  chosen, count = [], 0
  for family in families(split):
    if count >= num_images:
      break
    chosen.append(family)
    count += len(family)
  return GalleryView(split, np.concatenate(chosen) if chosen else [])
