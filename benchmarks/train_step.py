r"""Train-step throughput, JAX against an eager PyTorch reference, side by side.

  python benchmarks/train_step.py --image-size=64 --batch-size=32 --json-out=F

The model is the paper's default: ResNet-18 + LSTM + TIRG-LastConv, embeddings
of 512, the loss batch classification + eta * similarity matching, SGD with
momentum and weight decay. Variants:

  base         L_CE + eta * L_S
  isotropic    + isotropic GA (gamma = 1e-2, optimizer side)
  adversarial  + adversarial GA (eps = 1e-6, q = 1, on the query pixels;
               double backprop)
  both         isotropic + adversarial
  fgsm         FGSM adversarial training (eps = 1e-2), the paper's baseline

JAX runs the project's own step (`train_step.make_train_step` and
`make_optimizer`, the config switched per variant); PyTorch runs
`benchmarks/torch_reference.py`, on a CUDA GPU when PyTorch sees one (with
cuDNN's algorithm search) and in bfloat16 autocast for `--precision=bfloat16`,
JAX's bfloat16 compute dtype. Each framework is timed in its own
subprocess, one after the other, with the same number of threads, so the two
never share cores while timing. Within a framework every variant is compiled
and warmed up first, then timed in `--repeats` interleaved rounds of `--steps`
steps each (`interleaved_seconds`); the reported time is the median over
rounds. The JSON holds queries/s per framework and variant, every round's
ms/step, the ratios JAX/PyTorch per variant (of medians) and variant/base per
framework (the median of the rounds' own ratios), and the thread counts.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import cli  # benchmarks/cli.py
import report  # benchmarks/report.py

from irtf_jax.data import fixtures

VARIANTS = ("base", "isotropic", "adversarial", "both", "fgsm")
TORCH_VARIANTS = ("base", "isotropic", "adversarial", "both", "fgsm")
FRAMEWORKS = ("jax", "torch")
VOCAB_SIZE = 100
MAX_LENGTH = 24
ISOTROPIC_GAMMA = 1e-2
ADVERSARIAL_EPSILON = 1e-6
FGSM_EPSILON = 1e-2
ETA = 1e-3


def random_batch(seed: int, batch_size: int, image_size: int) -> dict:
  """uint8 images and padded token ids (3 to 8 words), as the trainer feeds
  them."""
  return fixtures.random_batch(
      seed,
      batch_size,
      image_size,
      max_length=MAX_LENGTH,
      vocab_size=VOCAB_SIZE,
      length_range=(3, 8),
  )


def interleaved_seconds(
    runners: dict, args, framework: str, clock=time.perf_counter
) -> dict:
  """Seconds per step of each variant in each of `args.repeats` rounds.

  `runners[variant](n)` runs n steps. On a shared VM the same step's time
  drifts by tens of percent within minutes, so timing one variant after the
  other lets the drift fall on whichever ran later. Here every round times
  `args.steps` steps of each variant, in reverse order every other round: a
  drift falls on all variants alike, and a round's ratio of two variants
  compares timings taken seconds apart. Every variant first runs
  `args.warmup` untimed steps (the first one compiles). Logs the median
  ms/step per variant on stderr.

  Returns:
    {variant: [seconds per step, one per round]}.
  """
  for run_steps in runners.values():
    run_steps(args.warmup)
  order = list(runners)
  per_step = {variant: [] for variant in order}
  for round_index in range(args.repeats):
    for variant in order if round_index % 2 == 0 else order[::-1]:
      start = clock()
      runners[variant](args.steps)
      per_step[variant].append((clock() - start) / args.steps)
  for variant, seconds in per_step.items():
    print(
        f"{framework} {variant}: "
        f"{1e3 * statistics.median(seconds):.0f} ms/step",
        file=sys.stderr,
        flush=True,
    )
  return per_step


def paired_ratio(numerator: list, denominator: list) -> float:
  """Median over rounds of numerator[r] / denominator[r]."""
  return statistics.median(n / d for n, d in zip(numerator, denominator))


def jax_config(variant: str, conv_implementation: str = "auto"):
  from irtf_jax.config_base import base_config  # pylint: disable=g-import-not-at-top

  config = base_config()
  config.model.name = "tirg_lastconv"
  config.model.conv_implementation = conv_implementation
  config.model.text_encoder.max_length = MAX_LENGTH
  config.loss.eta = ETA
  if variant in ("isotropic", "both"):
    config.ga.isotropic.gamma = ISOTROPIC_GAMMA
  if variant in ("adversarial", "both"):
    config.ga.adversarial.epsilon = ADVERSARIAL_EPSILON
    config.ga.adversarial.q = 1.0
  if variant == "fgsm":
    config.baselines.fgsm_epsilon = FGSM_EPSILON
  return config


def jit_jax_step(model, tx, config, **jit_kwargs):
  """The project's train step, jitted with the compiler options the trainer
  compiles it with (`parallel.DataParallel.compile_step`)."""
  import jax  # pylint: disable=g-import-not-at-top

  from irtf_jax import parallel  # pylint: disable=g-import-not-at-top
  from irtf_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  return jax.jit(
      ts.make_train_step(model, tx, config),
      compiler_options=parallel.step_compiler_options(),
      **jit_kwargs,
  )


def run_jax(args) -> dict:
  """Seconds per step of the project's compiled step, per variant."""
  import jax  # pylint: disable=g-import-not-at-top

  from irtf_jax import models  # pylint: disable=g-import-not-at-top
  from irtf_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from irtf_jax.models import onednn  # pylint: disable=g-import-not-at-top

  batch = jax.device_put(random_batch(0, args.batch_size, args.image_size))

  def runner(variant):
    config = jax_config(variant, args.conv_implementation)
    config.batch_size = args.batch_size
    model = models.build_model(
        config.model, VOCAB_SIZE, precision=args.precision
    )
    tx = ts.make_optimizer(config)
    state = jax.jit(lambda rng: ts.init_state(model, tx, batch, rng))(
        jax.random.key(0)
    )
    step = jit_jax_step(model, tx, config, donate_argnums=(0,))
    rng = jax.random.key(1)
    holder = [state]

    def run_steps(n):
      s = holder[0]
      for _ in range(n):
        s, _ = step(s, batch, rng)
      holder[0] = jax.block_until_ready(s)

    return run_steps

  rounds = interleaved_seconds(
      {variant: runner(variant) for variant in args.variants}, args, "jax"
  )
  return {
      "round_seconds_per_step": rounds,
      "threads": os.cpu_count(),
      "version": jax.__version__,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "onednn_kernel_gradients": onednn.enabled(),
  }


def run_torch(args) -> dict:
  """Seconds per step of the eager PyTorch reference, per variant."""
  import torch  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  device = torch_reference.default_device()
  # cuDNN's per-shape algorithm search, the counterpart of XLA's autotuning.
  torch.backends.cudnn.benchmark = True
  batch = torch_reference.to_torch(
      random_batch(0, args.batch_size, args.image_size), device
  )

  def runner(variant):
    trainer = torch_reference.Trainer(
        vocab_size=VOCAB_SIZE,
        eta=ETA,
        isotropic_gamma=ISOTROPIC_GAMMA
        if variant in ("isotropic", "both")
        else 0.0,
        adversarial_epsilon=ADVERSARIAL_EPSILON
        if variant in ("adversarial", "both")
        else 0.0,
        fgsm_epsilon=FGSM_EPSILON if variant == "fgsm" else 0.0,
        device=device,
        precision=args.precision,
    )

    def run_steps(n):
      for _ in range(n):
        trainer.step(batch)

    return run_steps

  rounds = interleaved_seconds(
      {v: runner(v) for v in args.variants if v in TORCH_VARIANTS},
      args,
      "torch",
  )
  return {
      "round_seconds_per_step": rounds,
      "threads": torch.get_num_threads(),
      "interop_threads": torch.get_num_interop_threads(),
      "version": torch.__version__,
      "device": str(
          torch.cuda.get_device_name(device)
          if device.type == "cuda"
          else device
      ),
  }


# The options a framework's worker process gets from the parent.
WORKER_OPTIONS = (
    "image_size",
    "batch_size",
    "steps",
    "repeats",
    "warmup",
    "threads",
    "variants",
    "precision",
    "conv_implementation",
)


def _run_worker(framework: str, args) -> dict:
  """Runs one framework in a fresh process (its own threads, no sharing)."""
  flags = cli.flags(args, WORKER_OPTIONS)
  # XLA:CPU sizes its intra-op pool to the machine's cores; PyTorch is told
  # the same count (torch.set_num_threads), so both use all cores alone.
  threads = str(args.threads)
  env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
  return cli.run_side(__file__, framework, flags, env)


def _load_average() -> list[float] | None:
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def summarize(results: dict, args) -> dict:
  """queries/s per framework and variant, and the ratios."""
  summary = {
      "device": (
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
      ),
      "image_size": args.image_size,
      "batch_size": args.batch_size,
      "steps": args.steps,
      "repeats": args.repeats,
      "load_average_before": args.load_before,
      "load_average_after": _load_average(),
  }
  for framework, result in results.items():
    rounds = result["round_seconds_per_step"]
    median = {v: statistics.median(s) for v, s in rounds.items()}
    summary[framework] = {v: args.batch_size / s for v, s in median.items()}
    summary[f"{framework}_ms_per_step"] = {
        v: 1e3 * s for v, s in median.items()
    }
    summary[f"{framework}_info"] = {
        k: v for k, v in result.items() if k != "round_seconds_per_step"
    }
    summary[f"{framework}_round_ms_per_step"] = {
        v: [1e3 * x for x in s] for v, s in rounds.items()
    }
    summary[f"{framework}_threads"] = result["threads"]
  ratios = {}
  if "jax" in summary and "torch" in summary:
    # The frameworks ran in separate processes, one after the other: only
    # their medians compare.
    for v, qps in summary["jax"].items():
      if v in summary["torch"]:
        ratios[f"jax/torch {v}"] = qps / summary["torch"][v]
  for framework in results:
    rounds = results[framework]["round_seconds_per_step"]
    for v in rounds:
      if v != "base" and "base" in rounds:
        # Variant/base throughput (<= 1; 1 - it is the variant's cost), the
        # median of the rounds' own ratios (see `interleaved_seconds`).
        ratios[f"{framework} {v}/base"] = paired_ratio(
            rounds["base"], rounds[v]
        )
  summary["ratios"] = ratios
  return summary


def parse_args(argv=None):
  parser = cli.step_parser(__doc__, image_size=64)
  parser.add_argument("--steps", type=int, default=3, help="steps per timing")
  parser.add_argument(
      "--repeats",
      type=int,
      default=3,
      help=(
          "rounds, each timing every variant (medians and the medians of "
          "per-round ratios are reported)"
      ),
  )
  parser.add_argument(
      "--warmup", type=int, default=2, help="untimed steps after compilation"
  )
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
  parser.add_argument(
      "--threads",
      type=int,
      default=os.cpu_count() or 1,
      help=(
          "PyTorch intra-op threads (XLA:CPU uses every "
          "core; keep the default for a fair comparison)"
      ),
  )
  parser.add_argument(
      "--precision", default="float32", choices=("float32", "bfloat16")
  )
  parser.add_argument(
      "--conv-implementation", default="auto", choices=("auto", "lax", "im2col")
  )
  cli.add_side_flag(parser)
  args = parser.parse_args(argv)
  args.variants = cli.comma_list(parser, "--variants", args.variants, VARIANTS)
  args.frameworks = cli.comma_list(
      parser, "--frameworks", args.frameworks, FRAMEWORKS
  )
  return args


def main(argv=None):
  args = parse_args(argv)
  if cli.answer_side(args, {"jax": run_jax, "torch": run_torch}):
    return
  args.load_before = _load_average()
  results = {f: _run_worker(f, args) for f in args.frameworks}
  report.emit(summarize(results, args), args.json_out)


if __name__ == "__main__":
  main()
