"""An independent reading of CSS scenes and texts, for the CSS tests.

Scenes are compared as sets of (cell, size, color, shape) tuples; texts are
parsed here from their words, not with the generator's grammar, so the tests
check the generator against the documented wording.
"""

from __future__ import annotations

import numpy as np

# The documented grid: row / column name -> centre as a fraction of the side.
ROW_FRACTION = {"top": 0.2, "middle": 0.5, "bottom": 0.8}
COLUMN_FRACTION = {"left": 0.2, "center": 0.5, "right": 0.8}
CELLS = tuple(f"{r}-{c}" for r in ROW_FRACTION for c in COLUMN_FRACTION)
CELL_OF_POS = {
    (ROW_FRACTION[r], COLUMN_FRACTION[c]): f"{r}-{c}"
    for r in ROW_FRACTION
    for c in COLUMN_FRACTION
}
SIZE_WORDS = ("small", "large")
COLOR_WORDS = tuple("gray red blue green brown purple cyan yellow".split())
SHAPE_WORDS = ("rectangle", "circle", "triangle")


def objects_as_set(objects) -> frozenset:
  """CSS `objects_img` dicts -> {(cell, size, color, shape)}."""
  return frozenset(
      (CELL_OF_POS[tuple(o["pos"])], o["size"], o["color"], o["shape"])
      for o in objects
  )


def scene_as_set(scene) -> frozenset:
  """A generated scene (objects with attributes) -> {(cell, ...)}."""
  return frozenset((o.position, o.size, o.color, o.shape) for o in scene)


def _parse_reference(words):
  """Reference words -> predicate on (cell, size, color, shape)."""
  *qualifiers, head = words
  wanted = {}
  for word in qualifiers:
    if "-" in word:
      wanted[0] = word
    elif word in SIZE_WORDS:
      wanted[1] = word
    elif word in COLOR_WORDS:
      wanted[2] = word
    else:
      raise AssertionError(f"unexpected word {word!r}")
  if head != "object":
    assert head in SHAPE_WORDS
    wanted[3] = head
  return lambda obj: all(obj[i] == v for i, v in wanted.items())


def apply_text(text: str, objects: frozenset) -> frozenset:
  """The scene a modification text asks for, read from its words.

  Asserts the text is well formed: an add names an empty cell, a reference
  picks out exactly one object, a make changes one attribute.
  """
  words = text.split()
  if words[0] == "add":
    size, color, shape, to, cell = words[1:]
    assert to == "to" and cell not in {o[0] for o in objects}
    return objects | {(cell, size, color, shape)}
  reference = words[1:] if words[0] == "remove" else words[1:-1]
  matches = [o for o in objects if _parse_reference(reference)(o)]
  assert len(matches) == 1, (text, objects)  # Refers to exactly one object.
  (old,) = matches
  if words[0] == "remove":
    return objects - {old}
  assert words[0] == "make"
  value = words[-1]
  slot = 1 if value in SIZE_WORDS else 2 if value in COLOR_WORDS else 3
  assert value in SIZE_WORDS + COLOR_WORDS + SHAPE_WORDS
  assert old[slot] != value
  new = list(old)
  new[slot] = value
  return (objects - {old}) | {tuple(new)}


def novel_pairs_in_text(text: str) -> set[tuple[str, str]]:
  """The (shape, color) pairs a text names ("... red circle ...")."""
  words = text.split()
  return {
      (b, a)
      for a, b in zip(words, words[1:])
      if a in COLOR_WORDS and b in SHAPE_WORDS
  }


def cell_codes(objects_sets) -> np.ndarray:
  """(N, 9, 3) int: per cell (size, color, shape) indices, -1 where empty."""
  codes = np.full((len(objects_sets), len(CELLS), 3), -1, np.int64)
  for i, objects in enumerate(objects_sets):
    for cell, size, color, shape in objects:
      codes[i, CELLS.index(cell)] = (
          SIZE_WORDS.index(size),
          COLOR_WORDS.index(color),
          SHAPE_WORDS.index(shape),
      )
  return codes


def one_edit_apart(codes: np.ndarray, scene: np.ndarray) -> np.ndarray:
  """(N,) bool: which scenes of `codes` are one add / remove / make from
  `scene` (one cell differs: filled on one side only, or one attribute)."""
  differs = (codes != scene).any(-1)
  rows = np.arange(len(codes))
  cell = differs.argmax(-1)
  here, there = codes[rows, cell], scene[cell]
  empty_here, empty_there = here[:, 0] < 0, there[:, 0] < 0
  one_attribute = (here != there).sum(-1) == 1
  return (differs.sum(-1) == 1) & (
      (empty_here != empty_there) | (~empty_here & ~empty_there & one_attribute)
  )
