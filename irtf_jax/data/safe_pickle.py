"""Reading pickled `.npy` files without letting them run code.

The published CSS file `css_toy_dataset_novel2_small.dup.npy` is `np.save` of
a Python dict: a `.npy` header with dtype `object`, followed by a pickle of a
0-d object array. `np.load(allow_pickle=True)` would import and call whatever
the pickle names, so a crafted file could run arbitrary code. `load_npy_object`
parses the `.npy` header with NumPy's format reader and unpickles the payload
with an unpickler that resolves only the globals this format needs:

  * builtin containers and scalars (dict, list, tuple, set, ...);
  * `numpy.dtype`, `numpy.ndarray` and NumPy's array / scalar reconstructors
    (`numpy.core.multiarray._reconstruct` and `.scalar`, under both their
    NumPy 1 and NumPy 2 module names);
  * `_codecs.encode`, which protocol-2 pickles use to rebuild `bytes`.

Any other global (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) is
refused before it is resolved. Object arrays are rebuilt from lists, never
from raw memory, so an allowed global cannot forge pointers either.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from typing import Any

import numpy as np

# pylint: disable=g-import-not-at-top
try:  # NumPy >= 2.
  from numpy._core import multiarray as _multiarray
except ImportError:  # NumPy 1.x.
  from numpy.core import multiarray as _multiarray
# pylint: enable=g-import-not-at-top


class UnsafePickleError(ValueError):
  """A pickle names a global that the restricted unpickler does not admit."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
  builtin_types = {
      "dict": dict,
      "list": list,
      "tuple": tuple,
      "set": set,
      "frozenset": frozenset,
      "str": str,
      "bytes": bytes,
      "bytearray": bytearray,
      "int": int,
      "float": float,
      "complex": complex,
      "bool": bool,
      "slice": slice,
      "range": range,
  }
  allowed = {}
  # Python 2 pickles (the published CSS file) name the module "__builtin__".
  for module in ("builtins", "__builtin__"):
    for name, value in builtin_types.items():
      allowed[(module, name)] = value
  allowed[("__builtin__", "unicode")] = str
  allowed[("__builtin__", "long")] = int
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    # pylint: disable-next=protected-access
    allowed[(module, "_reconstruct")] = _multiarray._reconstruct
    allowed[(module, "scalar")] = _multiarray.scalar
  allowed[("numpy", "ndarray")] = np.ndarray
  allowed[("numpy", "dtype")] = np.dtype
  allowed[("_codecs", "encode")] = codecs.encode
  return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only builtin containers and NumPy arrays."""

  def __init__(self, file, *, source: str = "pickle", **kwargs):
    super().__init__(file, **kwargs)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self._source}: refused to load: the pickle asks for "
          f"{module}.{name}, which is not a builtin container or NumPy array "
          "type (a crafted or foreign file; use the original file)"
      ) from None


def safe_loads(
    payload: bytes, *, source: str = "pickle", encoding: str = "latin1"
) -> Any:
  """Unpickles `payload` with `RestrictedUnpickler`.

  Args:
    payload: pickle bytes.
    source: name used in error messages (e.g. the file path).
    encoding: how Python 2 `str` objects are decoded; "latin1" keeps NumPy's
      raw array bytes intact, as `np.load` does.

  Raises:
    UnsafePickleError: the pickle names a global outside the allowed set.
    ValueError: the pickle is malformed or truncated.
  """
  try:
    return RestrictedUnpickler(
        io.BytesIO(payload), source=source, encoding=encoding
    ).load()
  except UnsafePickleError:
    raise
  except Exception as e:  # pickle raises many types for broken input.
    raise ValueError(
        f"{source}: not a readable pickle ({type(e).__name__}: {e})"
    ) from e


def load_npy_object(path: str | os.PathLike) -> Any:
  """Loads a `.npy` file safely; a 0-d object array gives its one object.

  `np.save(path, some_dict)` writes a 0-d object array; this returns the dict
  (what `np.load(path, allow_pickle=True).item()` returns, without running
  code). Arrays without objects are read by NumPy with pickles disabled.

  Raises:
    FileNotFoundError: `path` does not exist.
    UnsafePickleError: the file's pickle names a disallowed global.
    ValueError: `path` is not a `.npy` file or its payload is broken.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    try:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f".npy format version {version} is not supported")
    except ValueError as e:
      raise ValueError(f"{path}: not a .npy file ({e})") from e
    if not dtype.hasobject:
      return np.load(path, allow_pickle=False)
    array = safe_loads(f.read(), source=path)
  if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
    raise ValueError(
        f"{path}: the pickled payload is not the array of shape "
        f"{tuple(shape)} that the .npy header announces"
    )
  return array.item() if array.shape == () else array
