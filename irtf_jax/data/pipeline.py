"""Training batches: what one step's batch is, and getting it there in time.

`host_batch` is this process's slice of training batch `step`, a pure
function of (seed, step): a resumed run sees exactly the batches an
uninterrupted one does. `prefetched_batches` builds batches ahead of the
train step in a background thread (optionally also placing them on the
devices), or in grain worker processes (`config.data.workers > 0`: JPEG
decoding for MIT-States and Fashion200k runs beside the step instead of in
its process). With workers, the unit of work is one step's batch: worker k of
W builds steps k, k + W, ... and grain returns them in step order, so the
stream does not depend on the number of workers.

Everything started here stops when the consumer stops: `prefetched_batches`
is a generator whose `close()` (use `contextlib.closing`, or let a `for`
loop finish) signals the producer thread, drains its queue, closes grain's
iterator (ending its worker processes) and joins the thread. A failed
notebook cell leaves no thread or process behind.

`mapped_ahead` runs a function over a sequence in threads, a few items ahead
of the consumer and in order: the evaluation decodes its image batches with
it.

`resolve_workers` turns `config.data.workers = -1` (the default) into a
count for the host: none on a CPU backend, up to 8 beside a GPU or TPU.
"""

from __future__ import annotations

import collections
from concurrent import futures
import dataclasses
import os
import pickle
import queue
import threading
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

# How long the producer waits on a full queue before checking for a stop.
_POLL_SECONDS = 0.1
# How long closing waits for the producer to finish its current batch.
_JOIN_SECONDS = 60.0


class Tokenizer(Protocol):

  def encode(
      self, texts: Sequence[str], max_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    ...


def host_batch(
    split,
    tokenizer: Tokenizer,
    *,
    seed: int,
    step: int,
    batch_size: int,
    max_length: int,
    num_processes: int = 1,
    process_index: int = 0,
) -> dict:
  """This process's slice of the global training batch `step` (numpy).

  Args:
    split: the training split (`data.Split`).
    tokenizer: texts -> (token ids, lengths), e.g. a `Vocabulary`.
    seed, step: what the batch is a pure function of.
    batch_size: the global batch size.
    max_length: token ids per text.
    num_processes, process_index: this process's slice of the global batch.

  Returns:
    {"query_image", "target_image": uint8 (b, H, W, 3), "tokens": int32
    (b, max_length), "lengths": int32 (b,)}, b = batch_size / num_processes.
  """
  queries = split.sample_training_queries(seed, step, batch_size)
  local = batch_size // num_processes
  queries = queries[process_index * local : (process_index + 1) * local]
  tokens, lengths = tokenizer.encode([q.text for q in queries], max_length)
  return {
      "query_image": split.images(
          np.asarray([q.source_index for q in queries])
      ),
      "target_image": split.images(
          np.asarray([q.target_index for q in queries])
      ),
      "tokens": tokens,
      "lengths": lengths,
  }


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """`host_batch` with everything but the step bound: a picklable
  step -> batch function (what worker processes need)."""

  split: Any
  tokenizer: Tokenizer
  seed: int
  batch_size: int
  max_length: int
  num_processes: int = 1
  process_index: int = 0

  def __call__(self, step: int) -> dict:
    return host_batch(
        self.split,
        self.tokenizer,
        seed=self.seed,
        step=step,
        batch_size=self.batch_size,
        max_length=self.max_length,
        num_processes=self.num_processes,
        process_index=self.process_index,
    )


@dataclasses.dataclass(frozen=True)
class _StepBatch:
  """step -> (step, batch of that step); picklable."""

  make_batch: Callable[[int], dict]

  def __call__(self, step: int) -> tuple[int, dict]:
    return int(step), self.make_batch(int(step))


# `resolve_workers`: the most workers -1 asks for. One worker decodes and
# resizes ~450 224 px JPEGs a second, so 8 feed ~1,800 queries (a query and
# a target image each) a second; on an H200 the adversarial GA step at 224 px,
# batch 32, takes 28 ms (~1,100 queries a second).
MAX_AUTO_WORKERS = 8


def resolve_workers(
    workers: int, backend: str | None = None, cpus: int | None = None
) -> int:
  """`config.data.workers`, with -1 ("auto") resolved for this host.

  -1 gives 0 on a CPU backend, where XLA:CPU already runs the step on every
  core and a decoding process would take one from it. On a GPU or TPU it
  gives one worker per host core but one (left to the trainer's thread), at
  most `MAX_AUTO_WORKERS`: decoding in the trainer's thread alone feeds an
  accelerator a fraction of the batches it can train on.

  Args:
    workers: the configured count; -1 for auto, else used as is.
    backend: the backend to decide for; `jax.default_backend()` if None.
    cpus: host cores; `os.cpu_count()` if None.

  Raises:
    ValueError: for a count below -1.
  """
  if workers < -1:
    raise ValueError(
        f"config.data.workers: {workers} must be >= -1 (-1: chosen for the "
        "host; 0: batches built in the trainer's own thread)"
    )
  if workers >= 0:
    return workers
  if (backend or jax.default_backend()) == "cpu":
    return 0
  cpus = cpus if cpus is not None else os.cpu_count() or 1
  return max(0, min(MAX_AUTO_WORKERS, cpus - 1))


def picklable_or_raise(make_batch: Callable[[int], dict]):
  """`make_batch`, checked to survive the trip to a worker process."""
  try:
    pickle.dumps(make_batch)
  except Exception as e:
    raise TypeError(
        "config.data.workers > 0 needs a picklable batch function, got "
        f"{make_batch!r} ({e}); pass pipeline.HostBatch(...), or set "
        "config.data.workers=0"
    ) from e
  return make_batch


def training_batches(
    make_batch: Callable[[int], dict],
    steps: range,
    workers: int,
    *,
    prefetch: int = 2,
    put=None,
) -> Iterator[tuple[int, Any]]:
  """(step, batch) for every step of `steps`, built in `workers` processes.

  Args:
    make_batch: picklable function step -> this process's batch (e.g.
      `HostBatch`).
    steps: the steps to produce, in order.
    workers: number of worker processes (0: build in this process).
    prefetch: batches each worker keeps ready.
    put: optional placement of each batch on the devices (e.g.
      `DataParallel.shard_batch`), applied in this process as batches arrive.

  Yields:
    (step, batch) in step order. Closing the generator ends the workers.
  """
  if workers < 0:
    raise ValueError(
        f"config.data.workers: {workers} must be >= 0 "
        "(0 builds batches in the trainer's own thread; resolve -1 with "
        "`resolve_workers`)"
    )
  if steps.step != 1:
    raise ValueError(f"steps: {steps} must have step 1")
  if not flags.FLAGS.is_parsed():
    # grain reads its absl flags when it starts workers; outside an absl
    # app (tests, notebooks) their defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  dataset = (
      grain.MapDataset.range(steps.start, steps.stop)
      .map(_StepBatch(make_batch))
      .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  )
  if workers:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=prefetch
        )
    )
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


def prefetched_batches(
    make_batch: Callable[[int], dict],
    steps: range,
    *,
    depth: int = 2,
    put=None,
    workers: int = 0,
) -> Iterator[tuple[int, Any]]:
  """(step, batch) for `steps`, built `depth` ahead in a background thread.

  With `put` (e.g. `DataParallel.shard_batch`) the thread also places each
  batch on the devices, so the next batch is copied while the current step
  runs. With `workers` > 0 the thread takes its batches from
  `training_batches` (grain worker processes; `make_batch` must then be
  picklable, e.g. `HostBatch`). An exception in the producer is re-raised
  here. Closing this generator (or an exception in the consuming loop, when
  it is wrapped in `contextlib.closing`) stops the producer, its workers
  and its thread before returning.
  """
  if workers:
    picklable_or_raise(make_batch)
  buffer: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def offer(item) -> bool:
    """Puts `item` unless stopped first; whether it was put."""
    while not stop.is_set():
      try:
        buffer.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    source = (
        training_batches(make_batch, steps, workers, prefetch=depth)
        if workers
        else ((step, make_batch(step)) for step in steps)
    )
    try:
      for step, batch in source:
        if not offer((step, batch if put is None else put(batch))):
          return
      offer((None, None))
    except BaseException as e:  # pylint: disable=broad-exception-caught
      offer((None, e))  # re-raised in the consumer
    finally:
      source.close()

  thread = threading.Thread(
      target=produce, name="irtf_jax-prefetch", daemon=True
  )
  thread.start()
  try:
    while True:
      step, batch = buffer.get()
      if step is None:
        if batch is not None:
          raise batch
        return
      yield step, batch
  finally:
    stop.set()
    deadline = time.monotonic() + _JOIN_SECONDS
    while thread.is_alive() and time.monotonic() < deadline:
      try:  # unblock a producer waiting on a full queue
        buffer.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        pass
      thread.join(timeout=_POLL_SECONDS)
    if thread.is_alive():
      logging.warning(
          "The batch producer is still building a batch after "
          "%.0f s; leaving its (daemon) thread behind.",
          _JOIN_SECONDS,
      )


def mapped_ahead(
    fn: Callable[[Any], Any], items: Sequence[Any], threads: int
) -> Iterator[Any]:
  """`fn(item)` for each of `items`, in order, computed in `threads` threads.

  At most `threads` + 1 items are in flight beyond the one consumed; with 0
  threads each is computed in the consuming thread when asked for. Threads
  pay for work that releases the GIL (Pillow's decoding and resizing, file
  reads). An exception of `fn` is raised where its item would be yielded;
  closing the generator cancels the items not started and waits for those
  running.
  """
  if threads < 0:
    raise ValueError(f"mapped_ahead: threads={threads} must be >= 0")
  if not threads:
    yield from map(fn, items)
    return
  pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="irtf_jax-map")
  try:
    pending: collections.deque = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) > threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
