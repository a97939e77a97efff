"""A CSS split under TIRG's protocol, and the TFDS records of both CSSs.

A "mod" is one modification text with all its (from, to) image pairs, as in
the CSS `.npy`. A split's `queries` are every (from, to) pair of every mod
(test split: the test protocol; train split: the queries of train-split
recall, Ms of WHM); `vocabulary_texts` are the split's mod texts (build the
word vocabulary from the train split's); `sample_training_queries` draws a
mod and one of its pairs, then a second, different mod of the same source
image, so consecutive queries share their source (TIRG's CSS sampling).

`css_synth` and `css3d` both write their splits with `css_examples` (one
record per gallery image: encoded image plus JSON metadata) and read them back
with `read_css_split`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from irtf_jax.data import base
from irtf_jax.data import storage
from irtf_jax.data.base import Query
from irtf_jax.data.css.render import render_scene


@dataclasses.dataclass(frozen=True)
class Mod:
  """One modification text with every (from, to) image pair it applies to."""

  text: str
  sources: tuple[int, ...]
  targets: tuple[int, ...]


class CSSSplit(storage.RecordSplit):
  """A CSS split: gallery images with captions and scene objects, plus mods.

  Every image is held in memory (CSS images are tiny).

  Attributes (besides `Split`'s):
    objects: per gallery image, its objects in CSS `objects_img` format.
    mods: the split's `Mod`s (a text with all its (from, to) pairs).
  """

  def __init__(
      self,
      source,
      *,
      name: str,
      split: str,
      captions,
      objects,
      mods: Sequence[Mod],
      images: np.ndarray,
  ):
    super().__init__(source, name=name, split=split, captions=captions)
    self._images = np.asarray(images, np.uint8)
    self.objects = list(objects)
    self.mods = list(mods)
    self.queries = [
        Query(f, mod.text, self.captions[t], t)
        for mod in self.mods
        for f, t in zip(mod.sources, mod.targets)
    ]
    # source -> [(mod id, pair index)]: TIRG's second-query table.
    self._pairs_of_source: dict[int, list[tuple[int, int]]] = {}
    for m, mod in enumerate(self.mods):
      for k, f in enumerate(mod.sources):
        self._pairs_of_source.setdefault(f, []).append((m, k))
    # First queries are drawn among pairs whose source has another mod.
    self._first_pairs = []
    for m, mod in enumerate(self.mods):
      eligible = [
          k
          for k, f in enumerate(mod.sources)
          if any(m2 != m for m2, _ in self._pairs_of_source[f])
      ]
      if eligible:
        self._first_pairs.append((m, np.asarray(eligible)))

  @property
  def vocabulary_texts(self) -> list[str]:
    return [mod.text for mod in self.mods]

  def images(self, indices: np.ndarray) -> np.ndarray:
    return self._images[np.asarray(indices, np.int64)]

  def _query(self, m: int, k: int) -> Query:
    mod = self.mods[m]
    target = mod.targets[k]
    return Query(mod.sources[k], mod.text, self.captions[target], target)

  def sample_training_queries(
      self, seed: int, step: int, batch_size: int
  ) -> list[Query]:
    """TIRG's CSS sampling, a pure function of (seed, step, batch_size).

    Queries 2i and 2i+1 share their source image: the first is a random mod
    (uniform) and one of its pairs (uniform), the second a uniformly drawn
    (mod, target) entry of the same source with a different mod. Sources
    with a single mod are never drawn first (TIRG would loop on them).
    """
    if not self._first_pairs:
      raise ValueError(
          f"{self.name}/{self.split}: no source image has two "
          "different modifications; cannot sample TIRG's "
          "query pairs"
      )
    rng = base.step_rng(seed, step)
    batch = []
    while len(batch) < batch_size:
      m, eligible = self._first_pairs[rng.integers(len(self._first_pairs))]
      k = int(eligible[rng.integers(len(eligible))])
      batch.append(self._query(m, k))
      if len(batch) < batch_size:
        others = [
            (m2, k2)
            for m2, k2 in self._pairs_of_source[self.mods[m].sources[k]]
            if m2 != m
        ]
        batch.append(self._query(*others[rng.integers(len(others))]))
    return batch


def css_features():
  """TFDS features of a CSS gallery image: encoded image + JSON metadata.

  The metadata holds "index" (gallery position), "caption", "objects" (CSS
  `objects_img` format) and "mods": [[mod id, pair index in the mod, text,
  target index], ...] for every pair whose source is this image, from which
  the split's mods are rebuilt in their original order.
  """
  return tfds.features.FeaturesDict({
      "image": storage.encoded_image_feature(),
      "metadata": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


def css_examples(images, captions, objects, mods: Sequence[Mod]):
  """Yields (key, example) in gallery order for `css_features`."""
  outgoing: dict[int, list] = {}
  for m, mod in enumerate(mods):
    for k, (f, t) in enumerate(zip(mod.sources, mod.targets)):
      outgoing.setdefault(f, []).append([m, k, mod.text, t])
  for i, (image, caption, objs) in enumerate(zip(images, captions, objects)):
    metadata = {
        "index": i,
        "caption": caption,
        "objects": objs,
        "mods": outgoing.get(i, []),
    }
    yield i, {"image": image, "metadata": json.dumps(metadata)}


def _read_records(source, chunk: int = 1024):
  for start in range(0, len(source), chunk):
    yield from source.__getitems__(
        list(range(start, min(start + chunk, len(source))))
    )


def read_css_split(
    source, *, name: str, split: str, render_size: int | None = None
) -> CSSSplit:
  """Rebuilds a `CSSSplit` from a data source written by `css_examples`.

  Args:
    source: the split's TFDS data source.
    name, split: dataset and split names (for errors).
    render_size: when set, images are re-rendered from the stored objects with
      `render_scene` (pixel-identical to the stored PNGs of 2D renders and
      several times faster than decoding them); else the stored images are
      decoded.
  """
  captions, objects, images, entries = [], [], [], []
  for i, record in enumerate(_read_records(source)):
    metadata = json.loads(record["metadata"])
    if metadata["index"] != i:
      raise ValueError(
          f"{name}/{split}: prepared data is out of order "
          f"(record {i} holds image {metadata['index']}); "
          "delete the prepared folder in data_dir and reload"
      )
    captions.append(metadata["caption"])
    objects.append(metadata["objects"])
    entries.extend((i, *entry) for entry in metadata["mods"])
    images.append(
        render_scene(metadata["objects"], render_size)
        if render_size
        else storage.decode_image(
            record["image"], source=f"{name}/{split}[{i}]"
        )
    )
  pairs: dict[int, dict[int, tuple[int, int]]] = {}
  texts: dict[int, str] = {}
  for f, m, k, text, t in entries:
    pairs.setdefault(m, {})[k] = (f, t)
    texts[m] = text
  mods = [
      Mod(
          texts[m],
          tuple(pairs[m][k][0] for k in sorted(pairs[m])),
          tuple(pairs[m][k][1] for k in sorted(pairs[m])),
      )
      for m in sorted(pairs)
  ]
  return CSSSplit(
      source,
      name=name,
      split=split,
      captions=captions,
      objects=objects,
      mods=mods,
      images=np.stack(images),
  )
