"""The CSS scene grammar: objects on a 3x3 grid and their modifications.

Scenes. Each object has a grid cell (rows top / middle / bottom x columns
left / center / right, at most one object per cell), a shape (rectangle,
circle, triangle), one of eight colors and a size (small, large). In the CSS
`.npy`'s `objects_img` format an object is `{"shape", "color", "size",
"pos": (y, x)}` with `pos` its centre as fractions of the image height and
width (`GRID_FRACTIONS` per row / column). The exact grid fractions of the
published CSS are not part of its released renderer; 0.2 / 0.5 / 0.8 keep
every object inside the image and apart from its neighbours: cell centres are
0.3 of the image apart and a large object spans 0.25, so objects in different
cells never overlap. Two scenes therefore look the same exactly when they
hold the same objects, and they then share one caption, the canonical
description of the scene (cells in reading order: "top-left small red
rectangle, middle-center large blue circle").

Modifications, in CSS's wording (a referring expression names a random
subset of an object's attributes that picks out exactly that object of the
source scene: "[cell] [size] [color] shape|object"):
  add:    "add small red rectangle to top-center" (an empty cell);
  remove: "remove red object" (the scene keeps at least one object);
  make:   "make middle-left small gray object large" (a new size, color or
          shape for the referred object).

Novel compositions. The (shape, color) pairs of `NOVEL_SHAPE_COLORS` (two
colors per shape, a quarter of all pairs) are held out of training: a
modification "touches" one when the object it adds, removes or changes
(before or after the change) has such a pair (`Modification.is_novel`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import numpy as np

SHAPES = ("rectangle", "circle", "triangle")
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
# Cell names in reading order: "top-left", "top-center", ..., "bottom-right".
POSITIONS = tuple(f"{row}-{column}" for row in ROWS for column in COLUMNS)
# Centre of row / column i as a fraction of the image height / width.
GRID_FRACTIONS = (0.2, 0.5, 0.8)
POSITION_COORDS = {
    f"{row}-{column}": (GRID_FRACTIONS[i], GRID_FRACTIONS[j])
    for i, row in enumerate(ROWS)
    for j, column in enumerate(COLUMNS)
}
# (shape, color) pairs held out of every training query (see module doc).
NOVEL_SHAPE_COLORS = frozenset({
    ("rectangle", "gray"),
    ("rectangle", "brown"),
    ("circle", "red"),
    ("circle", "purple"),
    ("triangle", "blue"),
    ("triangle", "cyan"),
})
_REFERRING_ATTRIBUTES = ("pos", "size", "color", "shape")


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
  """One object of a scene (`position` is a `POSITIONS` name)."""

  position: str
  size: str
  color: str
  shape: str

  def as_css_dict(self) -> dict[str, Any]:
    """The object in the CSS `objects_img` format."""
    return {
        "shape": self.shape,
        "color": self.color,
        "size": self.size,
        "pos": POSITION_COORDS[self.position],
    }

  def describe(self) -> str:
    return f"{self.position} {self.size} {self.color} {self.shape}"

  @property
  def is_novel(self) -> bool:
    """Whether its (shape, color) is one of `NOVEL_SHAPE_COLORS`."""
    return (self.shape, self.color) in NOVEL_SHAPE_COLORS


Scene = tuple  # tuple[SceneObject, ...] in `POSITIONS` order.


def canonical_scene(objects) -> Scene:
  return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


def scene_caption(scene: Scene) -> str:
  """The canonical description of a scene: the label that decides a hit."""
  return ", ".join(o.describe() for o in canonical_scene(scene))


def scene_objects(scene: Scene) -> list[dict[str, Any]]:
  """The scene's objects in the CSS `objects_img` format."""
  return [o.as_css_dict() for o in scene]


def _referring_expression(obj: SceneObject, attributes: Sequence[str]) -> str:
  words = [obj.position] if "pos" in attributes else []
  words += [getattr(obj, a) for a in ("size", "color") if a in attributes]
  words.append(obj.shape if "shape" in attributes else "object")
  return " ".join(words)


def _matching_attributes(obj: SceneObject, other: SceneObject) -> int:
  """Bit i is set where `other` shares `_REFERRING_ATTRIBUTES[i]` with `obj`."""
  return (
      (obj.position == other.position)
      | (obj.size == other.size) << 1
      | (obj.color == other.color) << 2
      | (obj.shape == other.shape) << 3
  )


# Every non-empty subset of `_REFERRING_ATTRIBUTES`, as (attributes, bitmask).
_ATTRIBUTE_SUBSETS = tuple(
    (subset, sum(1 << _REFERRING_ATTRIBUTES.index(a) for a in subset))
    for n in range(1, 5)
    for subset in itertools.combinations(_REFERRING_ATTRIBUTES, n)
)


def _sample_reference(
    rng: np.random.Generator, scene: Scene, obj: SceneObject
) -> str:
  """A referring expression that picks out exactly `obj` in `scene`.

  Drawn uniformly among the attribute subsets that no other object of the
  scene shares entirely (the cell alone always qualifies).
  """
  others = [_matching_attributes(obj, o) for o in scene if o != obj]
  unique = [
      subset
      for subset, bits in _ATTRIBUTE_SUBSETS
      if all(m & bits != bits for m in others)
  ]
  return _referring_expression(obj, unique[rng.integers(len(unique))])


@dataclasses.dataclass(frozen=True)
class Modification:
  """A modification text and the scene it makes of its source scene."""

  text: str
  target: Scene
  changed: tuple  # the objects added, removed or changed (before and after).

  @property
  def is_novel(self) -> bool:
    """Whether it touches a held-out (shape, color) (see module doc)."""
    return any(o.is_novel for o in self.changed)


def sample_modification(
    rng: np.random.Generator, scene: Scene
) -> Modification | None:
  """One random add / remove / make modification of `scene` (None: n/a).

  The kind is uniform over add / remove / make; None where it does not apply
  (add to a full grid, remove the last object).
  """
  kind = ("add", "remove", "make")[rng.integers(3)]
  if kind == "add":
    free = [p for p in POSITIONS if p not in {o.position for o in scene}]
    if not free:
      return None
    new = SceneObject(
        free[rng.integers(len(free))],
        SIZES[rng.integers(len(SIZES))],
        COLORS[rng.integers(len(COLORS))],
        SHAPES[rng.integers(len(SHAPES))],
    )
    return Modification(
        f"add {new.size} {new.color} {new.shape} to {new.position}",
        canonical_scene(scene + (new,)),
        (new,),
    )
  if kind == "remove" and len(scene) < 2:
    return None
  obj = scene[rng.integers(len(scene))]
  reference = _sample_reference(rng, scene, obj)
  rest = tuple(o for o in scene if o != obj)
  if kind == "remove":
    return Modification(f"remove {reference}", rest, (obj,))
  attribute = ("size", "color", "shape")[rng.integers(3)]
  values = [
      v
      for v in {"size": SIZES, "color": COLORS, "shape": SHAPES}[attribute]
      if v != getattr(obj, attribute)
  ]
  value = values[rng.integers(len(values))]
  new = dataclasses.replace(obj, **{attribute: value})
  return Modification(
      f"make {reference} {value}", canonical_scene(rest + (new,)), (obj, new)
  )


def sample_scene(
    rng: np.random.Generator, num_objects: tuple[int, int], allow_novel: bool
) -> Scene:
  """A scene of a uniform count in [min, max] of `num_objects` objects.

  Each object takes a distinct random cell, a random size and a uniform
  (shape, color) pair, among all pairs or, unless `allow_novel`, those not in
  `NOVEL_SHAPE_COLORS`.
  """
  count = int(rng.integers(num_objects[0], num_objects[1] + 1))
  cells = rng.choice(len(POSITIONS), size=count, replace=False)
  combos = [
      (s, c)
      for s in SHAPES
      for c in COLORS
      if allow_novel or (s, c) not in NOVEL_SHAPE_COLORS
  ]
  objects = []
  for cell in cells:
    shape, color = combos[rng.integers(len(combos))]
    objects.append(
        SceneObject(POSITIONS[cell], SIZES[rng.integers(2)], color, shape)
    )
  return canonical_scene(objects)
