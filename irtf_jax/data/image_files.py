"""Reading and storing datasets of image files (MIT-States, Fashion200k).

The split and the loader these datasets share (options, gallery, queries,
training sampler) are `irtf_jax.data.image_split`'s; this module reads the
user's dataset folder and prepares it into TFDS records.

Paths: every image path read from a user's file (a label file, a query list, a
folder listing) must stay inside the dataset folder: absolute paths, `..`
escapes and symlinks pointing out are refused with the offending file and line
(`resolve_inside`).

Images: at build time each image is decoded once, converted to RGB, shrunk so
its shorter side is at most `stored_short_side` (default 256, never enlarged)
and stored as JPEG (quality 95). Reading a training batch then decodes a small
JPEG instead of a full-size photograph. At read time a split's
`images(indices)` applies TIRG's test transform (`resize_and_center_crop`),
torchvision's `Resize(S)` + `CenterCrop(S)`: resize the shorter side to S
(bilinear, the longer side to `int(S * long / short)`), then crop the centre
S x S (offsets `round((size - S) / 2)`). Because the stored
copy is already shrunk, a full-size image is resized twice (to 256, then to
S) and JPEG-encoded twice: slightly blurrier than one direct resize of the
original, in exchange for reads several times cheaper. `image_size` above 256
stores larger copies (its own TFDS config), so nothing is ever enlarged.

Bad images: `on_bad_image="error"` (default) stops the build with the image's
path; `"skip"` leaves the image out, logs its path, and is prepared into its
own TFDS config so that a later strict load never reuses a skipped build.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from irtf_jax.data.storage import default_data_dir
from irtf_jax.data.storage import encoded_image_feature
from irtf_jax.data.storage import prepare

ON_BAD_IMAGE = ("error", "skip")
DEFAULT_STORED_SHORT_SIDE = 256
JPEG_QUALITY = 95


class BadImageError(ValueError):
  """An image file that cannot be decoded (unreadable, truncated, missing)."""


def stored_short_side(image_size: int) -> int:
  """Shorter side of the stored copies: 256, or more for larger crops."""
  return max(DEFAULT_STORED_SHORT_SIDE, int(image_size))


def storage_config_name(short_side: int, on_bad_image: str) -> str:
  """TFDS config name: one prepared copy per stored size and bad-image rule."""
  name = f"short{short_side}"
  return name + "_skip_bad" if on_bad_image == "skip" else name


def missing_error(
    dataset: str, what: str, instructions: str
) -> FileNotFoundError:
  """The error for a missing dataset folder or file, with download help."""
  return FileNotFoundError(
      f"{dataset}: missing {what}. Pass the folder that "
      "holds the dataset as manual_dir "
      f"(--config.data.manual_dir=...).\n{instructions}"
  )


def resolve_inside(root: str, relative: str, *, where: str) -> str:
  """`root/relative`, refused unless it stays inside `root`.

  Args:
    root: the dataset folder.
    relative: a path read from a user's file, relative to `root`.
    where: "file:line" of `relative`, for the error message.

  Returns:
    The absolute path, with symlinks resolved.

  Raises:
    ValueError naming `where` for an absolute path, or a path that leaves
    `root` through `..` or a symlink.
  """
  if not relative or os.path.isabs(relative) or relative.startswith("~"):
    raise ValueError(
        f"{where}: image path {relative!r} is not a relative path "
        f"inside the dataset folder {root}; refused"
    )
  real_root = os.path.realpath(root)
  real = os.path.realpath(os.path.join(real_root, relative))
  if os.path.commonpath([real_root, real]) != real_root:
    raise ValueError(
        f"{where}: image path {relative!r} escapes the dataset "
        f"folder {root} (through '..' or a symlink); refused"
    )
  return real


def numbered_lines(path: str) -> Iterator[tuple[str, str]]:
  """The non-blank lines of a UTF-8 text file, each with its "path:line".

  Raises:
    ValueError naming the line that is not UTF-8.
  """
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}:{number}: not UTF-8 text ({e.reason} at "
            f"byte {e.start}); save the file as UTF-8"
        ) from None
      if line.strip():
        yield f"{path}:{number}", line.rstrip("\r\n")


def bad_image_message(path: str, error: Exception, *, skipped: bool) -> str:
  what = (
      f"{path}: unreadable or truncated image ({type(error).__name__}: {error})"
  )
  if skipped:
    return what + "; skipped (on_bad_image='skip')"
  return what + (
      "; stopping (on_bad_image='error'; pass on_bad_image='skip' "
      "to leave bad images out)"
  )


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) with the shorter side `size` (torchvision's `Resize`)."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def read_for_storage(path: str, *, short_side: int) -> bytes:
  """Reads an image file; returns it as JPEG, shorter side at most `short_side`.

  Raises:
    BadImageError naming `path` when the file is not a readable image.
  """
  try:
    with Image.open(path) as img:
      img.load()
      rgb = img.convert("RGB")
  except Exception as e:  # Pillow raises several types for broken files.
    raise BadImageError(bad_image_message(path, e, skipped=False)) from e
  if min(rgb.size) > short_side:
    rgb = rgb.resize(resized_size(*rgb.size, short_side), Image.BILINEAR)
  buffer = io.BytesIO()
  rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def resize_and_center_crop(img: Image.Image, size: int) -> np.ndarray:
  """TIRG's test transform: shorter side to `size`, centre crop, uint8 HxWx3."""
  img = img.convert("RGB").resize(resized_size(*img.size, size), Image.BILINEAR)
  width, height = img.size
  left = int(round((width - size) / 2.0))
  top = int(round((height - size) / 2.0))
  return np.asarray(img.crop((left, top, left + size, top + size)))


def log_skipped(path: str, error: Exception) -> None:
  logging.warning(bad_image_message(path, error, skipped=True))


class StorageConfig(tfds.core.BuilderConfig):
  """A TFDS config per stored image size and bad-image rule."""

  def __init__(
      self,
      *,
      short_side: int = DEFAULT_STORED_SHORT_SIDE,
      on_bad_image: str = "error",
  ):
    super().__init__(
        name=storage_config_name(short_side, on_bad_image),
        description=(
            f"JPEG, shorter side <= {short_side}, bad images: {on_bad_image}"
        ),
    )
    self.short_side = short_side
    self.on_bad_image = on_bad_image

  def __reduce__(self):
    # A split sent to grain worker processes (config.data.workers > 0)
    # carries its TFDS builder, which the worker rebuilds from this config;
    # TFDS accepts only the builder class's own object for a config the class
    # lists, not an equal copy, so unpickling returns that object.
    return (_storage_config, (self.short_side, self.on_bad_image))


def _storage_config(short_side: int, on_bad_image: str) -> StorageConfig:
  """The listed StorageConfig with these settings, or a new one."""
  for config in ImageFilesBuilder.BUILDER_CONFIGS:
    if (config.short_side, config.on_bad_image) == (short_side, on_bad_image):
      return config
  return StorageConfig(short_side=short_side, on_bad_image=on_bad_image)


class ImageFilesBuilder(
    tfds.core.GeneratorBasedBuilder, skip_registration=True
):
  """A TFDS builder of image files with captions (no TensorFlow needed).

  A record holds the stored image ("image", JPEG bytes) and its "path"; the
  builder's metadata holds, per split, the "paths" and "captions" of the
  records in record order (`disable_shuffling`), so a split's captions load
  without reading any image. Subclasses set `name` and
  `MANUAL_DOWNLOAD_INSTRUCTIONS` and implement `_read_entries`.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [StorageConfig()]

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": encoded_image_feature(),
            "path": tfds.features.Tensor(shape=(), dtype=np.object_),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = manual_root(dl_manager, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {
        split: self._generate_examples(root, split, entries)
        for split, entries in self._read_entries(root).items()
    }

  def _read_entries(self, root: str) -> Mapping[str, list[tuple[str, str]]]:
    """Reads the dataset folder `root`: split -> [(relative path, caption)].

    May add dataset-specific entries to `self.info.metadata`.
    """
    raise NotImplementedError

  def _generate_examples(self, root, split, entries):
    return generate_image_examples(self, root, split, entries)


def manual_root(dl_manager, dataset: str, instructions: str) -> str:
  """The user's dataset folder, or a FileNotFoundError with download help."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError as e:  # TFDS's check: absent or empty.
    missing = getattr(dl_manager, "_manual_dir", None) or "manual_dir"
    raise missing_error(
        dataset, f"dataset folder {missing} (absent or empty)", instructions
    ) from e


def generate_image_examples(
    builder, root: str, split: str, entries: Iterable[tuple[str, str]]
):
  """Yields the TFDS examples of `split`; records its metadata as it goes.

  Each entry (relative path, caption) becomes record i = metadata entry i
  (`disable_shuffling` keeps the order), unless its image is bad and the
  builder's config skips bad images. `builder.info.metadata[split]` gets the
  kept entries' "paths" and "captions", written with the prepared data.
  """
  paths, captions = [], []
  builder.info.metadata[split] = {"paths": paths, "captions": captions}
  config = builder.builder_config
  for relative, caption in entries:
    path = os.path.join(root, relative)
    try:
      encoded = read_for_storage(path, short_side=config.short_side)
    except BadImageError as e:
      if config.on_bad_image != "skip":
        raise
      log_skipped(path, e.__cause__)
      continue
    key = len(paths)
    paths.append(relative)
    captions.append(caption)
    yield key, {"image": encoded, "path": relative}


def prepare_with_metadata(
    builder_cls,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    image_size: int,
    on_bad_image: str,
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
  """Prepares `builder_cls` once; returns (split -> data source, metadata)."""
  short_side = stored_short_side(image_size)
  # TFDS wants the class's own object for a config the class lists.
  config = builder_cls.builder_configs.get(
      storage_config_name(short_side, on_bad_image)
  ) or StorageConfig(short_side=short_side, on_bad_image=on_bad_image)
  sources = prepare(
      builder_cls, data_dir=data_dir, manual_dir=manual_dir, config=config
  )
  builder = builder_cls(data_dir=data_dir or default_data_dir(), config=config)
  return sources, builder.info.metadata
