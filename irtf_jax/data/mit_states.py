"""MIT-States (Isola, Lim, Adelson, CVPR 2015) under TIRG's protocol (Vo et al., CVPR 2019).

  split = data.load("mit_states", "test", manual_dir="/data/mitstates")

On disk (`manual_dir`): `images/<adjective> <noun>/*.jpg`. Folders without a
space, and the placeholder folders `adj <noun>`, are not classes and are
ignored. Folders and files are read in sorted order, so indices do not depend
on the file system.

Protocol (TIRG's):
- split by noun: images of the 49 `TEST_NOUNS` are the test split, the others
  the training split; an image's caption is "<adjective> <noun>" and decides a
  hit; `caption_views` give adjective-only and noun-only recall;
- test queries: every test image x every other adjective seen with its noun in
  the test split, text = the target adjective, target caption
  "<target adjective> <noun>"; the gallery is every test image, and the
  evaluator removes the query's own image from its ranking;
- training queries: a source image, then a target image of the same noun with
  a different adjective, text = the target adjective; consecutive queries
  share their source and have different target adjectives where the noun has
  more than two. (TIRG also lets a target keep the source's adjective, an
  identity modification; here a target always changes the adjective.)
  Nouns with a single adjective give no queries.
- train-split recall (the Ms of WHM): as for every image-file dataset
  (`irtf_jax.data.image_split`), 10,000 (or the number of training images if
  fewer) training queries drawn with a fixed seed; the gallery is their
  target images, one column per query in query order (repeats included, as
  in TIRG). The query images are not in that gallery as such, so nothing is
  excluded from their ranking (`exclude_columns` is -1), as in TIRG; a source
  image that happens to be another query's target stays rankable.

Option `complete_text=True` (ComposeAE's): the text is the whole target caption
("<target adjective> <noun>") instead of the adjective alone. It names the
noun, so it is an easier protocol; do not compare its numbers with TIRG's.

Prepared once into `data_dir` as TFDS array_record files (see
`irtf_jax.data.image_files` for how images are stored and read, and
`irtf_jax.data.image_split` for the options and what the split shares with
Fashion200k's).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from irtf_jax.data import image_files
from irtf_jax.data import image_split
from irtf_jax.data.base import Query

NAME = "mit_states"

# TIRG's 49 test nouns (google/tirg datasets.py, MITStates).
TEST_NOUNS = frozenset((
    "armor",
    "bracelet",
    "bush",
    "camera",
    "candy",
    "castle",
    "ceramic",
    "cheese",
    "clock",
    "clothes",
    "coffee",
    "fan",
    "fig",
    "fish",
    "foam",
    "forest",
    "fruit",
    "furniture",
    "garden",
    "gate",
    "glass",
    "horse",
    "island",
    "laptop",
    "lead",
    "lightning",
    "mirror",
    "orange",
    "paint",
    "persimmon",
    "plastic",
    "plate",
    "potato",
    "road",
    "rubber",
    "sand",
    "shell",
    "sky",
    "smoke",
    "steel",
    "stream",
    "table",
    "tea",
    "tomato",
    "vacuum",
    "wax",
    "wheel",
    "window",
    "wool",
))

# TIRG skips folders whose adjective is this placeholder ("adj <noun>").
PLACEHOLDER_ADJECTIVE = "adj"

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download MIT-States (release_dataset.zip) from
http://web.mit.edu/phillipi/Public/states_and_transformations/index.html
and unzip it so that manual_dir holds `images/<adjective> <noun>/*.jpg`,
e.g. manual_dir/images/ancient building/image_1.jpg."""


def adjective(caption: str) -> str:
  """The adjective of an "<adjective> <noun>" caption."""
  return caption.split()[0]


def noun(caption: str) -> str:
  """The noun of an "<adjective> <noun>" caption."""
  return caption.split()[1]


def list_images(root: str) -> dict[str, list[tuple[str, str]]]:
  """Scans `root/images` into split -> [(relative path, caption)].

  Raises:
    FileNotFoundError with the download instructions if `images/` is missing;
    ValueError for a class folder name that is not "<adjective> <noun>", a
    file that is not a .jpg, or a path that leaves `root`.
  """
  images_dir = os.path.join(root, "images")
  if not os.path.isdir(images_dir):
    raise image_files.missing_error(
        NAME, f"folder {images_dir}", MANUAL_DOWNLOAD_INSTRUCTIONS
    )
  splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
  for folder in sorted(os.listdir(images_dir)):
    if " " not in folder:
      continue
    words = folder.split()
    if len(words) != 2:
      raise ValueError(
          f"{os.path.join(images_dir, folder)}: a class folder "
          "must be named '<adjective> <noun>' (two words); "
          "rename or remove it"
      )
    adj, noun_ = words
    if adj == PLACEHOLDER_ADJECTIVE or not os.path.isdir(
        os.path.join(images_dir, folder)
    ):
      continue
    folder_path = resolve_folder(root, folder)
    split = "test" if noun_ in TEST_NOUNS else "train"
    for file_name in sorted(os.listdir(folder_path)):
      if file_name.startswith("."):
        continue
      relative = os.path.join("images", folder, file_name)
      if not file_name.lower().endswith("jpg"):
        raise ValueError(
            f"{os.path.join(root, relative)}: not a .jpg file; "
            "MIT-States class folders hold only .jpg images "
            "(remove it)"
        )
      image_files.resolve_inside(
          root, relative, where=os.path.join(images_dir, folder)
      )
      splits[split].append((relative, f"{adj} {noun_}"))
  return splits


def resolve_folder(root: str, folder: str) -> str:
  return image_files.resolve_inside(
      root, os.path.join("images", folder), where=os.path.join(root, "images")
  )


class MitStates(image_files.ImageFilesBuilder, skip_registration=True):
  """MIT-States images with captions; metadata holds every split's captions."""

  name = NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _read_entries(self, root: str) -> dict[str, list[tuple[str, str]]]:
    return list_images(root)


class MitStatesSplit(image_split.ImageFileSplit):
  """One split of MIT-States with TIRG's queries; see the module docstring.

  Attributes (beyond `image_split.ImageFileSplit`'s):
    noun_to_adjectives: noun -> its adjectives in this split, in order of
      first appearance.
  """

  caption_views = {"adjective": adjective, "noun": noun}

  @property
  def vocabulary_texts(self) -> Sequence[str]:
    """Every caption of the split (TIRG's `get_all_texts`).

    They hold every adjective and noun, so both the adjective texts and the
    complete-text captions are covered.
    """
    return sorted(self.caption_to_indices)

  def _index_captions(self) -> None:
    self.noun_to_adjectives: dict[str, list[str]] = {}
    for caption in self.caption_to_indices:
      adjs = self.noun_to_adjectives.setdefault(noun(caption), [])
      if adjective(caption) not in adjs:
        adjs.append(adjective(caption))

  def _is_source(self, caption: str) -> bool:
    return len(self.noun_to_adjectives[noun(caption)]) >= 2

  def _text(self, target_caption: str) -> str:
    return target_caption if self.complete_text else adjective(target_caption)

  def _test_queries(self, metadata: Mapping[str, Any]) -> list[Query]:
    del metadata  # the test queries follow from the captions alone
    queries = []
    for i, caption in enumerate(self.captions):
      for target_adj in self.noun_to_adjectives[noun(caption)]:
        if target_adj == adjective(caption):
          continue
        target_caption = f"{target_adj} {noun(caption)}"
        queries.append(
            Query(
                i,
                self._text(target_caption),
                target_caption,
                self.caption_to_indices[target_caption][0],
            )
        )
    return queries

  def _draw_two(
      self, rng: np.random.Generator, source: int
  ) -> tuple[Query, Query]:
    caption = self.captions[source]
    others = [
        a
        for a in self.noun_to_adjectives[noun(caption)]
        if a != adjective(caption)
    ]
    picks = rng.choice(len(others), size=2, replace=len(others) < 2)
    first, second = (f"{others[pick]} {noun(caption)}" for pick in picks)
    return (
        self._query_to(rng, source, self._text(first), first),
        self._query_to(rng, source, self._text(second), second),
    )


# data.load("mit_states", ...) (see `image_split.register_loader`).
load = image_split.register_loader(MitStatesSplit, MitStates)
