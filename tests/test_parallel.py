"""The data-parallel train step on 8 CPU devices equals the 1-device step."""

import jax
import numpy as np
import pytest

from irtf_jax import models
from irtf_jax import parallel as parallel_lib
from irtf_jax import train_step as train_step_lib
from irtf_jax.data.fixtures import random_batch
from tests.helpers import tiny_config

VOCAB_SIZE = 12


def run_steps(config, strategy, devices, num_steps=1):
  par = parallel_lib.DataParallel(strategy, devices=devices)
  model = models.build_model(
      config.model, VOCAB_SIZE, bn_axis_name=par.axis_name
  )
  tx = train_step_lib.make_optimizer(config)
  batches = [random_batch(s, config.batch_size) for s in range(num_steps)]
  initial = jax.device_get(
      jax.jit(train_step_lib.init_state, static_argnums=(0, 1))(
          model, tx, batches[0], jax.random.key(0)
      )
  )
  state = par.replicate(initial)
  step = par.compile_step(
      train_step_lib.make_train_step(model, tx, config, axis_name=par.axis_name)
  )
  history = []
  for batch in batches:
    state, metrics = step(state, par.shard_batch(batch), jax.random.key(1))
    history.append(jax.device_get(metrics))
  return initial, par.unreplicate(state), history


@pytest.mark.slow
def test_eight_devices_equal_one():
  # With both GA terms on: the step without them is the same program less
  # the penalty and the noise, so a sharding bug in it shows here too.
  assert jax.device_count() == 8
  # Dropout masks are drawn per device under pmap: compare without dropout.
  config = tiny_config(**{"model.text_encoder.dropout": 0.0})
  config.ga.adversarial.epsilon = 1e-2
  # q = 2: the penalty is smooth. With q = 1 its gradient has sign(dL/dx)
  # factors that flip for near-zero input-gradient entries when the
  # reduction order changes, so the comparison would test float noise.
  config.ga.adversarial.q = 2.0
  config.ga.isotropic.gamma = 1e-2
  initial, one_state, one_metrics = run_steps(config, "jit", jax.devices()[:1])
  for strategy in ("jit", "pmap"):
    _, state, metrics = run_steps(config, strategy, jax.devices())
    assert int(state.step) == 1
    for key in one_metrics[0]:
      np.testing.assert_allclose(
          metrics[0][key],
          one_metrics[0][key],
          rtol=1e-4,
          atol=1e-7,
          err_msg=(strategy, key),
      )
    assert one_metrics[0]["adversarial_penalty"] > 0
    assert one_metrics[0]["isotropic_noise_norm"] > 0
    # Parameters after the step: a sharding bug (per-shard BatchNorm
    # statistics or per-shard negatives) changes the update by O(100%); float
    # reordering of the global reductions by well under 1% of it.
    leaves = zip(
        jax.tree_util.tree_leaves_with_path(one_state.params),
        jax.tree.leaves(state.params),
        jax.tree.leaves(initial.params),
    )
    for (path, one), many, start in leaves:
      update = np.max(np.abs(np.asarray(one) - np.asarray(start)))
      error = np.max(np.abs(np.asarray(many) - np.asarray(one)))
      assert error <= 1e-2 * update + 1e-7, (
          strategy,
          jax.tree_util.keystr(path),
          error,
          update,
      )
    for one, many in zip(
        jax.tree.leaves(one_state.batch_stats),
        jax.tree.leaves(state.batch_stats),
    ):
      np.testing.assert_allclose(many, one, rtol=1e-3, atol=1e-5)


def test_pmap_unreplicate_only_transfers():
  # Indexing the device arrays would compile and run a gather per leaf on
  # the devices (see DataParallel.unreplicate); shapes no other test uses
  # make any such computation compile here.
  par = parallel_lib.DataParallel("pmap")
  tree = {
      "w": np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7) / 7,
      "count": np.int16(11),
  }
  replicated = par.replicate(tree)
  jax.block_until_ready(replicated)
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if "compile" in event:
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    host = par.unreplicate(replicated)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiled == []
  assert isinstance(host["w"], np.ndarray)
  np.testing.assert_array_equal(host["w"], tree["w"])
  assert host["count"] == 11 and host["count"].dtype == np.int16


def test_step_compiler_options_per_backend():
  assert parallel_lib.step_compiler_options("cpu") == {
      "xla_cpu_prefer_vector_width": 512
  }
  assert parallel_lib.step_compiler_options("gpu") == {}
  assert parallel_lib.step_compiler_options("tpu") == {}


def test_step_compiler_options_are_dropped_where_xla_lacks_them(monkeypatch):
  assert parallel_lib._cpu_compiler_knows((
      ("xla_cpu_prefer_vector_width", 512),
  ))
  assert not parallel_lib._cpu_compiler_knows((
      ("xla_no_such_option_for_this_test", 1),
  ))
  monkeypatch.setattr(parallel_lib, "_cpu_compiler_knows", lambda _: False)
  assert parallel_lib.step_compiler_options("cpu") == {}


def test_jit_step_is_compiled_with_the_step_options(monkeypatch):
  par = parallel_lib.DataParallel("jit", devices=jax.devices()[:1])

  def step(state, batch, rng):
    del rng
    return {"w": state["w"] * 2 + batch.sum()}, {"loss": batch.sum()}

  state = par.replicate({"w": np.ones(3, np.float32)})
  batch = par.shard_batch(np.arange(4, dtype=np.float32))
  # An option XLA does not know reaches the compiler and fails there...
  monkeypatch.setattr(
      parallel_lib,
      "step_compiler_options",
      lambda backend=None: {"xla_no_such_option_for_this_test": 1},
  )
  with pytest.raises(
      jax.errors.JaxRuntimeError, match="xla_no_such_option_for_this_test"
  ):
    par.compile_step(step)(state, batch, jax.random.key(0))
  monkeypatch.undo()
  # ...and the real ones compile (this jaxlib knows them) and compute the same.
  new_state, metrics = par.compile_step(step)(
      par.replicate({"w": np.ones(3, np.float32)}), batch, jax.random.key(0)
  )
  np.testing.assert_array_equal(new_state["w"], np.full(3, 8.0, np.float32))
  assert float(metrics["loss"]) == 6.0


def test_isotropic_noise_is_the_same_at_every_vector_width():
  # The step's CPU options change how wide its fused loops are vectorized;
  # the noise, elementwise, must not change (on a CPU without AVX-512 both
  # compile 256 bits wide).
  from irtf_jax.regularizers import sampling  # pylint: disable=g-import-not-at-top

  draw = lambda key: sampling.hashed_normal(key, (4099,))
  key = jax.random.key(3)
  wide = jax.jit(
      draw, compiler_options=parallel_lib.step_compiler_options("cpu")
  )(key)
  np.testing.assert_array_equal(wide, jax.jit(draw)(key))
