"""Two JAX processes on localhost train together and match one process.

Each process runs `jax.distributed.initialize("127.0.0.1:PORT", 2, i)` on
CPU with gloo collectives, feeds its half of every global batch through
`DataParallel.shard_batch` (`jax.make_array_from_process_local_data`), and
trains a few steps of a tiny model; the final parameters must equal those of
a single-process run on the same global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import portpicker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2

# Shared by the workers and the single-process reference.
TRAIN = textwrap.dedent("""
    def train(process_count, process_index):
      import jax
      from irtf_jax import models
      from irtf_jax import parallel as parallel_lib
      from irtf_jax import train_step as train_step_lib
      from tests.helpers import random_batch, tiny_config
      config = tiny_config(**{"ga.isotropic.gamma": 1e-2})
      parallel = parallel_lib.DataParallel("jit")
      model = models.build_model(config.model, 12)
      tx = train_step_lib.make_optimizer(config)
      example = random_batch(0, config.batch_size)
      state = jax.jit(lambda rng: train_step_lib.init_state(
          model, tx, example, rng), out_shardings=parallel.replicated)(
              jax.random.key(0))
      step_fn = parallel.compile_step(
          train_step_lib.make_train_step(model, tx, config))
      local = config.batch_size // process_count
      for step in range(STEPS):
        batch = random_batch(100 + step, config.batch_size)
        mine = {k: v[process_index * local:(process_index + 1) * local]
                for k, v in batch.items()}
        state, _ = step_fn(state, parallel.shard_batch(mine),
                           jax.random.key(1))
      return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                          state.params)
""")

WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, index, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                               process_id=index)
    STEPS = %d
""" % STEPS) + TRAIN + textwrap.dedent("""
    params = train(jax.process_count(), jax.process_index())
    flat = {"/".join(str(k.key) for k in path): v for path, v in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out, **flat)
    jax.distributed.shutdown()
""")


def _single_process_params():
  namespace = {"np": np, "STEPS": STEPS}
  exec(TRAIN, namespace)  # pylint: disable=exec-used
  params = namespace["train"](1, 0)
  return {"/".join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}


def test_two_processes_equal_one(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  workers = [subprocess.Popen(
      [sys.executable, str(script), str(port), str(i),
       str(tmp_path / f"params{i}.npz")], env=env, cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  try:
    outputs = [w.communicate(timeout=600)[0] for w in workers]
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
  for w, out in zip(workers, outputs):
    assert w.returncode == 0, out[-3000:]
  reference = _single_process_params()
  for i in range(2):
    with np.load(tmp_path / f"params{i}.npz") as got:
      assert sorted(got.files) == sorted(reference)
      for name, value in reference.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5,
                                   err_msg=f"process {i}: {name}")
