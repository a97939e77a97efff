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
    return np.asarray([position.get(q.source_index, -1) for q in self.queries],
                      np.int64)

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

  def sample_training_queries(self, seed: int, step: int,
                              batch_size: int) -> list[Query]:
    """The training queries of one batch, each with its `target_index`.

    A pure function of (seed, step, batch_size), so a resumed run sees exactly
    the batches an uninterrupted one sees.
    """
    raise NotImplementedError


def step_rng(seed: int, step: int) -> np.random.Generator:
  """A NumPy generator that depends only on (seed, step)."""
  return np.random.default_rng(np.random.SeedSequence([seed, step]))
