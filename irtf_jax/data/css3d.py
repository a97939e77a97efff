"""`css3d`: the published CSS dataset (Vo et al., CVPR 2019) from `manual_dir`.

Files (TIRG's release):
  manual_dir/css_toy_dataset_novel2_small.dup.npy
  manual_dir/images/css_{split}_{index:06d}.png    (the 3D renders)

The `.npy` is `np.save` of a dict: `data[split]` ("train", "test") holds
  objects_img: per image, a list of objects (dicts with shape, color, size and
    pos = (y, x) fractions of the image);
  labels (optional): per image a scene label; images that look alike share
    it, and the caption (the label that decides a hit) is `str(label)`;
    without labels every image is its own caption `str(index)`;
  mods: a list of dicts with "from" and "to" (equal-length lists of image
    indices) and "to_str" (the modification text).
It is a pickle, read with `safe_pickle.load_npy_object`, which refuses any
global beyond builtin containers and NumPy arrays.

Protocol (TIRG's): test queries are every (from, to) pair of every mod;
training samples a mod and one of its pairs, then a second, different mod of
the same source image (`css.split.CSSSplit`). Train-split queries are the
training mods' pairs.

Options:
  renderer: "png" (default, the 3D renders) or "2d" (CSS's 2D renderer,
    `css.render.render_scene`, drawn from objects_img; the images folder is
    not read);
  skip_unreadable_images: a missing, unreadable or truncated PNG fails the
    build with its path (default); when True it is left out, with every
    (from, to) pair that uses it, and a warning names it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from irtf_jax import data
from irtf_jax.data import options as options_lib
from irtf_jax.data import safe_pickle
from irtf_jax.data import storage
from irtf_jax.data.css import render
from irtf_jax.data.css import split as css_split

NPY_NAME = "css_toy_dataset_novel2_small.dup.npy"
RENDERERS = ("png", "2d")
OPTIONS = {
    "renderer": options_lib.one_of("png", RENDERERS),
    "skip_unreadable_images": options_lib.boolean(False),
}
MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the CSS dataset released with TIRG (Vo et al., "Composing Text and
Image for Image Retrieval - An Empirical Odyssey", CVPR 2019; the download
link is in the README of https://github.com/google/tirg), unpack it and pass
its folder as manual_dir (config.data.manual_dir). It must hold:
  {NPY_NAME}
  images/css_train_000000.png, ..., images/css_test_000000.png, ...
"""


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
  """The options of `load`, checked (see `options.resolve`), defaults filled."""
  return options_lib.resolve("css3d", OPTIONS, options)


def _missing(what: str) -> FileNotFoundError:
  return FileNotFoundError(f"css3d: {what}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def check_manual_dir(
    manual_dir: str | os.PathLike | None, renderer: str
) -> str:
  """Returns the `.npy` path, or raises naming what is missing."""
  if manual_dir is None:
    raise _missing("manual_dir is not set (pass --config.data.manual_dir=...)")
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise _missing(f"manual_dir {manual_dir} does not exist")
  npy_path = os.path.join(manual_dir, NPY_NAME)
  if not os.path.isfile(npy_path):
    raise _missing(f"{npy_path} does not exist")
  images = os.path.join(manual_dir, "images")
  if renderer == "png" and not os.path.isdir(images):
    raise _missing(
        f"the image folder {images} does not exist (or use "
        "renderer='2d', which draws images from objects_img)"
    )
  return npy_path


def image_path(manual_dir: str, split: str, index: int) -> str:
  return os.path.join(manual_dir, "images", f"css_{split}_{index:06d}.png")


def _as_object(obj: Any, where: str) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise ValueError(
        f"{where}: an object must be a dict with keys shape, "
        f"color, size, pos; got {type(obj).__name__}"
    )
  for key in ("shape", "color", "size", "pos"):
    if key not in obj:
      raise ValueError(f"{where}: object lacks key {key!r}")
  try:
    pos = np.asarray(obj["pos"], np.float64).reshape(-1)
  except (TypeError, ValueError):
    pos = np.zeros((0,))
  if pos.shape[0] < 2:
    raise ValueError(f"{where}: pos must hold (y, x), got {obj['pos']!r}")
  return {
      "shape": str(obj["shape"]),
      "color": str(obj["color"]),
      "size": str(obj["size"]),
      "pos": [float(pos[0]), float(pos[1])],
  }


def read_split(npy: dict, split: str, npy_path: str):
  """Validates `npy[split]`; returns (objects, captions, mods)."""
  if not isinstance(npy, dict) or split not in npy:
    found = sorted(npy) if isinstance(npy, dict) else type(npy).__name__
    raise ValueError(
        f"{npy_path}: no {split!r} entry (found {found}); not "
        f"the CSS file?\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  entry = npy[split]
  field = f"{npy_path}: {split}"
  for key in ("objects_img", "mods"):
    if key not in entry:
      raise ValueError(f"{field}: missing {key!r}")
  objects = [
      [
          _as_object(o, f"{field} objects_img[{i}][{j}]")
          for j, o in enumerate(objs)
      ]
      for i, objs in enumerate(entry["objects_img"])
  ]
  count = len(objects)
  if "labels" in entry:
    labels = list(entry["labels"])
    if len(labels) != count:
      raise ValueError(
          f"{field} labels: {len(labels)} labels for {count} "
          "images in objects_img"
      )
    captions = [str(label) for label in labels]
  else:
    captions = [str(i) for i in range(count)]
  mods = []
  for m, mod in enumerate(entry["mods"]):
    where = f"{field} mods[{m}]"
    for key in ("from", "to", "to_str"):
      if key not in mod:
        raise ValueError(f"{where}: missing {key!r}")
    sources, targets = list(mod["from"]), list(mod["to"])
    if len(sources) != len(targets):
      raise ValueError(
          f"{where}: 'from' has {len(sources)} entries but 'to' "
          f"has {len(targets)}; they must pair up"
      )
    for key, indices in (("from", sources), ("to", targets)):
      for index in indices:
        if not (isinstance(index, (int, np.integer)) and 0 <= index < count):
          raise ValueError(
              f"{where} {key!r}: index {index!r} is not an "
              f"image index in [0, {count})"
          )
    mods.append(
        css_split.Mod(
            str(mod["to_str"]),
            tuple(int(f) for f in sources),
            tuple(int(t) for t in targets),
        )
    )
  return objects, captions, mods


def _read_png(path: str, skip: bool) -> bytes | None:
  """The PNG's bytes once decodable; None when skipped."""
  hint = (
      "; pass skip_unreadable_images=True to leave such images (and "
      "their queries) out"
  )
  try:
    with open(path, "rb") as f:
      encoded = f.read()
    storage.decode_image(encoded, source=path)
    return encoded
  except (OSError, ValueError) as e:
    message = (
        f"{path}: missing image" if isinstance(e, FileNotFoundError) else str(e)
    )
    if not skip:
      raise ValueError(message + hint) from e
    logging.warning("css3d: skipping %s (skip_unreadable_images=True)", message)
    return None


def drop_images(keep: np.ndarray, captions, objects, mods):
  """Removes images where `keep` is False, and every pair that uses one."""
  new_index = np.cumsum(keep) - 1
  kept_mods = []
  for mod in mods:
    pairs = [
        (int(new_index[f]), int(new_index[t]))
        for f, t in zip(mod.sources, mod.targets)
        if keep[f] and keep[t]
    ]
    if pairs:
      kept_mods.append(
          css_split.Mod(
              mod.text, tuple(f for f, _ in pairs), tuple(t for _, t in pairs)
          )
      )
  return (
      [c for c, k in zip(captions, keep) if k],
      [o for o, k in zip(objects, keep) if k],
      kept_mods,
  )


class Css3dConfig(tfds.core.BuilderConfig):
  """Renderer and unreadable-image policy of a `css3d` build."""

  def __init__(self, *, renderer: str, skip_unreadable_images: bool):
    name = renderer + ("_skip_unreadable" if skip_unreadable_images else "")
    super().__init__(name=name)
    self.renderer = renderer
    self.skip_unreadable_images = skip_unreadable_images


class Css3d(tfds.core.GeneratorBasedBuilder):
  """The published CSS dataset (scenes of the TIRG paper), from manual_dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      Css3dConfig(renderer="png", skip_unreadable_images=False),
      Css3dConfig(renderer="png", skip_unreadable_images=True),
      Css3dConfig(renderer="2d", skip_unreadable_images=False),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
        description="The CSS dataset (Vo et al., CVPR 2019).",
        features=css_split.css_features(),
        disable_shuffling=True,
        homepage="https://github.com/google/tirg",
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:
      raise _missing(
          f"no usable manual_dir ({str(e).splitlines()[0]})"
      ) from None
    renderer = self.builder_config.renderer
    npy_path = check_manual_dir(manual_dir, renderer)
    npy = safe_pickle.load_npy_object(npy_path)
    return {
        split: self._generate_examples(
            os.fspath(manual_dir), split, *read_split(npy, split, npy_path)
        )
        for split in ("train", "test")
    }

  def _generate_examples(self, manual_dir, split, objects, captions, mods):
    config = self.builder_config
    if config.renderer == "2d":
      images = [storage.encode_png(render.render_scene(o)) for o in objects]
    else:
      images = [
          _read_png(
              image_path(manual_dir, split, i), config.skip_unreadable_images
          )
          for i in range(len(objects))
      ]
      keep = np.asarray([image is not None for image in images], bool)
      if not keep.all():
        captions, objects, mods = drop_images(keep, captions, objects, mods)
        images = [image for image in images if image is not None]
    yield from css_split.css_examples(images, captions, objects, mods)


@data.register("css3d", check_options=check_options)
def load(
    split: str,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    options: Mapping[str, Any],
) -> css_split.CSSSplit:
  """Loads split "train" or "test" of the CSS dataset, preparing it once.

  The prepared data is kept per renderer option in `data_dir`; delete
  `data_dir/css3d` to re-read a changed manual_dir.

  Args:
    split: "train" or "test".
    data_dir: where the prepared array_record files are kept.
    manual_dir: the folder with the `.npy` and `images/` (see
      `MANUAL_DOWNLOAD_INSTRUCTIONS`); needed to prepare, checked when given.
    options: resolved by `check_options`: renderer ("png", the default,
      reads the 3D renders; "2d" draws with CSS's 2D renderer) and
      skip_unreadable_images (False, the default, fails on an unreadable PNG;
      True leaves it out); see the module doc and `OPTIONS`.
  """
  renderer = options["renderer"]
  if manual_dir is not None:
    check_manual_dir(manual_dir, renderer)
  config = Css3dConfig(
      renderer=renderer,
      skip_unreadable_images=(
          options["skip_unreadable_images"] and renderer == "png"
      ),
  )
  sources = storage.prepare(
      Css3d, data_dir=data_dir, manual_dir=manual_dir, config=config.name
  )
  return css_split.read_css_split(
      sources[split],
      name="css3d",
      split=split,
      render_size=64 if renderer == "2d" else None,
  )
