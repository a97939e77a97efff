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

PyTorch runs beside JAX where the benchmark has a PyTorch side and PyTorch
can use the same kind of device: on a CPU, and on a GPU that PyTorch sees
through CUDA (`torch_reference.py` runs there). On a TPU, or a GPU that
PyTorch does not see, its numbers would compare different devices, so JAX
runs alone; `frameworks` in the output says which ran. `--smoke` shrinks every
size so the whole run takes about a minute on a 2-core CPU; the test suite
runs it.

An accelerator is often lent for a fixed time: `--deadline=S` stops starting
benchmarks S seconds after the start (each gets at most what is left, and
those not run are reported as skipped), and the JSON file is rewritten after
every benchmark, so a run cut short keeps what it measured.

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


# Prints the device description; run in a child process (`device_description`).
_DESCRIBE_DEVICE = """
import json
import jax


def torch_cuda():
  try:
    import torch
  except ImportError:
    return None
  return torch.cuda.get_device_name() if torch.cuda.is_available() else None


devices = jax.devices()
print(json.dumps(dict(
    platform=devices[0].platform,
    device_kind=devices[0].device_kind,
    device_count=len(devices),
    jax=jax.__version__,
    torch_cuda=torch_cuda(),
)))
"""


def device_description() -> dict:
  """What runs the benchmarks: JAX's devices, PyTorch's GPU, and the host.

  Asked in a child process: JAX in this process would hold accelerator
  memory (it preallocates most of a GPU's) for the whole run.
  """
  found = subprocess.run(
      [sys.executable, "-c", _DESCRIBE_DEVICE],
      check=True,
      stdout=subprocess.PIPE,
      text=True,
  )
  description = json.loads(found.stdout.strip().splitlines()[-1])
  description["host"] = (
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
  )
  return description


def timed_frameworks(device: dict) -> str:
  """The frameworks to time: PyTorch too where it runs on the same device."""
  same_device = device["platform"] == "cpu" or (
      device["platform"] == "gpu" and device.get("torch_cuda")
  )
  return "jax,torch" if same_device else "jax"


def plan(
    smoke: bool, frameworks: str, accelerator: bool = False
) -> dict[str, list[str]]:
  """Benchmark name -> the script and its arguments."""
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
  if accelerator:
    # Milliseconds a step: time more of them, so that launch and
    # synchronization overheads do not dominate a round.
    step += ["--steps=20", "--repeats=5", "--warmup=3"]
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
  if accelerator:
    # An H200 ran 2-step rounds of ~8 ms steps: their paired ratio and
    # the ratio of their medians differed by 7 points (3% against 10%).
    runs["isotropic_noise"].append("--steps-per-round=20")
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
  parser.add_argument(
      "--deadline",
      type=float,
      default=0.0,
      help=(
          "start no benchmark after this many seconds from the start, and "
          "give each at most what is left (0: no deadline)"
      ),
  )
  report.add_json_out_flag(parser)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  device = device_description()
  frameworks = timed_frameworks(device)
  runs = plan(args.smoke, frameworks, accelerator=device["platform"] != "cpu")
  if args.only:
    only = cli.comma_list(parser, "--only", args.only, list(runs))
    # In the order given: what matters most runs first under a deadline.
    runs = {k: runs[k] for k in only}
  output = {
      "device": device,
      "date": datetime.date.today().isoformat(),
      "smoke": args.smoke,
      "frameworks": frameworks,
      "benchmarks": {},
  }
  results = output["benchmarks"]
  with tempfile.TemporaryDirectory() as folder:
    for name, arguments in runs.items():
      timeout = args.timeout
      if args.deadline:
        timeout = min(timeout, args.deadline - (time.perf_counter() - start))
      if timeout <= 0:
        results[name] = {"error": f"skipped: --deadline={args.deadline:g} s"}
        continue
      print(f"run_all: {name}", file=sys.stderr, flush=True)
      started = time.perf_counter()
      results[name] = run_one(arguments, folder, timeout)
      # The whole process: start-up, compilation and every repeat.
      results[name]["wall_seconds"] = time.perf_counter() - started
      report.write(output, args.json_out)
  report.emit(output, args.json_out)
  return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
