"""The grain pipeline yields exactly train.host_batch's batches."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from irtf_jax import train
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
    return np.broadcast_to(indices[:, None, None, None].astype(np.uint8),
                           (len(indices), 4, 4, 3)).copy()

  def sample_training_queries(self, seed, step, batch_size):
    rng = base.step_rng(seed, step)
    sources = rng.integers(0, len(self.captions), batch_size)
    targets = rng.integers(0, len(self.captions), batch_size)
    return [base.Query(int(s), f"make it {t}", self.captions[t],
                       target_index=int(t)) for s, t in zip(sources, targets)]


def _assert_same(got, steps, make_batch):
  assert [s for s, _ in got] == list(steps)
  for step, batch in got:
    expected = make_batch(step)
    assert sorted(batch) == sorted(expected)
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)


def _setup():
  split = ColourSplit()
  vocab = Vocabulary.build(f"make it {i}" for i in range(20))
  return split, vocab, tiny_config()


def test_in_process_pipeline_equals_host_batch():
  split, vocab, config = _setup()
  steps = range(3, 6)
  make_batch = functools.partial(train.host_batch, split, vocab, config,
                                 num_processes=2, process_index=1)
  got = list(pipeline.training_batches(make_batch, steps, 0))
  _assert_same(got, steps, make_batch)
  # The process's half differs from the other process's half.
  other = train.host_batch(split, vocab, config, 3, 2, 0)
  assert not np.array_equal(other["query_image"], got[0][1]["query_image"])


def test_trainer_prefetch_with_worker_processes_equals_host_batch():
  split, vocab, config = _setup()
  steps = range(2, 8)
  make_batch = pipeline.HostBatch(split, vocab, config, 2, 1)
  got = list(train.prefetched_batches(make_batch, steps, workers=2))
  _assert_same(got, steps, make_batch)
  np.testing.assert_array_equal(
      got[0][1]["tokens"], train.host_batch(split, vocab, config, 2, 2, 1)[
          "tokens"])


def test_unpicklable_batch_function_names_the_config_field():
  with pytest.raises(TypeError, match="config.data.workers"):
    list(train.prefetched_batches(lambda step: {}, range(2), workers=1))


def test_negative_workers_name_the_config_field():
  with pytest.raises(ValueError, match="config.data.workers"):
    next(pipeline.training_batches(lambda s: {}, range(2), -1))
