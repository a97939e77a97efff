r"""Gradient Augmentation on css_synth: baseline vs GA variants vs FGSM, several seeds.

  python scripts/ga_experiment.py --workdir=runs/ga_experiment --seeds=0,1,2

Trains every variant for every seed with the same config (configs/css_synth.py:ga
with the overrides below, one process per run, resumable: a finished run is not
trained again), then writes `table.md` and `results.json` in --workdir with
train Recall@1 (Ms), test Recall@1 (Mt) and WHM (alpha=1) as mean +- std over
seeds. `--epsilon-scan=1e-4,1e-2` adds adversarial GA at those epsilons
(first seed only), since the paper's 1e-6 was tuned for another pixel scale.
The README's table is this script's `table.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# name -> (description, config overrides)
VARIANTS = {
    "baseline": ("CE + eta*L_S", {}),
    "adversarial": ("+ adversarial GA", {"ga.adversarial.epsilon": "{eps}"}),
    "isotropic": ("+ isotropic GA", {"ga.isotropic.gamma": "{gamma}"}),
    "both": ("+ both (full GA)", {"ga.adversarial.epsilon": "{eps}",
                                  "ga.isotropic.gamma": "{gamma}"}),
    "fgsm": ("FGSM adversarial training", {"baselines.fgsm_epsilon": "{fgsm}"}),
}


def run_variant(args, variant: str, seed: int, epsilon: float | None = None
                ) -> dict:
  """Trains one run (or finds it finished) and returns its final metrics."""
  epsilon = args.epsilon if epsilon is None else epsilon
  name = variant if epsilon == args.epsilon else f"{variant}_eps{epsilon:g}"
  workdir = os.path.join(args.workdir, f"{name}_seed{seed}")
  overrides = {k: v.format(eps=epsilon, gamma=args.gamma,
                           fgsm=args.fgsm_epsilon)
               for k, v in VARIANTS[variant][1].items()}
  overrides["seed"] = str(seed)
  overrides.update(dict(kv.split("=", 1) for kv in args.override))
  command = [sys.executable, "-m", "irtf_jax.main", f"--config={args.config}",
             f"--workdir={workdir}"] + [f"--config.{k}={v}"
                                        for k, v in overrides.items()]
  start = time.time()
  subprocess.run(command, check=True)
  records = [json.loads(line) for line in
             open(os.path.join(workdir, "metrics.jsonl"))]
  final = [r for r in records if "test/recall@1" in r][-1]
  return {"variant": name, "seed": seed, "seconds": time.time() - start,
          "step": final["step"], "ms": final["train/recall@1"],
          "mt": final["test/recall@1"], "whm": final["whm"],
          "command": " ".join(command)}


def _mean_std(rows: list[dict], key: str) -> str:
  values = 100 * np.asarray([r[key] for r in rows])
  std = f"{values.std(ddof=1):.2f}" if len(values) > 1 else "n/a"
  return f"{values.mean():.2f} +- {std}"


def table(results: list[dict], args, wall_seconds: float) -> str:
  """The Markdown table of `results`, with the setting and the wall time."""
  lines = [
      f"css_synth, {args.config} {' '.join(args.override)}, seeds "
      f"{args.seeds}; adversarial eps={args.epsilon} (q=1, query pixels), "
      f"isotropic gamma={args.gamma}, FGSM eps={args.fgsm_epsilon}. "
      "Recall in %, mean +- std over seeds; WHM with alpha=1.",
      "",
      "| variant | train R@1 (Ms) | test R@1 (Mt) | WHM |",
      "|---|---|---|---|",
  ]
  names = [(v, d) for v, (d, _) in VARIANTS.items()] + [
      (f"adversarial_eps{e:g}", f"+ adversarial GA, eps={e:g}")
      for e in args.epsilon_scan]
  for name, description in names:
    rows = [r for r in results if r["variant"] == name]
    if rows:
      lines.append(f"| {name}: {description} ({len(rows)} seed"
                   f"{'s' if len(rows) > 1 else ''}) | " +
                   " | ".join(_mean_std(rows, k) for k in ("ms", "mt", "whm"))
                   + " |")
  lines += ["", f"{len(results)} runs, {wall_seconds / 60:.1f} min wall time "
            f"on {platform.machine()} with {os.cpu_count()} CPUs (load "
            f"average after: {os.getloadavg()[0]:.1f})."]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/ga_experiment")
  parser.add_argument("--config", default="configs/css_synth.py:ga")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--epsilon", type=float, default=1e-6)
  parser.add_argument("--gamma", type=float, default=1e-2)
  parser.add_argument("--fgsm-epsilon", type=float, default=1e-2)
  parser.add_argument("--epsilon-scan", default="",
                      help="comma-separated extra adversarial epsilons "
                      "(first seed only)")
  parser.add_argument("--override", action="append", default=[],
                      help="extra config override a.b=value (repeatable)")
  args = parser.parse_args()
  args.epsilon_scan = [float(e) for e in args.epsilon_scan.split(",") if e]
  os.makedirs(args.workdir, exist_ok=True)
  start = time.time()
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = [(variant, seed, None) for seed in seeds
          for variant in args.variants.split(",")]
  runs += [("adversarial", seeds[0], e) for e in args.epsilon_scan]
  results = []
  for variant, seed, epsilon in runs:
    results.append(run_variant(args, variant, seed, epsilon))
    print(json.dumps(results[-1]), flush=True)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  text = table(results, args, time.time() - start)
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
