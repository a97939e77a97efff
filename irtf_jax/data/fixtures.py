"""Small copies of the real datasets in their published on-disk formats.

  manual_dir = fixtures.write_fixture("mit_states", "/tmp/mit")
  split = data.load("mit_states", "test", manual_dir=manual_dir)

A fixture goes through exactly the loader a user's download goes through, so
the smoke variants of `configs/css.py`, `configs/mit.py` and
`configs/fashion200k.py` (`config.data.fixture = True`, see
`irtf_jax.trainer.load_splits`) and the tests exercise the real code path
without the real data. Every fixture is a pure function of its arguments
(same bytes on every call) and takes well under a second to write.

Formats (those of the published releases; see each loader's module doc):
- css3d: `css_toy_dataset_novel2_small.dup.npy` (`np.save` of a dict
  split -> {objects_img, labels, mods}) and `images/css_{split}_{i:06d}.png`;
- mit_states: `images/<adjective> <noun>/*.jpg`, plus TIRG's ignored
  placeholder folders `adj <noun>`;
- fashion200k: `labels/<category>_{train,test}_detect_all.txt` (path, detection
  score, caption; tab-separated), the images at `women/<category>/<kind>/<id>/
  <id>_<k>.jpeg`, and `test_queries.txt` ("<source path> <target path>").

The writers below are also the tests' building blocks: each takes the content
to write (folders, label lines, a CSS dict), and `write_fixture` picks a
content big enough for a smoke run (a training batch of 16 with TIRG's
paired sampling, and an evaluation).
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from irtf_jax.data import css3d
from irtf_jax.data.css import generate
from irtf_jax.data.css import render
from irtf_jax.data.css import scenes

FIXTURE_DATASETS = ("css3d", "mit_states", "fashion200k")

# Column bands of `write_banded_jpeg`: the outer quarters must be cropped away
# by a centre crop of a landscape image; the middle half is red | blue.
GREEN, RED, BLUE = (0, 200, 0), (220, 20, 20), (20, 20, 220)


# ------------------------------------------------------------ image files


def write_jpeg(path: str, color: Sequence[int], size=(24, 16)) -> None:
  """A JPEG of one colour with a darker top-left quarter (so it is not flat).

  Args:
    path: file to write; its folder is created.
    color: RGB of the image.
    size: (width, height) in pixels.
  """
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
  bands[:, quarter : long_side // 2] = RED
  bands[:, long_side // 2 : long_side - quarter] = BLUE
  return bands if width >= height else bands.transpose(1, 0, 2)


def write_banded_jpeg(path: str, width: int, height: int) -> None:
  """`banded_pixels(width, height)` as a JPEG (checks resize and crop)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(banded_pixels(width, height)).save(
      path, format="JPEG", quality=95
  )


def write_truncated_jpeg(path: str) -> None:
  """A JPEG cut in the middle of its data."""
  write_jpeg(path, (90, 90, 90), size=(64, 64))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


# -------------------------------------------------------------- MIT-States


def write_mit_states(
    root: str, folders: Mapping[str, int], *, size=(24, 16)
) -> dict[str, list[str]]:
  """`root/images/<folder>/image_<k>.jpg`, `folders[folder]` images in each.

  Image k of the f-th folder (sorted) has colour (37 f mod 256,
  (11 k + 60) mod 256, 128): one hue per class, a shade per image.

  Args:
    root: the dataset folder (manual_dir).
    folders: folder name ("<adjective> <noun>", or anything else to test
      what the loader ignores) -> number of images.
    size: (width, height) of every image.

  Returns:
    folder -> relative paths of its images.
  """
  written = {}
  for f, (folder, count) in enumerate(sorted(folders.items())):
    written[folder] = []
    for k in range(count):
      relative = os.path.join("images", folder, f"image_{k}.jpg")
      write_jpeg(
          os.path.join(root, relative),
          ((37 * f) % 256, (11 * k + 60) % 256, 128),
          size=size,
      )
      written[folder].append(relative)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  return written


def mit_states_smoke_folders() -> dict[str, int]:
  """Classes of the smoke fixture: folder -> image count.

  Four training nouns and three of TIRG's 49 test nouns (fish, tomato,
  wool), two to four adjectives each and three images per class, plus one
  placeholder folder (`adj apple`) as the release has.
  """
  nouns = {
      "apple": ("ripe", "rotten", "sliced", "peeled"),
      "car": ("old", "new", "broken"),
      "building": ("ancient", "modern", "burnt"),
      "shoe": ("wet", "dry", "worn"),
      "fish": ("raw", "fried", "dried"),
      "tomato": ("ripe", "rotten", "sliced"),
      "wool": ("dyed", "wet"),
  }
  folders = {f"{adj} {noun}": 3 for noun, adjs in nouns.items() for adj in adjs}
  folders["adj apple"] = 1
  return folders


# -------------------------------------------------------------- Fashion200k


def write_fashion200k(
    root: str,
    labels: Mapping[str, Sequence[tuple[str, str]]],
    test_queries: Sequence[tuple[str, str]],
    *,
    size=(24, 16),
) -> None:
  """Label files, images and `test_queries.txt` of Fashion200k under `root`.

  `root/labels/<file>` gets one "path<TAB>score<TAB>caption" line per entry.

  The k-th distinct image written has colour (29 k mod 256, 100, 200).

  Args:
    root: dataset folder.
    labels: label file name -> [(relative image path, raw caption)]; each
      image is written once.
    test_queries: (source path, target path) lines.
    size: (width, height) of every image.
  """
  os.makedirs(os.path.join(root, "labels"), exist_ok=True)
  written = set()
  for name, lines in labels.items():
    with open(os.path.join(root, "labels", name), "w", encoding="utf-8") as f:
      for n, (relative, caption) in enumerate(lines):
        f.write(f"{relative}\t{0.5 + n / 1000:.3f}\t{caption}\n")
        if relative not in written:
          write_jpeg(
              os.path.join(root, relative),
              ((29 * len(written)) % 256, 100, 200),
              size=size,
          )
          written.add(relative)
  with open(os.path.join(root, "test_queries.txt"), "w", encoding="utf-8") as f:
    for source, target in test_queries:
      f.write(f"{source} {target}\n")


# label file category -> image folder under women/.
_FASHION_CATEGORIES = {
    "dress": "women/dresses/casual_and_day_dresses",
    "skirt": "women/skirts/mini",
    "top": "women/tops/blouses",
}
_FASHION_COLORS = ("black", "white", "red", "blue")
_FASHION_MATERIALS = ("lace", "silk", "cotton")


def fashion200k_smoke_content() -> (
    tuple[dict[str, list[tuple[str, str]]], list[tuple[str, str]]]
):
  """Label lines and test queries of the smoke fixture.

  Per category (dress, skirt, top) every caption "<color> <material>
  <category>" (4 x 3) is a training product with two images; the captions
  with an even (color + material) index are also test products (one image
  each). Test queries are every ordered pair of test images of one category
  whose captions differ in exactly one word, the kind of pair TIRG's
  `test_queries.txt` lists.

  Returns:
    (label file name -> [(image path, caption)], [(source, target) paths]).
  """
  labels, test_queries = {}, []
  product_id = 1000
  for category, folder in _FASHION_CATEGORIES.items():
    train, test = [], []
    for (c, color), (m, material) in itertools.product(
        enumerate(_FASHION_COLORS), enumerate(_FASHION_MATERIALS)
    ):
      caption = f"{color} {material} {category}"
      product_id += 1
      train += [
          (f"{folder}/{product_id}/{product_id}_{k}.jpeg", caption)
          for k in range(2)
      ]
      if (c + m) % 2 == 0:
        product_id += 1
        test.append((f"{folder}/{product_id}/{product_id}_0.jpeg", caption))
    labels[f"{category}_train_detect_all.txt"] = train
    labels[f"{category}_test_detect_all.txt"] = test
    for (source, source_caption), (
        target,
        target_caption,
    ) in itertools.permutations(test, 2):
      differing = sum(
          a != b for a, b in zip(source_caption.split(), target_caption.split())
      )
      if differing == 1:
        test_queries.append((source, target))
  return labels, test_queries


# -------------------------------------------------------------------- CSS


def write_css3d(
    root: str,
    css: Mapping[str, Any],
    *,
    with_images: bool = True,
    image_pixels: Callable[[str, int], np.ndarray] | None = None,
    image_size: int = 64,
) -> str:
  """Writes a CSS dict as the published `.npy` plus one PNG per image.

  Args:
    root: the dataset folder (manual_dir); created.
    css: split ("train", "test") -> {"objects_img", "labels" (optional),
      "mods"} as in the published file.
    with_images: write `images/css_{split}_{i:06d}.png` for every image of
      every split's `objects_img`.
    image_pixels: (split, index) -> uint8 HxWx3 of each PNG; by default the
      scene drawn from `objects_img` with CSS's 2D renderer.
    image_size: side of the default drawings.

  Returns:
    `root`, as a string.
  """
  root = os.fspath(root)
  os.makedirs(root, exist_ok=True)
  np.save(os.path.join(root, css3d.NPY_NAME), css, allow_pickle=True)
  if with_images:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for split in ("train", "test"):
      for i, objects in enumerate(css[split]["objects_img"]):
        pixels = (
            image_pixels(split, i)
            if image_pixels
            else render.render_scene(objects, image_size)
        )
        Image.fromarray(pixels).save(css3d.image_path(root, split, i))
  return root


def css3d_smoke_dict(
    num_train_scenes: int = 10,
    num_test_scenes: int = 16,
    mods_per_scene: int = 4,
    tree_depth: int = 2,
    num_duplicates: int = 4,
    seed: int = 0,
) -> dict:
  """A CSS dict of generated scenes (`css.generate.generate_split`).

  Each split has `num_*_scenes` families of chained modifications
  (`mods_per_scene` variants of each of `tree_depth` chained scenes); its
  first `num_duplicates` images are then repeated at the end with their
  labels, as images that look alike share a label in the published file: a
  query aimed at one of them has two correct answers, decided by label.
  """
  css = {}
  for split, count in (("train", num_train_scenes), ("test", num_test_scenes)):
    generated, mods = generate.generate_split(
        seed, split, count, mods_per_scene, tree_depth
    )
    objects = [scenes.scene_objects(s) for s in generated]
    labels = list(range(len(objects)))
    duplicated = range(min(num_duplicates, len(objects)))
    css[split] = {
        "objects_img": objects + [objects[i] for i in duplicated],
        "labels": np.asarray(labels + [labels[i] for i in duplicated]),
        "mods": [
            {
                "from": list(mod.sources),
                "to": list(mod.targets),
                "to_str": mod.text,
            }
            for mod in mods
        ],
    }
  return css


# -------------------------------------------------------------- dispatcher


def write_fixture(name: str, root: str | os.PathLike) -> str:
  """Writes the smoke fixture of dataset `name` under `root`.

  Args:
    name: "css3d", "mit_states" or "fashion200k".
    root: the folder to write into (created); it becomes the manual_dir.

  Returns:
    The manual_dir to pass to `irtf_jax.data.load(name, ...)`.

  Raises:
    ValueError naming config.data.name for a dataset without a fixture.
  """
  root = os.fspath(root)
  if name == "css3d":
    return write_css3d(root, css3d_smoke_dict())
  if name == "mit_states":
    write_mit_states(root, mit_states_smoke_folders(), size=(80, 60))
    return root
  if name == "fashion200k":
    labels, test_queries = fashion200k_smoke_content()
    write_fashion200k(root, labels, test_queries, size=(48, 64))
    return root
  raise ValueError(
      f"config.data.name: no fixture for {name!r} "
      "(config.data.fixture=True); fixtures exist for "
      f"{', '.join(FIXTURE_DATASETS)}; css_synth is generated "
      "and needs none: set config.data.fixture=False"
  )


def random_batch(
    seed: int,
    batch_size: int,
    image_size: int = 32,
    max_length: int = 6,
    vocab_size: int = 12,
    length_range: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
  """A training batch as the trainer feeds the step, with random content.

  uint8 (B, H, W, 3) `query_image` and `target_image`, int32 (B, max_length)
  `tokens` (ids in [2, vocab_size), 0-padded after each length) and int32 (B,)
  `lengths` in `length_range` (inclusive; default [1, max_length]). For
  tests and benchmarks of the step.
  """
  rng = np.random.default_rng(seed)
  shortest, longest = length_range or (1, max_length)
  lengths = rng.integers(shortest, longest + 1, batch_size)
  lengths = lengths.astype(np.int32)
  tokens = rng.integers(2, vocab_size, (batch_size, max_length))
  tokens = tokens.astype(np.int32)
  tokens[np.arange(max_length)[None, :] >= lengths[:, None]] = 0
  shape = (batch_size, image_size, image_size, 3)
  return {
      "query_image": rng.integers(0, 256, shape, dtype=np.uint8),
      "target_image": rng.integers(0, 256, shape, dtype=np.uint8),
      "tokens": tokens,
      "lengths": lengths,
  }
