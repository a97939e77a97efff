"""Reading pretrained weights from files, with no network and no torch.

Two formats, both giving `{name: np.ndarray}`:

- `.safetensors` (Hugging Face): an 8-byte little-endian header length, a
  JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then
  the raw little-endian tensor bytes. Read with NumPy alone.
- PyTorch `.pth` / `.bin` / `.pt` (torch.save's zip format, the default
  since PyTorch 1.6, which torchvision's published checkpoints use): a zip
  holding `<prefix>/data.pkl`, a pickle of the state dict whose tensors are
  persistent references to the raw storages `<prefix>/data/<key>`. The pickle
  is read with a restricted unpickler that resolves only the handful of
  globals a state dict needs (OrderedDict, the tensor-rebuild functions, the
  storage types); anything else is refused, so a malicious file cannot run
  code. Tensors are rebuilt from storage, offset, shape and strides with NumPy.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
from typing import Mapping
import zipfile

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

_TORCH_STORAGES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file as NumPy arrays (copies)."""
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f"{path}: too short for a .safetensors file")
  (header_size,) = struct.unpack("<Q", raw[:8])
  if header_size > len(raw) - 8:
    raise ValueError(
        f"{path}: header length {header_size} exceeds the file; "
        "not a .safetensors file (or truncated)"
    )
  try:
    header = json.loads(raw[8 : 8 + header_size])
  except ValueError as e:
    raise ValueError(f"{path}: unreadable .safetensors header ({e})") from e
  data = memoryview(raw)[8 + header_size :]
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(
          f"{path}: tensor {name!r} has unsupported dtype "
          f"{info['dtype']}; supported: "
          f"{', '.join(_SAFETENSORS_DTYPES)}"
      )
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if not 0 <= begin <= end <= len(data) or (
        end - begin != int(np.prod(shape)) * dtype.itemsize
    ):
      raise ValueError(
          f"{path}: tensor {name!r}: byte range [{begin}, {end}) "
          f"does not hold shape {shape} of {info['dtype']}"
      )
    tensors[name] = (
        np.frombuffer(data[begin:end], dtype.newbyteorder("<"))
        .reshape(shape)
        .astype(dtype)
    )
  return tensors


class _StorageRef:
  """A storage a pickled tensor points at: its zip entry and element type."""

  def __init__(self, key: str, dtype):
    self.key = key
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Stand-in for torch._utils._rebuild_tensor_v2: (storage, offset, size,
  stride, requires_grad, backward_hooks[, metadata]) -> ndarray."""
  del unused
  flat = storage
  itemsize = flat.dtype.itemsize
  needed = (
      storage_offset
      + 1
      + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
  )
  if any(n == 0 for n in size):
    return np.zeros(size, flat.dtype)
  if needed > flat.size:
    raise ValueError("tensor reaches past the end of its storage")
  return np.lib.stride_tricks.as_strided(
      flat[storage_offset:],
      shape=tuple(size),
      strides=tuple(s * itemsize for s in stride),
  ).copy()


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch.save state dict, resolving only safe globals."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._path = path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in (
        "_rebuild_tensor_v2",
        "_rebuild_tensor",
    ):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGES:
      return _TORCH_STORAGES[name]
    raise pickle.UnpicklingError(
        f"{self._path}: refuses to load global {module}.{name}: only plain "
        "state dicts of tensors are read (save model.state_dict(), not the "
        "model object)"
    )

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel)
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(
          f"{self._path}: unknown persistent id {pid!r}"
      )
    _, dtype, key, _, _ = pid
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}/data/{key}")
      self._storages[key] = np.frombuffer(
          raw, np.dtype(dtype).newbyteorder("<")
      )
    return self._storages[key]


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a torch.save'd state dict (zip format) as NumPy arrays.

  Accepts a plain state dict or one nested under "state_dict" / "model";
  a leading "module." (DataParallel) is dropped from the names.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path}: not a zip-format torch checkpoint (the legacy format is not "
        "read); re-save it with torch.save(state_dict, path) from PyTorch "
        ">= 1.6, or convert it to .safetensors"
    )
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(
          f"{path}: expected one */data.pkl entry, found {len(pickles)}"
      )
    prefix = pickles[0][: -len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if (
        byteorder in archive.namelist()
        and archive.read(byteorder).strip() != b"little"
    ):
      raise ValueError(f"{path}: big-endian checkpoints are not supported")
    with archive.open(pickles[0]) as f:
      state = _StateDictUnpickler(f, archive, prefix, path).load()
  for key in ("state_dict", "model"):
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
      state = state[key]
  if not isinstance(state, Mapping):
    raise ValueError(
        f"{path}: holds a {type(state).__name__}, not a state dict"
    )
  tensors = {}
  for name, value in state.items():
    if isinstance(value, np.ndarray):
      tensors[
          name[len("module.") :] if name.startswith("module.") else name
      ] = value
  return tensors


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """`{name: array}` from a .safetensors file or a torch zip checkpoint."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such weights file; give the path of a "
        ".pth/.pt/.bin state dict or a .safetensors file"
    )
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return read_torch_state_dict(path)


def check_shape(path: str, name: str, array: np.ndarray, shape) -> np.ndarray:
  """`array`, or a ValueError naming the file, the tensor and both shapes."""
  if tuple(array.shape) != tuple(shape):
    raise ValueError(
        f"{path}: tensor {name!r} has shape {tuple(array.shape)}, "
        f"the model expects {tuple(shape)}; does the checkpoint "
        "match the configured architecture?"
    )
  return array


def take(
    path: str, tensors: Mapping[str, np.ndarray], name: str, shape=None
) -> np.ndarray:
  """tensors[name] (float32), or an error naming the file and the tensor."""
  if name not in tensors:
    raise ValueError(
        f"{path}: missing tensor {name!r}; is this the checkpoint "
        "of the configured architecture?"
    )
  array = tensors[name]
  if shape is not None:
    check_shape(path, name, array, shape)
  return np.asarray(array, np.float32)
