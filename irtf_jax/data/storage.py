"""Prepared-data storage shared by every dataset: TFDS array_record, no TensorFlow.

Each dataset is a `tfds.core.GeneratorBasedBuilder` whose examples hold the
image as encoded bytes (PNG or JPEG: TFDS's `Image` feature needs TensorFlow,
which this project does not depend on) next to its caption and whatever
metadata the dataset's query protocol needs. Builders are prepared once into
`data_dir` with `file_format="array_record"` and read with `as_data_source`
(random access, no TensorFlow).
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from irtf_jax.data.base import Split


# The feature spec for an encoded image; decode with `decode_image`.
def encoded_image_feature():
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 HxWx3 -> PNG bytes (lossless, so a round trip is exact)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def decode_image(encoded: bytes, *, source: str = "") -> np.ndarray:
  """Encoded image bytes -> uint8 HxWx3 RGB.

  Raises:
    ValueError naming `source` when the bytes are not a readable image.
  """
  try:
    with Image.open(io.BytesIO(encoded)) as img:
      return np.asarray(img.convert("RGB"))
  except Exception as e:  # Pillow raises several types for broken files.
    raise ValueError(
        f"{source or 'image'}: unreadable or truncated image "
        f"({type(e).__name__}: {e})"
    ) from e


def default_data_dir() -> str:
  return os.environ.get(
      "IRTF_JAX_DATA_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "irtf_jax", "tfds"),
  )


def prepare(
    builder_cls,
    *,
    data_dir: str | None,
    manual_dir: str | None = None,
    config: Any = None,
) -> Mapping[str, Any]:
  """Builds `builder_cls` into `data_dir` once; returns its data sources.

  Returns:
    split name -> random-access data source (`len`, `[i]`, `__getitems__`).
  """
  kwargs = {"data_dir": data_dir or default_data_dir()}
  if config is not None:
    kwargs["config"] = config
  builder = builder_cls(**kwargs)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
  )
  return builder.as_data_source()


class RecordSplit(Split):
  """A `Split` over a TFDS data source whose examples hold "image" bytes.

  Captions are read once at construction; images are decoded on demand, or
  all at once into memory when `cache_images` (small images, as CSS's).
  """

  def __init__(
      self,
      source,
      *,
      name: str,
      split: str,
      captions: Sequence[str],
      cache_images: bool = False,
  ):
    self.name = name
    self.split = split
    self.captions = list(captions)
    self._source = source
    self._cache = None
    if cache_images:
      self._cache = np.stack([self._decode(i) for i in range(len(source))])

  def _decode(self, index: int) -> np.ndarray:
    return decode_image(
        self._source[int(index)]["image"],
        source=f"{self.name}/{self.split}[{index}]",
    )

  def images(self, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    if self._cache is not None:
      return self._cache[indices]
    return np.stack([self._decode(i) for i in indices])
