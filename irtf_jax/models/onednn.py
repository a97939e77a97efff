"""oneDNN's direct convolution kernel gradient on CPU (optional, via XLA's FFI).

XLA:CPU has no direct kernel for a convolution's gradient with respect to
its kernel; `conv.kernel_gradient_im2col` computes it as shifted copies and
a matmul whose left operand is transposed, which XLA:CPU gives to Eigen.
oneDNN, the library PyTorch's CPU convolutions run on, has one. With the
`cpu-onednn` extra installed (the `onednn-cpu-gomp` and
`onednn-devel-cpu-gomp` wheels) and a C++ compiler on the PATH, the first
kernel gradient a CPU train step needs compiles `onednn_kernels.cc` (a
small XLA FFI handler, a few seconds), caches the library under
`$IRTF_JAX_CACHE` (default `~/.cache/irtf_jax`) and registers it; without
them, everything runs as before. Measured on the 2-core CPU (224 px, batch
32): a layer1 kernel gradient 39 against 60 CPU-ms, layer2 33 against 48,
layer3 30 against 44; the base train step 0.91x the time (README).

`IRTF_JAX_ONEDNN` selects: "auto" (default) uses it where it applies,
"0" never, "1" insists (an error naming what is missing instead of the
fallback). It applies to float32 kernel gradients of the stride-1
convolutions on maps of 8 x 8 and more (`conv.conv_lax_dw_im2col`, which
`layers.Conv` picks for them on CPU) on the CPU backend, in a process with
one device: under the "jit" strategy with several devices the batch is
sharded, and XLA would gather it to run a custom call whole on every device.

Each call runs on one thread: XLA calls it from its own thread pool while
other operations run (the train step's query and target passes side by
side), and OpenMP teams started from two XLA threads at once oversubscribe
the cores. Its second derivative (adversarial GA differentiates gradients)
is that of the pure-JAX formulation it replaces.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("onednn_kernels.cc")
_TARGET = "irtf_onednn_conv_backward_weights"
_SYMBOL = "IrtfOnednnConvBackwardWeights"
_RUNTIME = "onednn-cpu-gomp"
_HEADERS = "onednn-devel-cpu-gomp"
_FIX = (
    "install the extra (pip install '.[cpu-onednn]') and a C++ compiler,"
    " or set IRTF_JAX_ONEDNN=0"
)


class OnednnUnavailable(RuntimeError):
  """oneDNN's kernel cannot be built or loaded here; the message says why."""


def mode() -> str:
  """`IRTF_JAX_ONEDNN`: "auto", "0" or "1"."""
  value = os.environ.get("IRTF_JAX_ONEDNN", "auto")
  if value not in ("auto", "0", "1"):
    raise ValueError(
        f"IRTF_JAX_ONEDNN={value!r}: use auto (default), 0 (off) or 1"
        " (required)"
    )
  return value


def _dist_file(distribution: str, suffix: str) -> pathlib.Path:
  """The installed file of `distribution` whose path ends with `suffix`."""
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError as e:
    raise OnednnUnavailable(f"{distribution} is not installed; {_FIX}") from e
  for file in dist.files or ():
    if str(file).endswith(suffix):
      return pathlib.Path(dist.locate_file(file)).resolve()
  raise OnednnUnavailable(f"{distribution} has no {suffix}; {_FIX}")


def _installed(distribution: str) -> bool:
  try:
    importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


def _cache_folder() -> pathlib.Path:
  root = os.environ.get("IRTF_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "irtf_jax"
  )
  return pathlib.Path(root) / "onednn"


def build_library() -> pathlib.Path:
  """Compiles `onednn_kernels.cc` (once per source, jaxlib and oneDNN version)
  and returns the shared library's path.

  Raises:
    OnednnUnavailable: a wheel, the compiler or the build is missing or fails.
  """
  library_dir = _dist_file(_RUNTIME, "libdnnl.so.3").parent
  header = _dist_file(_HEADERS, "oneapi/dnnl/dnnl.hpp")
  include_dir = header.parent.parent.parent
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise OnednnUnavailable(f"no C++ compiler (c++, g++ or $CXX); {_FIX}")
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(
      source
      + jax.__version__.encode()
      + importlib.metadata.version(_RUNTIME).encode()
      + str(library_dir).encode()
  ).hexdigest()[:16]
  output = _cache_folder() / key / "libirtf_onednn.so"
  if output.exists():
    return output
  output.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: processes building at once
  # (test workers) never load a half-written library.
  handle, partial = tempfile.mkstemp(suffix=".so", dir=output.parent)
  os.close(handle)
  command = [
      compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
      str(_SOURCE), "-o", partial,
      f"-I{include_dir}", f"-I{jax.ffi.include_dir()}",
      f"-L{library_dir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{library_dir}",
  ]  # fmt: skip
  try:
    result = subprocess.run(
        command, capture_output=True, text=True, check=False
    )
  except OSError as e:
    os.unlink(partial)
    raise OnednnUnavailable(f"{compiler}: {e}; {_FIX}") from e
  if result.returncode != 0:
    os.unlink(partial)
    raise OnednnUnavailable(
        f"compiling {_SOURCE} failed ({' '.join(command)}):\n"
        f"{result.stderr[-2000:]}"
    )
  os.replace(partial, output)
  return output


@functools.cache
def _registration_error() -> OnednnUnavailable | None:
  """Builds, loads and registers the FFI target, once per process; what
  failed, if anything."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build_library()))
  except (OnednnUnavailable, OSError) as e:
    error = (
        e
        if isinstance(e, OnednnUnavailable)
        else OnednnUnavailable(f"loading the built library failed: {e}; {_FIX}")
    )
    # Without the extra this is the expected state; with it, a surprise.
    log = logging.warning if _installed(_RUNTIME) else logging.info
    log("oneDNN kernel gradients off: %s", error)
    return error
  jax.ffi.register_ffi_target(
      _TARGET, jax.ffi.pycapsule(getattr(library, _SYMBOL)), platform="cpu"
  )
  return None


def available() -> bool:
  """Whether oneDNN's kernel is built and registered (building it the first
  time). Under IRTF_JAX_ONEDNN=1 a failure raises `OnednnUnavailable`; under
  "auto" it is logged once and answered False; under "0" nothing is built.
  """
  if mode() == "0":
    return False
  error = _registration_error()
  if error is not None and mode() == "1":
    raise error
  return error is None


def enabled() -> bool:
  """Whether this process takes float32 kernel gradients from oneDNN: the
  CPU backend, one device (or IRTF_JAX_ONEDNN=1) and `available()`."""
  setting = mode()
  if setting == "0" or jax.default_backend() != "cpu":
    return False
  if jax.device_count() > 1 and setting != "1":
    return False
  return available()


def applies(x: jax.Array, cotangent: jax.Array) -> bool:
  """Whether `conv.conv_lax_dw_im2col` takes this kernel gradient from
  oneDNN (see the module docstring)."""
  float32 = x.dtype == jnp.float32 and cotangent.dtype == jnp.float32
  return float32 and enabled()


def _call(x, cotangent, kernel_size, strides, padding):
  error = _registration_error()
  if error is not None:
    raise error
  (pad_top, _), (pad_left, _) = padding
  out = jax.ShapeDtypeStruct(
      tuple(kernel_size) + (x.shape[-1], cotangent.shape[-1]), jnp.float32
  )
  # Under vmap (nothing vmaps a model here), one call per element.
  return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(
      x,
      cotangent,
      stride_h=np.int64(strides[0]),
      stride_w=np.int64(strides[1]),
      pad_top=np.int64(pad_top),
      pad_left=np.int64(pad_left),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def kernel_gradient(
    x: jax.Array,
    cotangent: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding,
    reference: Callable,
) -> jax.Array:
  """Gradient w.r.t. the kernel of an NHWC/HWIO convolution:

    dw[a, b, c, o] = sum_{n, i, j} xpad[n, s_h i + a, s_w j + b, c] ct[n, i, j, o]

  computed by oneDNN (`available()` must hold). Its derivatives are those
  of `reference(x, cotangent, kernel_size, strides, padding)`, the same
  function in JAX.

  Args:
    x: (N, H, W, C) float32 input of the convolution.
    cotangent: (N, H', W', O) float32 cotangent of its output.
    kernel_size: (kh, kw) (hashable).
    strides: (s_h, s_w) (hashable).
    padding: ((top, bottom), (left, right)) (hashable); H' and W' must be
      the output size they give.
    reference: the pure-JAX kernel gradient, for the derivatives.

  Returns:
    (kh, kw, C, O) float32.
  """
  del reference
  (pt, pb), (pl, pr) = padding
  (kh, kw), (sh, sw) = kernel_size, strides
  n, h, w, _ = x.shape
  expected = (n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1)
  if cotangent.shape[:3] != expected:
    raise ValueError(
        f"onednn.kernel_gradient: cotangent {cotangent.shape} does not fit "
        f"x {x.shape}, a {kh}x{kw} kernel, strides {strides} and padding "
        f"{padding}"
    )
  return _call(x, cotangent, kernel_size, strides, padding)


def _kernel_gradient_fwd(
    x, cotangent, kernel_size, strides, padding, reference
):
  dw = kernel_gradient(x, cotangent, kernel_size, strides, padding, reference)
  return dw, (x, cotangent)


def _kernel_gradient_bwd(
    kernel_size, strides, padding, reference, residuals, dw_bar
):
  x, cotangent = residuals
  _, vjp = jax.vjp(
      lambda x, ct: reference(x, ct, kernel_size, strides, padding),
      x,
      cotangent,
  )
  return vjp(dw_bar)


kernel_gradient.defvjp(_kernel_gradient_fwd, _kernel_gradient_bwd)
