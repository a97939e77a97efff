"""Data parallelism over every device, one host or many.

Two strategies run the same per-example computation:

- "jit" (default): a 1-D ("data",) mesh over all devices; the batch is sharded
  on its leading axis, the train state replicated; the step is written in the
  global view (BatchNorm statistics and in-batch negatives cover the global
  batch without any collective in user code).
- "pmap": the step runs per device under `jax.pmap(axis_name="data")`; losses
  all-gather targets and BatchNorm averages statistics over the axis, and
  gradients are `lax.pmean`ed, so both strategies compute the same numbers.

Multi-host: call `jax.distributed.initialize()` before anything else (main.py
does when asked); each process then feeds its own slice of the global batch
and `jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = "data"
STRATEGIES = ("jit", "pmap")


def step_compiler_options(backend: str | None = None) -> dict[str, Any]:
  """XLA options the train step is compiled with on `backend`.

  On CPU: fused loops vectorized 512 bits wide where the CPU has AVX-512
  (`xla_cpu_prefer_vector_width`; LLVM prefers 256 bits by default, and
  keeps to the widest vectors a CPU without AVX-512 has). Isotropic GA's
  noise, a hash, a logarithm and a polynomial per parameter fused into the
  optimizer update, is compute-bound and draws twice as many numbers per
  instruction: at 64 px, batch 32, on the 2-core AVX-512 Xeon it cost 14.4%
  of the base step 256 bits wide and 5.7% 512 bits wide (same process, 12
  interleaved rounds), while the base step was unchanged (1.01x; 1.01x at
  224 px, 0.97x for adversarial GA at 64 px) and the noise bitwise the same.
  Elementwise results do not depend on the width; a fused reduction's
  summation order may. Nothing elsewhere ({}), nothing under "pmap", which
  takes no compiler options, and nothing with a jaxlib whose XLA does not
  know the option (a speed-up is not worth a failed compilation).
  """
  if (backend or jax.default_backend()) != "cpu":
    return {}
  options = (("xla_cpu_prefer_vector_width", 512),)
  return dict(options) if _cpu_compiler_knows(options) else {}


@functools.cache
def _cpu_compiler_knows(options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether XLA:CPU compiles a trivial computation with `options`."""
  x = jax.device_put(np.float32(0), jax.local_devices(backend="cpu")[0])
  try:
    jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=dict(options))
  except jax.errors.JaxRuntimeError:
    return False
  return True


class DataParallel:
  """Placement and compilation for one strategy ("jit" or "pmap")."""

  def __init__(self, strategy: str = "jit", devices=None):
    if strategy not in STRATEGIES:
      raise ValueError(
          f"config.parallel.strategy: unknown {strategy!r}; "
          f"allowed: {', '.join(STRATEGIES)}"
      )
    self.strategy = strategy
    self.devices = list(devices if devices is not None else jax.devices())
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def axis_name(self) -> str | None:
    """The mapped axis the per-device code reduces over (pmap only)."""
    return AXIS if self.strategy == "pmap" else None

  def _global_array(self, local: np.ndarray, sharding) -> jax.Array:
    if jax.process_count() == 1:
      return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)

  def _placed(self, x) -> bool:
    return isinstance(x, jax.Array) and x.sharding == self.batch_sharding

  def shard_batch(self, local_batch: Any) -> Any:
    """This process's slice of the batch -> global batch arrays on devices.

    Under "pmap" the leading axis is split into (devices, per-device batch).
    Arrays already placed by an earlier call (a prefetching thread) pass
    through unchanged, so calling it twice costs no transfer.
    """
    if self.strategy == "jit":
      return jax.tree.map(
          lambda x: x
          if self._placed(x)
          else self._global_array(np.asarray(x), self.batch_sharding),
          local_batch,
      )

    def split(x):
      if self._placed(x):
        return x
      x = np.asarray(x)
      x = x.reshape(
          (self.num_devices, x.shape[0] // self.num_devices) + x.shape[1:]
      )
      return self._global_array(x, self.batch_sharding)

    return jax.tree.map(split, local_batch)

  def replicate(self, tree: Any) -> Any:
    """Host or device pytree -> the placement the compiled step expects."""
    if self.strategy == "jit":
      return jax.device_put(tree, self.replicated)
    return jax.tree.map(
        lambda x: jax.device_put(
            jnp.broadcast_to(x, (self.num_devices,) + jnp.shape(x)),
            self.batch_sharding,
        ),
        tree,
    )

  def unreplicate(self, tree: Any) -> Any:
    """The compiled step's state -> one host copy (numpy).

    Transfers only, no device computation: under "pmap" each leaf's first
    local shard is copied to the host and its device axis dropped there.
    Indexing the device array (`x[0]`) dispatched a gather per leaf while the
    step computing `x` still ran; with 8 CPU devices the XLA:CPU client's
    threads then filled with calls waiting for the step's outputs or for
    their device's turn, the step's last devices never started, and the
    others waited at its all-reduce for ever (about 1 run in 10).
    """
    if self.strategy == "pmap":
      first_shards = jax.tree.map(
          lambda x: x.addressable_shards[0].data
          if isinstance(x, jax.Array)
          else x,
          tree,
      )
      return jax.tree.map(lambda x: x[0], jax.device_get(first_shards))
    return jax.device_get(tree)

  def compile_step(self, step: Callable) -> Callable:
    """step(state, batch, rng) -> (state, metrics), compiled and placed.

    The state argument is donated: its buffers are reused for the new state.
    """
    if self.strategy == "jit":
      compiled = jax.jit(
          step,
          in_shardings=(self.replicated, self.batch_sharding, self.replicated),
          out_shardings=(self.replicated, self.replicated),
          donate_argnums=(0,),
          compiler_options=step_compiler_options(self.devices[0].platform),
      )

      def run_jit(state, batch, rng):
        # An explicit copy of the (tiny) key to every device, so the steady
        # state makes no implicit transfer (jax.transfer_guard("disallow")).
        # (One process only: device_put cannot target other processes'
        # devices, and there jit places the key itself.)
        if jax.process_count() == 1 and not (
            isinstance(rng, jax.Array) and rng.sharding == self.replicated
        ):
          rng = jax.device_put(rng, self.replicated)
        return compiled(state, batch, rng)

      return run_jit
    pmapped = jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))

    def run(state, batch, rng):
      rngs = self.replicate(rng)
      new_state, metrics = pmapped(state, batch, rngs)
      return new_state, jax.tree.map(lambda x: x[0], metrics)

    return run
