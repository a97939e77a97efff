"""Datasets for image retrieval with text feedback.

  split = data.load("css_synth", "test", data_dir=...)
  split.captions, split.queries, split.image(i)

Each dataset registers a loader `fn(split, *, data_dir, manual_dir, **options)
-> Split` with `register`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from irtf_jax.data.base import Query, Split, step_rng

__all__ = ["Query", "Split", "load", "register", "DATASETS", "step_rng"]

# name -> module that registers it on import (kept lazy: importing a dataset
# module may import TFDS, which is slow).
_MODULES = {
    "css_synth": "irtf_jax.data.css_synth",
    "css3d": "irtf_jax.data.css3d",
    "mit_states": "irtf_jax.data.mit_states",
    "fashion200k": "irtf_jax.data.fashion200k",
}
DATASETS = tuple(_MODULES)
_LOADERS: dict[str, Callable[..., Split]] = {}


def register(name: str):
  """Decorator: registers `fn(split, *, data_dir, manual_dir, **options)`."""
  def wrap(fn):
    _LOADERS[name] = fn
    return fn
  return wrap


def load(name: str, split: str, *, data_dir: str | None = None,
         manual_dir: str | None = None, **options) -> Split:
  """Loads split "train" or "test" of dataset `name`.

  Args:
    name: one of `DATASETS`.
    split: "train" or "test".
    data_dir: where prepared (array_record) data is kept; TFDS's default when
      None.
    manual_dir: the user's copy of a dataset that cannot be downloaded.
    **options: dataset-specific options (see each dataset module).
  """
  if name not in _MODULES:
    raise ValueError(f"config.data.name: unknown dataset {name!r}; "
                     f"allowed: {', '.join(DATASETS)}")
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if name not in _LOADERS:
    importlib.import_module(_MODULES[name])
  return _LOADERS[name](split, data_dir=data_dir, manual_dir=manual_dir,
                        **options)
