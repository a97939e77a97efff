r"""Every benchmark at its accelerator sizes, one JSON with the device.

  python benchmarks/run_all.py --json-out=all.json           # GPU or TPU
  python benchmarks/run_all.py --smoke --json-out=smoke.json # seconds, CPU

Runs, one after the other, each in its own process (so one's compilation
cache and memory do not colour the next):

- `train_step.py` at 224 px with batch 32 and at 64 px with batch 200, base
  and adversarial GA, in float32 and bfloat16;
- `isotropic_noise.py` (isotropic GA's noise against the bare update);
- `ranking.py` at 30k x 30k and 100k x 100k queries x gallery (with the bare
  matmul floor and peak memory);
- `end_to_end.py` (the trainer's throughput and a full test evaluation on a
  MIT-States-format JPEG fixture).

PyTorch runs beside JAX where the benchmark has a PyTorch side and the
machine has no accelerator (`torch_reference.py` runs on the CPU, so on a GPU
or TPU its numbers would compare different devices: there JAX runs alone
and `frameworks` in the output says so). `--smoke` shrinks every size so the
whole run takes about a minute on a 2-core CPU; the test suite runs it.

Output: {"device": ..., "date": ..., "smoke": ..., "benchmarks": {name:
the benchmark's own JSON, or {"error": ...} when it failed}}. A failed
benchmark does not stop the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import cli  # benchmarks/cli.py, beside this script
import report  # benchmarks/report.py, beside this script

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))


def device_description() -> dict:
  """What runs the benchmarks: JAX's devices and the host.

  Asked in a child process: JAX in this process would hold accelerator
  memory (it preallocates most of a GPU's) for the whole run.
  """
  script = (
      "import jax, json; d = jax.devices(); print(json.dumps(dict("
      "platform=d[0].platform, device_kind=d[0].device_kind, "
      "device_count=len(d), jax=jax.__version__)))"
  )
  found = subprocess.run(
      [sys.executable, "-c", script],
      check=True,
      stdout=subprocess.PIPE,
      text=True,
  )
  description = json.loads(found.stdout.strip().splitlines()[-1])
  description["host"] = (
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
  )
  return description


def plan(smoke: bool, accelerator: bool) -> dict[str, list[str]]:
  """Benchmark name -> the script and its arguments."""
  frameworks = "jax" if accelerator else "jax,torch"
  if smoke:
    step = [
        "--steps=1",
        "--repeats=1",
        "--warmup=0",
        "--variants=base",
        f"--frameworks={frameworks}",
    ]
    return {
        "train_step_32px_b4_float32": [
            "train_step.py",
            "--image-size=32",
            "--batch-size=4",
            *step,
        ],
        "train_step_32px_b4_bfloat16": [
            "train_step.py",
            "--image-size=32",
            "--batch-size=4",
            "--precision=bfloat16",
            *step,
        ],
        "isotropic_noise": ["isotropic_noise.py", "--repeats=1", "--smoke"],
        "ranking_2k": [
            "ranking.py",
            "--queries=2000",
            "--gallery=2000",
            "--naive-queries=200",
            "--repeats=1",
        ],
        "end_to_end": ["end_to_end.py", "--smoke", "--workers=0"],
    }
  step = ["--variants=base,adversarial", f"--frameworks={frameworks}"]
  runs = {}
  for size, batch in ((224, 32), (64, 200)):
    for precision in ("float32", "bfloat16"):
      runs[f"train_step_{size}px_b{batch}_{precision}"] = [
          "train_step.py",
          f"--image-size={size}",
          f"--batch-size={batch}",
          f"--precision={precision}",
          *step,
      ]
  runs["isotropic_noise"] = ["isotropic_noise.py"]
  runs["ranking_30k"] = ["ranking.py", "--queries=30000", "--gallery=30000"]
  runs["ranking_100k"] = ["ranking.py", "--queries=100000", "--gallery=100000"]
  runs["end_to_end"] = ["end_to_end.py"]
  return runs


def run_one(arguments: list[str], folder: str, timeout: float) -> dict:
  """One benchmark in its own process; its JSON, or what went wrong."""
  out = os.path.join(folder, "out.json")
  command = [
      sys.executable,
      os.path.join(BENCHMARKS, arguments[0]),
      *arguments[1:],
      f"--json-out={out}",
  ]
  try:
    finished = subprocess.run(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:g} s", "command": command}
  if finished.returncode != 0 or not os.path.exists(out):
    return {
        "error": f"exit status {finished.returncode}",
        "stderr_tail": finished.stderr[-2000:],
        "command": command,
    }
  with open(out) as f:
    result = json.load(f)
  os.remove(out)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--smoke",
      action="store_true",
      help="tiny sizes: checks every benchmark runs",
  )
  parser.add_argument(
      "--only",
      default="",
      help="comma-separated benchmark names (default: all)",
  )
  parser.add_argument(
      "--timeout",
      type=float,
      default=1800.0,
      help="seconds allowed per benchmark",
  )
  report.add_json_out_flag(parser)
  args = parser.parse_args(argv)
  device = device_description()
  runs = plan(args.smoke, accelerator=device["platform"] != "cpu")
  if args.only:
    only = cli.comma_list(parser, "--only", args.only, list(runs))
    runs = {k: v for k, v in runs.items() if k in only}
  results = {}
  with tempfile.TemporaryDirectory() as folder:
    for name, arguments in runs.items():
      print(f"run_all: {name}", file=sys.stderr, flush=True)
      started = time.perf_counter()
      results[name] = run_one(arguments, folder, args.timeout)
      # The whole process: start-up, compilation and every repeat.
      results[name]["wall_seconds"] = time.perf_counter() - started
  report.emit(
      {
          "device": device,
          "date": datetime.date.today().isoformat(),
          "smoke": args.smoke,
          "frameworks": "jax" if device["platform"] != "cpu" else "jax,torch",
          "benchmarks": results,
      },
      args.json_out,
  )
  return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
