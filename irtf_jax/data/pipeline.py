"""Training batches from worker processes (grain).

`training_batches` yields exactly the batches of `irtf_jax.train.host_batch`
(a pure function of (seed, step)), but builds them in `workers` grain worker
processes, so JPEG decoding and resizing (MIT-States, Fashion200k) run beside
the train step instead of in its process. The unit of work is one step's
batch: worker k of W builds steps k, k + W, ... and grain returns them in step
order, so the stream does not depend on the number of workers. Each JAX
process builds only its own slice of each global batch (`host_batch`'s
`process_index`), the per-process sharding of the data.

Selected by `config.data.workers` (0, the default, keeps the in-thread path:
for in-memory datasets such as css_synth, pickling batches across processes
costs more than building them).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Callable, Iterator

from absl import flags
import grain
import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class StepBatch:
  """step -> (step, this process's batch of that step); picklable."""
  make_batch: Callable[[int], dict]

  def __call__(self, step: int) -> tuple[int, dict]:
    return int(step), self.make_batch(int(step))


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """`train.host_batch` of (split, vocab, config) as a picklable step ->
  batch function (what worker processes need; a Trainer method is not)."""
  split: Any
  vocab: Any
  config: Any
  num_processes: int = 1
  process_index: int = 0

  def __call__(self, step: int) -> dict:
    from irtf_jax import train  # pylint: disable=g-import-not-at-top
    return train.host_batch(self.split, self.vocab, self.config, step,
                            self.num_processes, self.process_index)


def picklable_or_raise(make_batch: Callable[[int], dict]):
  """`make_batch`, checked to survive the trip to a worker process."""
  try:
    pickle.dumps(make_batch)
  except Exception as e:
    raise TypeError(
        f"config.data.workers > 0 needs a picklable batch function, got "
        f"{make_batch!r} ({e}); pass pipeline.HostBatch(split, vocab, "
        f"config, num_processes, process_index), or set "
        f"config.data.workers=0") from e
  return make_batch


def training_batches(make_batch: Callable[[int], dict], steps: range,
                     workers: int, *, prefetch: int = 2, put=None
                     ) -> Iterator[tuple[int, Any]]:
  """(step, batch) for every step of `steps`, built in `workers` processes.

  Args:
    make_batch: picklable function step -> this process's batch (e.g.
      `functools.partial(train.host_batch, split, vocab, config,
      num_processes=..., process_index=...)`).
    steps: the steps to produce, in order.
    workers: number of worker processes (0: build in this process).
    prefetch: batches each worker keeps ready.
    put: optional placement of each batch on the devices (e.g.
      `DataParallel.shard_batch`), applied in this process as batches arrive.

  Yields:
    (step, batch) in step order.
  """
  if workers < 0:
    raise ValueError(f"config.data.workers: {workers} must be >= 0 "
                     "(0 builds batches in the trainer's own thread)")
  if steps.step != 1:
    raise ValueError(f"steps: {steps} must have step 1")
  if not flags.FLAGS.is_parsed():
    # grain reads its absl flags when it starts workers; outside an absl
    # app (tests, notebooks) their defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  dataset = grain.MapDataset.range(steps.start, steps.stop).map(
      StepBatch(make_batch)).to_iter_dataset(
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=prefetch))
  iterator = iter(dataset)
  try:
    for step, batch in iterator:
      # Own copies: grain's shared-memory buffers are freed right away.
      batch = jax.tree.map(np.array, batch)
      yield step, (batch if put is None else put(batch))
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()

