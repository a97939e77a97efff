"""The GPU path on CPU: no implicit host transfers in the train loop's steady
state, device prefetching, and bfloat16 compute end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irtf_jax import models
from irtf_jax import parallel as parallel_lib
from irtf_jax import train_step as train_step_lib
from irtf_jax.data import pipeline
from irtf_jax.data.fixtures import random_batch
from tests.helpers import tiny_config

VOCAB_SIZE = 12


def _setup(config):
  parallel = parallel_lib.DataParallel(config.parallel.strategy)
  model = models.build_model(
      config.model,
      VOCAB_SIZE,
      precision=config.precision,
      bn_axis_name=parallel.axis_name,
  )
  tx = train_step_lib.make_optimizer(config)
  example = random_batch(0, config.batch_size, max_length=6)
  state = jax.jit(
      lambda rng: train_step_lib.init_state(model, tx, example, rng)
  )(jax.random.key(0))
  step_fn = parallel.compile_step(
      train_step_lib.make_train_step(
          model, tx, config, axis_name=parallel.axis_name
      )
  )
  return parallel, model, parallel.replicate(jax.device_get(state)), step_fn


@pytest.mark.slow  # adversarial GA steps on 8 devices
def test_steady_state_steps_make_no_implicit_transfers():
  config = tiny_config(
      **{"ga.adversarial.epsilon": 1e-6, "ga.isotropic.gamma": 1e-2}
  )
  parallel, _, state, step_fn = _setup(config)
  make_batch = lambda step: random_batch(step, config.batch_size)
  rng = jax.random.key(config.seed)
  losses = []
  batches = pipeline.prefetched_batches(
      make_batch, range(4), put=parallel.shard_batch
  )
  for step, batch in batches:
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch))
    if step == 0:  # compiles; may transfer constants
      state, metrics = step_fn(state, parallel.shard_batch(batch), rng)
    else:
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, parallel.shard_batch(batch), rng)
    losses.append(metrics["loss"])
  assert np.all(np.isfinite(jax.device_get(losses)))


def test_an_implicit_transfer_is_caught_by_the_guard():
  """The guard above can fail: a host numpy batch is an implicit transfer."""
  config = tiny_config()
  parallel, _, state, step_fn = _setup(config)
  rng = jax.random.key(0)
  batch = random_batch(0, config.batch_size)
  state, _ = step_fn(state, parallel.shard_batch(batch), rng)
  try:
    with jax.transfer_guard("disallow"):
      step_fn(state, batch, rng)
  except Exception as e:  # pylint: disable=broad-except
    assert "transfer" in str(e).lower()
  else:
    raise AssertionError("a host batch passed the transfer guard")


def test_shard_batch_passes_placed_arrays_through():
  parallel = parallel_lib.DataParallel("jit")
  placed = parallel.shard_batch(random_batch(0, 8))
  again = parallel.shard_batch(placed)
  for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(again)):
    assert a is b


@pytest.mark.slow  # bfloat16 steps, emulated on CPU
def test_bfloat16_step_is_finite_and_features_are_float32():
  config = tiny_config(precision="bfloat16")
  parallel, model, state, step_fn = _setup(config)
  batch = parallel.shard_batch(
      random_batch(1, config.batch_size, image_size=16)
  )
  state, metrics = step_fn(state, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  host = jax.device_get(state)
  query, target = model.apply(
      {"params": host.params, "batch_stats": host.batch_stats},
      models.normalize_images(batch["query_image"]),
      batch["tokens"],
      batch["lengths"],
      models.normalize_images(batch["target_image"]),
      train=False,
  )
  assert query.dtype == jnp.float32 and target.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(query)))
