"""Datasets for image retrieval with text feedback.

  split = data.load("css_synth", "test", data_dir=...)
  split.captions, split.queries, split.image(i)

Each dataset module registers a loader `fn(split, *, data_dir, manual_dir,
options) -> Split` and the checker of its options with `register`; `load`
resolves the options with that checker and gives the loader the result, and
`check_options` runs the checker alone (no data is prepared or read), so a
bad `config.data.options` fails before a run starts.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from irtf_jax.data.base import Query
from irtf_jax.data.base import Split
from irtf_jax.data.base import step_rng

__all__ = [
    "Query",
    "Split",
    "check_options",
    "load",
    "register",
    "DATASETS",
    "step_rng",
]

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
_CHECKERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {}


def register(
    name: str, *, check_options: Callable[[Mapping[str, Any]], dict[str, Any]]
):
  """Decorator: registers the loader of dataset `name`.

  Args:
    name: the dataset's name (a key of `_MODULES`).
    check_options: options -> resolved options, raising ValueError for a bad
      one; `load` resolves the options with it before calling the loader, so
      that the two never disagree.

  Returns:
    A decorator registering `fn(split, *, data_dir, manual_dir, options)`,
    `options` resolved by `check_options`.
  """

  def wrap(fn):
    _LOADERS[name] = fn
    _CHECKERS[name] = check_options
    return fn

  return wrap


def _import_dataset(name: str) -> None:
  """Imports the module of dataset `name` (which registers it)."""
  if name not in _MODULES:
    raise ValueError(
        f"config.data.name: unknown dataset {name!r}; "
        f"allowed: {', '.join(DATASETS)}"
    )
  if name not in _LOADERS:
    importlib.import_module(_MODULES[name])


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """Checks the loader options of dataset `name`; prepares and reads nothing.

  Args:
    name: one of `DATASETS`.
    options: the options `load` would get (e.g. `config.data.options`).

  Returns:
    Every option of the dataset, resolved: the given values (NumPy scalars
    made Python ones) and the defaults of the others.

  Raises:
    ValueError, one line naming `config.data.name` for an unknown dataset, or
    `config.data.options.<option>` with the bad value and the allowed ones for
    an unknown option, a value of the wrong type or out of range.
  """
  _import_dataset(name)
  return _CHECKERS[name](options)


def load(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    **options,
) -> Split:
  """Loads split "train" or "test" of dataset `name`.

  Args:
    name: one of `DATASETS`.
    split: "train" or "test".
    data_dir: where prepared (array_record) data is kept; TFDS's default when
      None.
    manual_dir: the user's copy of a dataset that cannot be downloaded.
    **options: dataset-specific options (see each dataset module), resolved
      by `check_options` (a bad one raises before anything is prepared).
  """
  _import_dataset(name)
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  options = _CHECKERS[name](options)
  return _LOADERS[name](
      split, data_dir=data_dir, manual_dir=manual_dir, options=options
  )
