"""CSS's 2D renderer: scenes of simple objects drawn from their attributes.

`render_scene` draws, as CSS's 2D renderer does, a white canvas with each
object filled in its color (CSS's RGB values, `COLOR_RGB`) around its centre
(y, x) = pos * image_size, with half-size s = 4 px (small) or 8 px (large) at
64x64 (scaled by image_size / 64 otherwise), rows and columns truncated with
`int` as CSS does:
  rectangle: rows [int(y-s), int(y+s)), columns [int(x-s), int(x+s));
  circle (CSS draws a diamond): rows y0 in [int(y-s), int(y+s)], columns
    [int(x0), int(2x-x0)) with x0 = x + |y0-y| - s;
  triangle: rows y0 in [int(y-s), int(y+s)), columns [int(min(x0, x1)),
    int(max(x0, x1))) with x0 = x + (y0-y+s)/2, x1 = 2x - x0.
Objects are dicts in the format of the CSS `.npy`'s `objects_img` entries:
`{"shape", "color", "size", "pos": (y, x)}`, pos as fractions of the image.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

from irtf_jax.data.css.scenes import COLORS
from irtf_jax.data.css.scenes import SHAPES
from irtf_jax.data.css.scenes import SIZES

# CSS's 2D renderer colors.
COLOR_RGB = {
    "gray": (87, 87, 87),
    "red": (244, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 205, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
# Half the side of an object, in pixels of a 64x64 image.
HALF_SIZES = {"small": 4.0, "large": 8.0}


@functools.lru_cache(maxsize=4096)
def _shape_cells(
    shape: str, half: float, y: float, x: float, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Row and column indices that `shape` covers (CSS's rules, see module)."""
  spans = []  # (row, first column, end column)
  if shape == "rectangle":
    for row in range(int(y - half), int(y + half)):
      spans.append((row, int(x - half), int(x + half)))
  elif shape == "circle":
    for row in range(int(y - half), int(y + half) + 1):
      x0 = x + (abs(row - y) - half)
      spans.append((row, int(x0), int(2 * x - x0)))
  elif shape == "triangle":
    for row in range(int(y - half), int(y + half)):
      x0 = x + (row - y + half) / 2
      x1 = 2 * x - x0
      spans.append((row, int(min(x0, x1)), int(max(x0, x1))))
  else:
    raise ValueError(f"object shape {shape!r} is not one of {SHAPES}")
  rows, columns = [], []
  for row, start, end in spans:
    if not 0 <= row < image_size:
      continue
    start, end = max(start, 0), min(end, image_size)
    rows.extend([row] * max(end - start, 0))
    columns.extend(range(start, end))
  return np.asarray(rows, np.int64), np.asarray(columns, np.int64)


def render_scene(
    objects: Sequence[Mapping[str, Any]], image_size: int = 64
) -> np.ndarray:
  """Draws a scene the way CSS's 2D renderer does.

  Args:
    objects: dicts with keys shape, color, size and pos = (y, x) fractions of
      the image (the CSS `.npy`'s `objects_img` format); later objects are
      drawn over earlier ones. Parts outside the canvas are clipped.
    image_size: side of the square image in pixels; object sizes scale with
      image_size / 64 (CSS renders 64x64).

  Returns:
    uint8 array (image_size, image_size, 3): a white canvas with the objects.
  """
  image = np.full((image_size, image_size, 3), 255, np.uint8)
  for obj in objects:
    try:
      color = COLOR_RGB[obj["color"]]
      half = HALF_SIZES[obj["size"]] * image_size / 64
    except KeyError as e:
      raise ValueError(
          f"object {dict(obj)!r}: unknown {e}; colors are "
          f"{COLORS}, sizes {SIZES}"
      ) from None
    y = float(obj["pos"][0]) * image_size
    x = float(obj["pos"][1]) * image_size
    rows, columns = _shape_cells(obj["shape"], half, y, x, image_size)
    image[rows, columns] = color
  return image
