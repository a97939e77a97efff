"""Fashion200k (Han et al., ICCV 2017) under TIRG's protocol (Vo et al., CVPR 2019).

  split = data.load("fashion200k", "test", manual_dir="/data/fashion200k")

On disk (`manual_dir`):
- `labels/<category>_{train,test}_detect_all.txt`: one image a line, three
  tab-separated fields: image path (relative to `manual_dir`), detection
  score, caption. Label files are read in sorted order; blank lines are
  ignored; any other line without exactly three fields, with a score that is
  not a number or with an empty caption is an error naming file and line.
- `women/...`: the images.
- `test_queries.txt`: one test query a line, "<source path> <target path>",
  both paths of test images.

Captions are cleaned as TIRG does: whitespace stripped, then "." -> "dotmark",
"?" -> "questionmark", "&" -> "andmark", "*" -> "starmark" (`clean_caption`).

Protocol (TIRG's):
- test queries: the pairs of `test_queries.txt`, text
  "replace <source word> with <target word>" (`replacement_text`: the first
  source word absent from the target caption, and the first target word absent
  from the source caption; where every word is present, the last word, as
  TIRG's loop leaves it); a path listed twice in the label files means its last
  occurrence, as in TIRG. The gallery is every test image, hits by caption,
  and the evaluator removes the query's own image from its ranking.
- training pairs: two captions are a pair when they differ in exactly one
  word: deleting one word from each leaves the same "parent" caption and the
  two are not the same words reordered. (TIRG deletes every occurrence of the
  word as a substring, which also cuts it out of longer words; here exactly one
  word is deleted.) A source is drawn uniformly from the images whose caption
  has a pair, then one of its parents, then a caption of that parent and an
  image with it; consecutive queries share their source and have different
  target captions where the source has more than one. Text as for the test.
- train-split recall (the Ms of WHM): as for every image-file dataset
  (`irtf_jax.data.image_split`): 10,000 training queries drawn with a fixed
  seed, their targets as gallery, nothing excluded, as in TIRG.

Option `complete_text=True` (ComposeAE's): the text is the whole target caption.
It describes the target outright, so it is an easier protocol; do not compare
its numbers with TIRG's.

Prepared once into `data_dir` as TFDS array_record files (see
`irtf_jax.data.image_files` for how images are stored and read, and
`irtf_jax.data.image_split` for the options and what the split shares with
MIT-States').
"""

from __future__ import annotations

import collections
import glob
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from irtf_jax.data import image_files
from irtf_jax.data import image_split
from irtf_jax.data.base import Query

NAME = "fashion200k"
TEST_QUERIES_FILE = "test_queries.txt"
# Words of the training texts that captions need not contain.
TEXT_TEMPLATE_WORDS = "replace with"

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download Fashion200k (https://github.com/xthan/fashion-200k: the image archive
and the detection label files) and unpack it so that manual_dir holds
`labels/<category>_{train,test}_detect_all.txt` and `women/...` (the image
paths in the label files are relative to manual_dir), and put TIRG's
`test_queries.txt` (https://github.com/google/tirg) in manual_dir."""

_CAPTION_REPLACEMENTS = (
    (".", "dotmark"),
    ("?", "questionmark"),
    ("&", "andmark"),
    ("*", "starmark"),
)


def clean_caption(text: str) -> str:
  """TIRG's caption clean-up: strip, then spell out . ? & * as words."""
  text = text.strip()
  for mark, word in _CAPTION_REPLACEMENTS:
    text = text.replace(mark, word)
  return text


def replacement_text(source_caption: str, target_caption: str) -> str:
  """TIRG's modification text, "replace <source word> with <target word>"."""
  source, target = source_caption.split(), target_caption.split()
  source_word = next((w for w in source if w not in target), source[-1])
  target_word = next((w for w in target if w not in source), target[-1])
  return f"replace {source_word} with {target_word}"


def parents(caption: str) -> set[str]:
  """The captions one word shorter than `caption` (one word deleted)."""
  words = caption.split()
  return {" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))}


def word_multiset(caption: str) -> tuple[str, ...]:
  """A caption's words in sorted order: equal for reordered captions."""
  return tuple(sorted(caption.split()))


def read_label_file(root: str, path: str) -> list[tuple[str, str]]:
  """One label file -> [(relative image path, cleaned caption)].

  Raises:
    ValueError naming file and line for a malformed line or a path that
    leaves `root`.
  """
  entries = []
  for where, line in image_files.numbered_lines(path):
    fields = line.split("\t")
    if len(fields) != 3:
      raise ValueError(
          f"{where}: expected 3 tab-separated fields (image "
          f"path, detection score, caption), got {len(fields)}; "
          "fix or remove the line"
      )
    relative, score, caption = fields
    try:
      float(score)
    except ValueError:
      raise ValueError(
          f"{where}: detection score {score!r} is not a "
          "number; fix or remove the line"
      ) from None
    caption = clean_caption(caption)
    if not caption:
      raise ValueError(f"{where}: empty caption; fix or remove the line")
    image_files.resolve_inside(root, relative, where=where)
    entries.append((relative, caption))
  return entries


def read_labels(root: str, split: str) -> list[tuple[str, str]]:
  """All label files of `split`, in sorted order."""
  labels_dir = os.path.join(root, "labels")
  if not os.path.isdir(labels_dir):
    raise image_files.missing_error(
        NAME, f"folder {labels_dir}", MANUAL_DOWNLOAD_INSTRUCTIONS
    )
  pattern = os.path.join(labels_dir, f"*_{split}_detect_all.txt")
  files = sorted(glob.glob(pattern))
  if not files:
    raise image_files.missing_error(
        NAME, f"label files {pattern}", MANUAL_DOWNLOAD_INSTRUCTIONS
    )
  return [entry for path in files for entry in read_label_file(root, path)]


def read_test_queries(root: str, test_paths: set[str]) -> list[list[str]]:
  """`test_queries.txt` -> [[source path, target path]], checked.

  Raises:
    FileNotFoundError (with download help) if the file is missing; ValueError
    naming file and line for a malformed line, a path that leaves `root`, or
    a path that is not a test image.
  """
  path = os.path.join(root, TEST_QUERIES_FILE)
  if not os.path.isfile(path):
    raise image_files.missing_error(
        NAME, f"file {path}", MANUAL_DOWNLOAD_INSTRUCTIONS
    )
  pairs = []
  for where, line in image_files.numbered_lines(path):
    fields = line.split()
    if len(fields) != 2:
      raise ValueError(
          f"{where}: expected '<source path> <target path>', "
          f"got {len(fields)} fields; fix or remove the line"
      )
    for relative in fields:
      image_files.resolve_inside(root, relative, where=where)
      if relative not in test_paths:
        raise ValueError(
            f"{where}: {relative} is not an image of the test "
            "label files (labels/*_test_detect_all.txt)"
        )
    pairs.append(fields)
  return pairs


class Fashion200k(image_files.ImageFilesBuilder, skip_registration=True):
  """Fashion200k images; metadata holds captions, paths and test pairs."""

  name = NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _read_entries(self, root: str) -> dict[str, list[tuple[str, str]]]:
    splits = {split: read_labels(root, split) for split in ("train", "test")}
    self.info.metadata["test_queries"] = read_test_queries(
        root, {relative for relative, _ in splits["test"]}
    )
    return splits


class Fashion200kSplit(image_split.ImageFileSplit):
  """One split of Fashion200k with TIRG's queries; see the module docstring.

  Attributes (beyond `image_split.ImageFileSplit`'s):
    parent_to_children: parent caption -> the captions one word longer.
    caption_to_parents: caption -> its parents that have a child pairing
      with it.
  """

  @property
  def vocabulary_texts(self) -> Sequence[str]:
    """Every caption of the split (TIRG's `get_all_texts`), "replace with"."""
    return sorted(self.caption_to_indices) + [TEXT_TEMPLATE_WORDS]

  def _text(self, source_caption: str, target_caption: str) -> str:
    if self.complete_text:
      return target_caption
    return replacement_text(source_caption, target_caption)

  def _index_captions(self) -> None:
    """TIRG's parent-caption index, with one-word parents.

    Sets `parent_to_children` (parent -> captions one word longer),
    `caption_to_parents` (caption -> its parents that have a child pairing
    with it, i.e. one that is not the caption's own words reordered) and
    `_num_targets_at_least_two`. Pairing is tested through word multisets,
    counted per parent, so a parent with many children costs no more than
    their number.
    """
    self.parent_to_children: dict[str, list[str]] = {}
    for caption in self.caption_to_indices:
      for parent in sorted(parents(caption)):
        self.parent_to_children.setdefault(parent, []).append(caption)
    multisets = {
        parent: collections.Counter(map(word_multiset, children))
        for parent, children in self.parent_to_children.items()
    }
    self.caption_to_parents: dict[str, list[str]] = {}
    self._num_targets_at_least_two: dict[str, bool] = {}
    for caption in self.caption_to_indices:
      own = word_multiset(caption)
      counts = {
          p: len(self.parent_to_children[p]) - multisets[p][own]
          for p in sorted(parents(caption))
      }
      self.caption_to_parents[caption] = [p for p, n in counts.items() if n]
      # a target reached through several parents is counted once per parent
      total = sum(counts.values())
      self._num_targets_at_least_two[caption] = (
          total > len(counts)
          or len({
              c
              for p in counts
              for c in self.parent_to_children[p]
              if word_multiset(c) != own
          })
          >= 2
      )

  def _is_source(self, caption: str) -> bool:
    return bool(self.caption_to_parents[caption])

  def _test_queries(self, metadata: Mapping[str, Any]) -> list[Query]:
    """The pairs of `test_queries.txt` (`metadata["test_queries"]`)."""
    path_to_index = {path: i for i, path in enumerate(self.paths)}  # last wins
    queries, dropped = [], 0
    for source_path, target_path in metadata["test_queries"]:
      if source_path not in path_to_index or target_path not in path_to_index:
        dropped += 1  # only after on_bad_image="skip" left an image out
        continue
      source = path_to_index[source_path]
      target = path_to_index[target_path]
      target_caption = self.captions[target]
      queries.append(
          Query(
              source,
              self._text(self.captions[source], target_caption),
              target_caption,
              target,
          )
      )
    if dropped:
      logging.warning(
          "%s: %d test queries dropped: their images were skipped "
          "as bad (on_bad_image='skip')",
          NAME,
          dropped,
      )
    return queries

  def _draw_target(self, rng: np.random.Generator, caption: str) -> str:
    """A parent of `caption`, then a child of it that pairs with `caption`."""
    parents_ = self.caption_to_parents[caption]
    children = self.parent_to_children[parents_[rng.integers(len(parents_))]]
    own = word_multiset(caption)
    while True:  # the parent has a pairing child: rejection ends
      target = children[rng.integers(len(children))]
      if word_multiset(target) != own:
        return target

  def _draw_two(
      self, rng: np.random.Generator, source: int
  ) -> tuple[Query, Query]:
    caption = self.captions[source]
    first = second = self._draw_target(rng, caption)
    if self._num_targets_at_least_two[caption]:
      while second == first:
        second = self._draw_target(rng, caption)
    return (
        self._query_to(rng, source, self._text(caption, first), first),
        self._query_to(rng, source, self._text(caption, second), second),
    )


# data.load("fashion200k", ...) (see `image_split.register_loader`).
load = image_split.register_loader(Fashion200kSplit, Fashion200k)
