r"""Gradient Augmentation on css_synth: baseline vs GA variants vs FGSM, several seeds.

  python scripts/ga_experiment.py --workdir=runs/ga_experiment --seeds=0,1,2

Trains every variant for every seed with the same config (configs/css_synth.py
with the overrides below, one process per run, resumable: a finished run is not
trained again), then writes `table.md` and `results.json` in --workdir with
train Recall@1 (Ms), test Recall@1 (Mt) and WHM (alpha=1) as mean +- std over
seeds. The README's table is this script's `table.md`.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_variant(args, variant: str, seed: int) -> dict:
  workdir = os.path.join(args.workdir, f"{variant}_seed{seed}")
  overrides = {k: v.format(eps=args.epsilon, gamma=args.gamma,
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
  return {"variant": variant, "seed": seed, "seconds": time.time() - start,
          "step": final["step"], "ms": final["train/recall@1"],
          "mt": final["test/recall@1"], "whm": final["whm"],
          "command": " ".join(command)}


def table(results: list[dict], args) -> str:
  lines = [
      f"css_synth, {args.config} {' '.join(args.override)}, seeds "
      f"{args.seeds}; adversarial eps={args.epsilon} (q=1, query pixels), "
      f"isotropic gamma={args.gamma}, FGSM eps={args.fgsm_epsilon}. "
      "Recall in %, mean +- std over seeds; WHM with alpha=1.",
      "",
      "| variant | train R@1 (Ms) | test R@1 (Mt) | WHM |",
      "|---|---|---|---|",
  ]
  for variant, (description, _) in VARIANTS.items():
    rows = [r for r in results if r["variant"] == variant]
    if not rows:
      continue
    cells = []
    for key in ("ms", "mt", "whm"):
      values = 100 * np.asarray([r[key] for r in rows])
      cells.append(f"{values.mean():.2f} +- {values.std(ddof=1) if len(values) > 1 else 0:.2f}")
    lines.append(f"| {variant}: {description} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/ga_experiment")
  parser.add_argument("--config", default="configs/css_synth.py")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--epsilon", type=float, default=1e-6)
  parser.add_argument("--gamma", type=float, default=1e-2)
  parser.add_argument("--fgsm-epsilon", type=float, default=1e-2)
  parser.add_argument("--override", action="append", default=[],
                      help="extra config override a.b=value (repeatable)")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  results = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for variant in args.variants.split(","):
      results.append(run_variant(args, variant, seed))
      print(json.dumps(results[-1]), flush=True)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  text = table(results, args)
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
