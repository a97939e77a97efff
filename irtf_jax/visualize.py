"""Qualitative results: query image and text, the top-k retrieved, hits marked.

The grid is composed with Pillow, cell by cell: a Matplotlib figure of the
same grid (42 axes and `tight_layout`) took 3.4 s per evaluation, more than
the smoke run's whole evaluation; this takes milliseconds.
"""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

HIT = (0, 150, 0)
MISS = (210, 0, 0)
_TEXT = (0, 0, 0)
_TILE = 112  # pixels of one image
_FRAME = 4  # pixels of the hit/miss frame around a retrieved image
_PAD = 6  # pixels between cells
_FONT_SIZE = 11
_LINE = _FONT_SIZE + 3  # pixels per line of text
_LABEL_LINES = 3  # lines of caption under the query and target images
_WRAP = 20  # characters per caption line


def cell_box(row: int, col: int, *, title: str = "") -> tuple[int, int]:
  """The (x, y) of the top-left pixel of the image of cell (row, col)."""
  top = _LINE + _PAD if title else _PAD
  cell_height = _LINE + _TILE + 2 * _FRAME + _LABEL_LINES * _LINE + _PAD
  return (
      _PAD + col * (_TILE + 2 * _FRAME + _PAD) + _FRAME,
      top + row * cell_height + _LINE + _FRAME,
  )


def _tile(image: np.ndarray) -> Image.Image:
  # Nearest neighbour: small training images (32 px) stay sharp pixels.
  return Image.fromarray(np.asarray(image, np.uint8)).resize(
      (_TILE, _TILE), Image.Resampling.NEAREST
  )


def save_retrievals(
    path: str,
    split,
    queries: Sequence,
    neighbours: np.ndarray,
    *,
    top_k: int = 5,
    title: str = "",
) -> None:
  """Writes a PNG grid: one row per query (query image + text, its target
  image if known, then the top-k gallery images; hits framed green, misses red).

  Args:
    path: output PNG path.
    split: the `data.Split` the images come from.
    queries: the queries shown (one row each).
    neighbours: (len(queries), >= top_k) retrieved image indices in rank order.
    top_k: retrieved images per row.
    title: figure title.
  """
  rows, cols = len(queries), top_k + 2
  # Cell (rows, cols) would start just past the last one: its image corner,
  # less its label line and frame, is the canvas's size with the margins.
  right, bottom = cell_box(rows, cols, title=title)
  canvas = Image.new(
      "RGB",
      (right - _FRAME, bottom - _LINE - _FRAME),
      "white",
  )
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=_FONT_SIZE)
  if title:
    draw.text((_PAD, _PAD // 2), title, fill=_TEXT, font=font)

  def put(row, col, index, label, colour=_TEXT, caption="", frame=None):
    x, y = cell_box(row, col, title=title)
    draw.text((x, y - _LINE - _FRAME), label, fill=colour, font=font)
    if frame is not None:
      draw.rectangle(
          (
              x - _FRAME,
              y - _FRAME,
              x + _TILE + _FRAME - 1,
              y + _TILE + _FRAME - 1,
          ),
          fill=frame,
      )
    if index >= 0:
      canvas.paste(_tile(split.image(index)), (x, y))
    lines = textwrap.wrap(caption, _WRAP)[:_LABEL_LINES]
    for i, line in enumerate(lines):
      draw.text(
          (x, y + _TILE + _FRAME + i * _LINE), line, fill=_TEXT, font=font
      )

  for r, query in enumerate(queries):
    put(r, 0, query.source_index, "query", caption=query.text)
    put(r, 1, query.target_index, "target", caption=query.target_caption)
    for c in range(top_k):
      index = int(neighbours[r, c])
      hit = split.captions[index] == query.target_caption
      colour = HIT if hit else MISS
      put(
          r,
          c + 2,
          index,
          f"#{c + 1} {'hit' if hit else 'miss'}",
          colour,
          frame=colour,
      )
  canvas.save(path)
