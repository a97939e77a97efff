"""data.pipeline: batches are host_batch's whatever builds them, and
everything the prefetcher starts stops with it."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time

import numpy as np
import pytest

from irtf_jax.config_base import base_config
from irtf_jax.data import base
from irtf_jax.data import pipeline
from irtf_jax.models.text_encoders import Vocabulary
from tests.helpers import tiny_config


class ColourSplit(base.Split):
  """A picklable in-memory split: image i is filled with value i."""

  name, split = "colours", "train"

  def __init__(self, size: int = 20):
    self.captions = [f"colour {i}" for i in range(size)]

  def images(self, indices):
    indices = np.asarray(indices)
    return np.broadcast_to(
        indices[:, None, None, None].astype(np.uint8), (len(indices), 4, 4, 3)
    ).copy()

  def sample_training_queries(self, seed, step, batch_size):
    rng = base.step_rng(seed, step)
    sources = rng.integers(0, len(self.captions), batch_size)
    targets = rng.integers(0, len(self.captions), batch_size)
    return [
        base.Query(
            int(s), f"make it {t}", self.captions[t], target_index=int(t)
        )
        for s, t in zip(sources, targets)
    ]


def _assert_same(got, steps, make_batch):
  assert [s for s, _ in got] == list(steps)
  for step, batch in got:
    expected = make_batch(step)
    assert sorted(batch) == sorted(expected)
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)


def _host_batch(num_processes=1, process_index=0):
  split = ColourSplit()
  vocab = Vocabulary.build(f"make it {i}" for i in range(20))
  config = tiny_config()
  return pipeline.HostBatch(
      split,
      vocab,
      seed=config.seed,
      batch_size=config.batch_size,
      max_length=config.model.text_encoder.max_length,
      num_processes=num_processes,
      process_index=process_index,
  )


def test_in_process_pipeline_equals_host_batch():
  steps = range(3, 6)
  make_batch = _host_batch(2, 1)
  got = list(pipeline.training_batches(make_batch, steps, 0))
  _assert_same(got, steps, make_batch)
  # The process's half differs from the other process's half.
  other = _host_batch(2, 0)(3)
  assert not np.array_equal(other["query_image"], got[0][1]["query_image"])


def test_prefetch_with_worker_processes_equals_host_batch():
  steps = range(2, 8)
  make_batch = _host_batch(2, 1)
  got = list(pipeline.prefetched_batches(make_batch, steps, workers=2))
  _assert_same(got, steps, make_batch)
  expected = pipeline.host_batch(
      make_batch.split,
      make_batch.tokenizer,
      seed=make_batch.seed,
      step=2,
      batch_size=make_batch.batch_size,
      max_length=make_batch.max_length,
      num_processes=2,
      process_index=1,
  )
  np.testing.assert_array_equal(got[0][1]["tokens"], expected["tokens"])


def _producer_threads():
  return [t for t in threading.enumerate() if t.name == "irtf_jax-prefetch"]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_the_loop_stops_producer_and_workers(workers):
  """The consumer fails after one batch while the producer is blocked on a
  full queue (and, with workers, grain's processes are running)."""
  assert not _producer_threads() and not multiprocessing.active_children()
  with pytest.raises(RuntimeError, match="failed step"):
    with contextlib.closing(
        pipeline.prefetched_batches(
            _host_batch(), range(10_000), depth=1, workers=workers
        )
    ) as batches:
      for _ in batches:
        time.sleep(0.5)  # the producer fills the queue and blocks on it
        raise RuntimeError("failed step")
  # Closing joined the thread and ended grain's worker processes.
  assert not _producer_threads()
  deadline = time.monotonic() + 10
  while multiprocessing.active_children() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not multiprocessing.active_children()


def test_a_producer_error_reaches_the_consumer():
  def broken(step):
    if step == 2:
      raise OSError("unreadable image 2.jpg")
    return {"x": np.zeros(1)}

  got = []
  with pytest.raises(OSError, match="unreadable image 2.jpg"):
    for step, _ in pipeline.prefetched_batches(broken, range(5)):
      got.append(step)
  assert got == [0, 1] and not _producer_threads()


def test_unpicklable_batch_function_names_the_config_field():
  with pytest.raises(TypeError, match="config.data.workers"):
    list(pipeline.prefetched_batches(lambda step: {}, range(2), workers=1))


def test_negative_workers_name_the_config_field():
  with pytest.raises(ValueError, match="config.data.workers"):
    next(pipeline.training_batches(lambda s: {}, range(2), -1))
  with pytest.raises(ValueError, match="config.data.workers: -2 must be >= -1"):
    pipeline.resolve_workers(-2)


@pytest.mark.parametrize(
    "backend, cpus, expected",
    [
        ("cpu", 96, 0),  # XLA:CPU's step already has every core
        ("gpu", 16, pipeline.MAX_AUTO_WORKERS),
        ("tpu", 240, pipeline.MAX_AUTO_WORKERS),
        ("gpu", 4, 3),  # one core left to the trainer's thread
        ("gpu", 1, 0),
    ],
)
def test_auto_workers_leave_the_cpu_step_alone_and_feed_accelerators(
    backend, cpus, expected
):
  assert pipeline.resolve_workers(-1, backend, cpus) == expected
  # A count the user set is kept whatever the host.
  assert pipeline.resolve_workers(3, backend, cpus) == 3
  assert pipeline.resolve_workers(0, backend, cpus) == 0


def test_default_config_resolves_to_no_workers_on_this_cpu_backend():
  assert base_config().data.workers == -1
  assert pipeline.resolve_workers(base_config().data.workers) == 0


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_mapped_ahead_yields_in_order_and_at_most_threads_plus_one_ahead(
    threads,
):
  started = []
  lock = threading.Lock()
  rng = np.random.default_rng(threads)
  delays = rng.uniform(0, 0.002, size=12)  # items finish out of order

  def square(i):
    with lock:
      started.append(i)
    time.sleep(delays[i])
    return i * i

  results = []
  for j, value in enumerate(pipeline.mapped_ahead(square, range(12), threads)):
    with lock:
      assert len(started) <= j + threads + 1
    results.append(value)
    time.sleep(0.005)  # a slow consumer: an unbounded producer runs ahead
  assert results == [i * i for i in range(12)]
  assert sorted(started) == list(range(12))


def test_mapped_ahead_raises_at_the_failing_item_and_close_stops_the_rest():
  def fail_on_three(i):
    if i == 3:
      raise ValueError("item 3 is unreadable")
    return i

  got = []
  with pytest.raises(ValueError, match="item 3 is unreadable"):
    for value in pipeline.mapped_ahead(fail_on_three, range(10), 2):
      got.append(value)
  assert got == [0, 1, 2]

  started = []

  def slow(i):
    started.append(i)
    time.sleep(0.02)
    return i

  items = pipeline.mapped_ahead(slow, range(100), 2)
  assert next(items) == 0
  items.close()
  assert len(started) <= 3  # the consumed item and the 2 submitted after it
  assert not [
      t for t in threading.enumerate() if t.name.startswith("irtf_jax-map")
  ]
