r"""Cost of isotropic GA's noise inside the optimizer update, by sampler.

  python benchmarks/isotropic_noise.py --json-out=F

Times one jitted SGD-with-momentum update (`m <- 0.9 m + g; p <- p - lr m`)
over the parameter tree of the default model (ResNet-18 + LSTM +
TIRG-LastConv, 42M parameters), alone (the baseline) and with
`g <- g + gamma * xi / n` per leaf drawn by:

  hashed_normal     the project's sampler (keyed integer hash + erfinv)
  hashed_lax_erfinv the same bits through `lax.erf_inv`
  threefry_normal   `jax.random.normal`, one key per leaf
  hashed_uniform    the hash's uniform bits alone (the floor of any sampler)

Prints JSON: median ms per update for each, the cost over the baseline,
and, unless --smoke, that cost as a fraction of the base train step (64 px,
batch 32, `benchmarks/train_step.py`'s JAX side) timed in the same process,
and the cost of the whole isotropic GA step over the base step, the two
timed in `--step-rounds` interleaved rounds of `--steps-per-round` steps
(`isotropic_step`).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=wrong-import-position  # benchmarks/cli.py
import report  # pylint: disable=wrong-import-position  # benchmarks/report.py
import train_step as train_step_benchmark  # pylint: disable=wrong-import-position

from irtf_jax import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from irtf_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from irtf_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from irtf_jax import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from irtf_jax.regularizers import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position

GAMMA = 1e-2


def _samplers():
  uniform = sampling.symmetric_uniform
  return {
      "hashed_normal": sampling.hashed_normal,
      "hashed_lax_erfinv": (
          lambda key, shape: jnp.sqrt(2.0)
          * jax.lax.erf_inv(uniform(sampling.hashed_bits(key, shape)))
      ),
      "threefry_normal": lambda key, shape: jax.random.normal(key, shape),
      "hashed_uniform": lambda key, shape: uniform(
          sampling.hashed_bits(key, shape)
      ),
  }


def default_model_parameters(smoke: bool = False):
  """Zero arrays shaped like the default model's parameters (with `smoke`,
  like the tiny model of the configs' `smoke` argument)."""
  config = train_step_benchmark.jax_config("base")
  if smoke:
    config_base.use_smoke_settings(config)
  model = models.build_model(config.model, train_step_benchmark.VOCAB_SIZE)
  batch = train_step_benchmark.random_batch(0, 2, 64)
  shapes = jax.eval_shape(
      lambda: train_step.init_state(
          model, optax.identity(), batch, jax.random.key(0)
      )
  ).params
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def make_update(sampler):
  def update(params, momentum, grads, key):
    if sampler is not None:
      leaves, treedef = jax.tree.flatten(grads)
      keys = jax.random.split(key, len(leaves))
      grads = jax.tree.unflatten(
          treedef,
          [
              g + (GAMMA / g.size) * sampler(k, g.shape).astype(g.dtype)
              for g, k in zip(leaves, keys)
          ],
      )
    momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, grads)
    params = jax.tree.map(lambda p, m: p - 1e-2 * m, params, momentum)
    return params, momentum

  # Compiled with the train step's options: the noise is drawn inside it.
  return jax.jit(
      update,
      donate_argnums=(0, 1),
      compiler_options=parallel.step_compiler_options(),
  )


def step_milliseconds(
    image_size: int, batch_size: int, rounds: int, steps_per_round: int = 2
) -> dict:
  """The default model's train step without GA and with isotropic GA (the
  trainer's sampler), as train_step.py times them: interleaved rounds.

  Returns median ms/step per variant and "isotropic_cost", the median over
  rounds of isotropic/base step time, minus 1.
  """
  args = train_step_benchmark.parse_args([
      f"--image-size={image_size}",
      f"--batch-size={batch_size}",
      "--variants=base,isotropic",
      "--frameworks=jax",
      f"--repeats={rounds}",
      f"--steps={steps_per_round}",
  ])
  seconds = train_step_benchmark.run_jax(args)["round_seconds_per_step"]
  result = {v: 1e3 * statistics.median(s) for v, s in seconds.items()}
  result["isotropic_cost"] = (
      train_step_benchmark.paired_ratio(seconds["isotropic"], seconds["base"])
      - 1.0
  )
  return result


def main(argv=None):
  parser = cli.step_parser(__doc__, image_size=64)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument(
      "--step-rounds",
      type=int,
      default=10,
      help="interleaved rounds of the base and isotropic train steps",
  )
  parser.add_argument(
      "--steps-per-round",
      type=int,
      default=2,
      help="train steps per variant and round (more on accelerators)",
  )
  parser.add_argument(
      "--smoke",
      action="store_true",
      help="the tiny smoke model, no train steps (plumbing)",
  )
  args = parser.parse_args(argv)
  params = default_model_parameters(args.smoke)
  grads = jax.tree.map(jnp.ones_like, params)
  key = jax.random.key(0)
  size = sum(x.size for x in jax.tree.leaves(params))
  milliseconds = {}
  for name, sampler in [("baseline", None), *_samplers().items()]:
    update = make_update(sampler)
    state = (
        jax.tree.map(jnp.copy, params),
        jax.tree.map(jnp.zeros_like, params),
    )
    state = jax.block_until_ready(update(*state, grads, key))  # compile
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      state = jax.block_until_ready(update(*state, grads, key))
      times.append(time.perf_counter() - start)
    milliseconds[name] = 1e3 * statistics.median(times)
    print(f"{name}: {milliseconds[name]:.1f} ms", file=sys.stderr, flush=True)
  result = {
      "parameters": size,
      "leaves": len(jax.tree.leaves(params)),
      "backend": jax.default_backend(),
      "cpus": os.cpu_count(),
      "load_average": list(os.getloadavg()),
      "ms_per_update": milliseconds,
      "ms_over_baseline": {
          k: v - milliseconds["baseline"]
          for k, v in milliseconds.items()
          if k != "baseline"
      },
  }
  if not args.smoke:
    steps = step_milliseconds(
        args.image_size,
        args.batch_size,
        args.step_rounds,
        args.steps_per_round,
    )
    result["base_step"] = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "ms": steps["base"],
    }
    result["over_base_step"] = {
        k: v / steps["base"] for k, v in result["ms_over_baseline"].items()
    }
    result["isotropic_step"] = {
        "ms": steps["isotropic"],
        "cost_over_base_step": steps["isotropic_cost"],
        "rounds": args.step_rounds,
        "steps_per_round": args.steps_per_round,
    }
  report.emit(result, args.json_out)


if __name__ == "__main__":
  main()
