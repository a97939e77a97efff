"""Writers of small datasets in the exact on-disk formats of MIT-States and Fashion200k."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

# Column bands of `write_banded_jpeg`: the outer quarters must be cropped away
# by a centre crop of a landscape image; the middle half is red | blue.
GREEN, RED, BLUE = (0, 200, 0), (220, 20, 20), (20, 20, 220)


def write_jpeg(path: str, color: Sequence[int], size=(24, 16)) -> None:
  """A small JPEG of one colour with a darker square (so it is not flat)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  width, height = size
  pixels = np.empty((height, width, 3), np.uint8)
  pixels[:] = np.asarray(color, np.uint8)
  pixels[: height // 2, : width // 2] //= 2
  Image.fromarray(pixels).save(path, format="JPEG", quality=95)


def banded_pixels(width: int, height: int) -> np.ndarray:
  """Green outer bands, red and blue middle halves, along the longer side."""
  long_side, short_side = max(width, height), min(width, height)
  bands = np.empty((short_side, long_side, 3), np.uint8)
  quarter = long_side // 4
  bands[:] = GREEN
  bands[:, quarter: long_side // 2] = RED
  bands[:, long_side // 2: long_side - quarter] = BLUE
  return bands if width >= height else bands.transpose(1, 0, 2)


def write_banded_jpeg(path: str, width: int, height: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(banded_pixels(width, height)).save(path, format="JPEG",
                                                      quality=95)


def write_truncated_jpeg(path: str) -> None:
  """A JPEG cut in the middle of its data."""
  write_jpeg(path, (90, 90, 90), size=(64, 64))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def write_mit_states(root: str, folders: Mapping[str, int]) -> dict[str, list[str]]:
  """`root/images/<folder>/<k>.jpg`, `folders[folder]` images in each.

  Returns:
    folder -> relative paths of its images.
  """
  written = {}
  for f, (folder, count) in enumerate(sorted(folders.items())):
    written[folder] = []
    for k in range(count):
      relative = os.path.join("images", folder, f"image_{k}.jpg")
      write_jpeg(os.path.join(root, relative),
                 ((37 * f) % 256, (11 * k + 60) % 256, 128))
      written[folder].append(relative)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  return written


def write_fashion200k(root: str, labels: Mapping[str, Sequence[tuple[str, str]]],
                      test_queries: Sequence[tuple[str, str]]) -> None:
  """`root/labels/<file>` (path, score, caption lines), images, `test_queries.txt`.

  Args:
    root: dataset folder.
    labels: label file name -> [(relative image path, raw caption)]; each
      image is written once.
    test_queries: (source path, target path) lines.
  """
  os.makedirs(os.path.join(root, "labels"), exist_ok=True)
  written = set()
  for name, lines in labels.items():
    with open(os.path.join(root, "labels", name), "w", encoding="utf-8") as f:
      for n, (relative, caption) in enumerate(lines):
        f.write(f"{relative}\t{0.5 + n / 1000:.3f}\t{caption}\n")
        if relative not in written:
          write_jpeg(os.path.join(root, relative),
                     ((29 * len(written)) % 256, 100, 200))
          written.add(relative)
  with open(os.path.join(root, "test_queries.txt"), "w",
            encoding="utf-8") as f:
    for source, target in test_queries:
      f.write(f"{source} {target}\n")
