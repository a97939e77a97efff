r"""Gradient Augmentation on css_synth: paired seeds per arm, sensitivity scans.

  python scripts/ga_experiment.py --workdir=runs/ga_experiment \
      --results-dir=docs/results

Trains every arm (baseline; adversarial GA at the paper's epsilon; isotropic
GA with the official scaling at the paper's gamma; both, i.e. full GA; FGSM
adversarial training) for every seed with the same config
(configs/css_synth.py:ga), then scans epsilon (adversarial GA alone) and
gamma (isotropic GA alone) on the first `--scan-seeds`. One process per run;
the experiment is resumable: a run whose `result.json` exists in its workdir
is not trained again, and a half-trained one resumes from its checkpoint.

Writes into --results-dir: `results.json` (every run's command, final and
per-evaluation metrics, wall time and load), `table.md` (per arm mean +- std
over seeds, and the paired difference to the baseline of the same seed with
its 95% confidence interval, t distribution with n - 1 degrees of freedom),
and the figures `arms.png`, `curves.png` and `sensitivity.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
from scipy import stats

# arm -> (description, config overrides); "{eps}" etc. are filled per run.
ARMS = {
    "baseline": ("CE + eta*L_S", {}),
    "adversarial": ("+ adversarial GA", {"ga.adversarial.epsilon": "{eps}"}),
    "isotropic": ("+ isotropic GA", {"ga.isotropic.gamma": "{gamma}"}),
    "both": (
        "+ both (full GA)",
        {"ga.adversarial.epsilon": "{eps}", "ga.isotropic.gamma": "{gamma}"},
    ),
    "fgsm": ("FGSM adversarial training", {"baselines.fgsm_epsilon": "{fgsm}"}),
}
# Metrics of a run's evaluations: key in results -> key in metrics.jsonl.
METRICS = {"mt": "test/recall@1", "ms": "train/recall@1", "whm": "whm"}
LABELS = {"mt": "test R@1 (Mt)", "ms": "train R@1 (Ms)", "whm": "WHM"}


class Run(NamedTuple):
  """One run: an arm, a seed, and the scanned epsilon or gamma if any."""

  arm: str
  seed: int
  epsilon: float | None = None
  gamma: float | None = None

  @property
  def name(self) -> str:
    """The run's name: arm, the scanned value if any, and the seed."""
    name = self.arm
    if self.epsilon is not None:
      name = f"{name}_eps{self.epsilon:g}"
    if self.gamma is not None:
      name = f"{name}_gamma{self.gamma:g}"
    return f"{name}_seed{self.seed}"


def run_command(args, spec: Run) -> tuple[str, list[str]]:
  """(workdir, command line) of one run."""
  workdir = os.path.join(args.workdir, spec.name)
  eps = args.epsilon if spec.epsilon is None else spec.epsilon
  gam = args.gamma if spec.gamma is None else spec.gamma
  overrides = {
      k: v.format(eps=eps, gamma=gam, fgsm=args.fgsm_epsilon)
      for k, v in ARMS[spec.arm][1].items()
  }
  overrides["seed"] = str(spec.seed)
  overrides.update(dict(kv.split("=", 1) for kv in args.override))
  return workdir, [
      sys.executable,
      "-m",
      "irtf_jax.main",
      f"--config={args.config}",
      f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in overrides.items()]


def read_evaluations(workdir: str) -> list[dict]:
  """The run's evaluations (step, Mt, Ms, WHM) in step order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [
      {"step": r["step"], **{k: r[v] for k, v in METRICS.items()}}
      for r in records
      if METRICS["mt"] in r
  ]


def run(args, spec: Run) -> dict:
  """Trains one run, or reads its `result.json` if it finished before.

  The run's console output goes to `run.log` in its workdir. A run that
  stops on a non-finite loss (a regularizer too strong) is a result, kept
  with `diverged` set and no metrics; any other failure raises.
  """
  workdir, command = run_command(args, spec)
  done = os.path.join(workdir, "result.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  load_before = os.getloadavg()[0]
  start = time.time()
  log = os.path.join(workdir, "run.log")
  with open(log, "a") as f:
    process = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
  diverged = None
  if process.returncode:
    with open(log) as f:
      lines = [line for line in f if "NonFiniteLossError" in line]
    if not lines:
      raise subprocess.CalledProcessError(
          process.returncode, command, output=f"see {log}"
      )
    diverged = lines[-1].strip()
  evaluations = [] if diverged else read_evaluations(workdir)
  final = evaluations[-1] if evaluations else {}
  result = {
      "name": spec.name,
      **spec._asdict(),
      "seconds": time.time() - start,
      "load": [load_before, os.getloadavg()[0]],
      **{k: final.get(k) for k in METRICS},
      "step": final.get("step"),
      "curve": evaluations,
      "diverged": diverged,
      "command": " ".join(command),
  }
  with open(done, "w") as f:
    json.dump(result, f, indent=1)
  return result


# ---------------------------------------------------------------- statistics


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; NaN for one value)."""
  values = np.asarray(values, np.float64)
  std = values.std(ddof=1) if len(values) > 1 else math.nan
  return float(values.mean()), float(std)


def paired_difference(
    arm: dict[int, float], baseline: dict[int, float], confidence: float = 0.95
) -> dict:
  """Mean of arm - baseline over the seeds both have, with its confidence
  interval: mean +- t_{(1 + confidence) / 2, n - 1} * sd / sqrt(n).

  Args:
    arm, baseline: seed -> value.

  Returns:
    {"n", "mean", "sd", "low", "high"} (low, high NaN when n < 2).
  """
  seeds = sorted(set(arm) & set(baseline))
  d = np.asarray([arm[s] - baseline[s] for s in seeds], np.float64)
  n = len(d)
  if n == 0:
    return {
        "n": 0,
        "mean": math.nan,
        "sd": math.nan,
        "low": math.nan,
        "high": math.nan,
    }
  mean, sd = mean_std(d)
  if n < 2:
    return {"n": n, "mean": mean, "sd": sd, "low": math.nan, "high": math.nan}
  half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
  return {
      "n": n,
      "mean": mean,
      "sd": sd,
      "low": mean - half,
      "high": mean + half,
  }


def summarize(results: list[dict]) -> dict:
  """Per arm (main runs only): n, the runs that diverged, mean and std of
  each metric, and the paired difference to the baseline of each metric (in
  recall units, 0-1) over the seeds where neither diverged."""
  main = [r for r in results if r["epsilon"] is None and r["gamma"] is None]
  by_arm = {
      arm: {
          r["seed"]: r
          for r in main
          if r["arm"] == arm and not r.get("diverged")
      }
      for arm in ARMS
  }
  summary = {}
  for arm, runs in by_arm.items():
    diverged = sum(1 for r in main if r["arm"] == arm and r.get("diverged"))
    if not runs and not diverged:
      continue
    entry = {"n": len(runs), "diverged": diverged}
    summary[arm] = entry
    if not runs:
      continue
    for key in METRICS:
      entry[key] = mean_std([r[key] for r in runs.values()])
      if arm != "baseline":
        entry[f"diff_{key}"] = paired_difference(
            {s: r[key] for s, r in runs.items()},
            {s: r[key] for s, r in by_arm["baseline"].items()},
        )
  return summary


# -------------------------------------------------------------------- report


def _pct(mean: float, std: float) -> str:
  std_text = "n/a" if math.isnan(std) else f"{100 * std:.2f}"
  return f"{100 * mean:.2f} +- {std_text}"


def _diff(d: dict) -> str:
  if d["n"] < 2:
    return "n/a"
  return (
      f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
  )


def table(results: list[dict], args, wall_seconds: float) -> str:
  """Markdown: the arms, their paired differences, the scans, the setting."""
  summary = summarize(results)
  everything = results + scan_results(results, args)
  lines = [
      (
          f"css_synth, `{' '.join([args.config, *args.override])}`; adversarial"
          f" GA eps={args.epsilon:g} (q=1, query pixels), isotropic GA"
          f" gamma={args.gamma:g} (official scaling), FGSM"
          f" eps={args.fgsm_epsilon:g}. Recall@1 in %, mean +- std over seeds;"
          " WHM with alpha=1. Delta: the arm minus the baseline of the same"
          " seed, mean over seeds [95% confidence interval, t with n - 1"
          " degrees of freedom]."
      ),
      "",
      (
          "| arm | seeds | test R@1 (Mt) | train R@1 (Ms) | WHM | "
          "Delta Mt | Delta Ms | Delta WHM |"
      ),
      "|---|---|---|---|---|---|---|---|",
  ]
  for arm, entry in summary.items():
    cells = [_pct(*entry[k]) if entry["n"] else "" for k in METRICS]
    cells += [
        _diff(entry[f"diff_{k}"]) if entry["n"] and arm != "baseline" else ""
        for k in METRICS
    ]
    seeds = str(entry["n"]) + (
        f" ({entry['diverged']} diverged)" if entry["diverged"] else ""
    )
    lines.append(
        f"| {arm}: {ARMS[arm][0]} | {seeds} | " + " | ".join(cells) + " |"
    )
  for kind, label in (
      ("epsilon", "adversarial GA, epsilon"),
      ("gamma", "isotropic GA, gamma"),
  ):
    scanned = sorted(
        (r for r in everything if r[kind] is not None),
        key=lambda r: (r[kind], r["seed"]),
    )
    if not scanned:
      continue
    seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in scanned}))
    lines += [
        "",
        f"Sensitivity: {label} (seeds {seeds}; mean over them)",
        "",
        f"| {kind} | runs | test R@1 | train R@1 | WHM |",
        "|---|---|---|---|---|",
    ]
    for value in sorted({r[kind] for r in scanned}):
      rows = [r for r in scanned if r[kind] == value and not r.get("diverged")]
      if not rows:
        lines.append(f"| {value:g} | diverged | | | |")
        continue
      lines.append(
          f"| {value:g} | {len(rows)} | "
          + " | ".join(
              f"{100 * np.mean([r[k] for r in rows]):.2f}" for k in METRICS
          )
          + " |"
      )
  run_seconds = sum(r["seconds"] for r in results)
  loads = [x for r in results for x in r["load"]]
  lines += [
      "",
      (
          f"{len(results)} runs, {run_seconds / 60:.1f} min of "
          f"training and evaluation ({wall_seconds / 60:.1f} min wall time "
          f"of the last invocation) on {platform.machine()} with "
          f"{os.cpu_count()} CPUs; load average at the runs' starts and "
          f"ends {min(loads):.1f} to {max(loads):.1f}."
      ),
  ]
  return "\n".join(lines) + "\n"


def figures(results: list[dict], args, out: str) -> list[str]:
  """arms.png, curves.png, sensitivity.png in `out`; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  summary = summarize(results)
  everything = [
      r for r in results + scan_results(results, args) if not r.get("diverged")
  ]
  paths = []
  arms = [a for a in summary if a != "baseline" and summary[a]["n"]]
  if arms:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key in zip(axes, METRICS):
      diffs = [summary[a][f"diff_{key}"] for a in arms]
      means = [100 * d["mean"] for d in diffs]
      errors = [
          [100 * (d["mean"] - d["low"]) for d in diffs],
          [100 * (d["high"] - d["mean"]) for d in diffs],
      ]
      ax.errorbar(range(len(arms)), means, yerr=errors, fmt="o", capsize=4)
      ax.axhline(0, color="gray", lw=1)
      ax.set_xticks(range(len(arms)), arms, rotation=20)
      ax.set_title(f"{LABELS[key]}: arm - baseline")
      ax.set_ylabel("points (95% CI, paired seeds)")
    fig.tight_layout()
    paths.append(os.path.join(out, "arms.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  main = [r for r in everything if r["epsilon"] is None and r["gamma"] is None]
  if main:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key in zip(axes, ("ms", "mt")):
      for arm in ARMS:
        runs = [r for r in main if r["arm"] == arm]
        if not runs:
          continue
        steps = [e["step"] for e in runs[0]["curve"]]
        curves = np.asarray([
            [e[key] for e in r["curve"]]
            for r in runs
            if len(r["curve"]) == len(steps)
        ])
        ax.plot(steps, 100 * curves.mean(0), marker="o", label=arm)
      ax.set_title(f"{LABELS[key]}, mean over seeds")
      ax.set_xlabel("training step")
    axes[0].set_ylabel("Recall@1 (%)")
    axes[1].legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  scans = [
      k
      for k in ("epsilon", "gamma")
      if any(r[k] is not None for r in everything)
  ]
  if scans:
    fig, axes = plt.subplots(
        1, len(scans), figsize=(5.5 * len(scans), 3.8), squeeze=False
    )
    for ax, kind in zip(axes[0], scans):
      scanned = [r for r in everything if r[kind] is not None]
      seeds = sorted({r["seed"] for r in scanned})
      values = sorted({r[kind] for r in scanned})
      for key in ("mt", "ms"):
        ax.plot(
            values,
            [
                100 * np.mean([r[key] for r in scanned if r[kind] == v])
                for v in values
            ],
            marker="o",
            label=LABELS[key],
        )
        base = [
            r[key]
            for r in main
            if r["arm"] == "baseline" and r["seed"] in seeds
        ]
        if base:
          ax.axhline(
              100 * np.mean(base),
              ls="--",
              color=ax.lines[-1].get_color(),
              label=f"baseline {LABELS[key]}",
          )
      ax.set_xscale("log")
      ax.set_xlabel(kind)
      ax.set_ylabel("Recall@1 (%)")
      ax.set_title(
          f"{'adversarial' if kind == 'epsilon' else 'isotropic'}"
          f" GA: {kind} (seeds {', '.join(map(str, seeds))})"
      )
      ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "sensitivity.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def planned_runs(args) -> list[Run]:
  """Every run, main arms first, seed-major (so a partial experiment has
  complete pairs)."""
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = [Run(arm, seed) for seed in seeds for arm in args.arms.split(",")]
  scan_seeds = [int(s) for s in args.scan_seeds.split(",") if s]
  for seed in scan_seeds:
    runs += [
        Run("adversarial", seed, epsilon=e)
        for e in args.epsilon_scan
        if e != args.epsilon
    ]
    runs += [
        Run("isotropic", seed, gamma=g)
        for g in args.gamma_scan
        if g != args.gamma
    ]
  return runs


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/ga_experiment")
  parser.add_argument("--results-dir", default="docs/results")
  parser.add_argument("--config", default="configs/css_synth.py:ga")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--epsilon", type=float, default=1e-6)
  parser.add_argument("--gamma", type=float, default=1e-2)
  parser.add_argument("--fgsm-epsilon", type=float, default=1e-2)
  parser.add_argument(
      "--epsilon-scan",
      type=_floats,
      default=_floats("1e-6,1e-4,1e-2,1"),
      help="adversarial GA epsilons of the sensitivity scan",
  )
  parser.add_argument(
      "--gamma-scan",
      type=_floats,
      default=_floats("1e-3,1e-2,1e-1,1"),
      help="isotropic GA gammas of the sensitivity scan",
  )
  parser.add_argument(
      "--scan-seeds",
      default="0",
      help=(
          "seeds of the scans (each scanned value other "
          "than the arms' reuses the arm's run of that seed)"
      ),
  )
  parser.add_argument(
      "--override",
      action="append",
      default=[],
      help="extra config override a.b=value (repeatable)",
  )
  return parser.parse_args(argv)


def scan_results(results: list[dict], args) -> list[dict]:
  """`results` plus, for the scans, the main arms' runs at the paper's value
  (adversarial at --epsilon, isotropic at --gamma) of the scan seeds, marked
  with that value, so each scan has every value it lists."""
  scan_seeds = {int(s) for s in args.scan_seeds.split(",") if s}
  extra = []
  for r in results:
    if r["epsilon"] is None and r["gamma"] is None and r["seed"] in scan_seeds:
      if r["arm"] == "adversarial" and args.epsilon in args.epsilon_scan:
        extra.append({**r, "epsilon": args.epsilon})
      if r["arm"] == "isotropic" and args.gamma in args.gamma_scan:
        extra.append({**r, "gamma": args.gamma})
  return extra


def report(results: list[dict], args, wall_seconds: float) -> str:
  """Writes results.json, table.md and the figures; returns the table."""
  os.makedirs(args.results_dir, exist_ok=True)
  with open(os.path.join(args.results_dir, "results.json"), "w") as f:
    json.dump(
        {
            "config": args.config,
            "override": args.override,
            "epsilon": args.epsilon,
            "gamma": args.gamma,
            "fgsm_epsilon": args.fgsm_epsilon,
            "summary": summarize(results),
            "runs": results,
        },
        f,
        indent=1,
    )
  text = table(results, args, wall_seconds)
  with open(os.path.join(args.results_dir, "table.md"), "w") as f:
    f.write(text)
  figures(results, args, args.results_dir)
  return text


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  start = time.time()
  results = []
  for spec in planned_runs(args):
    results.append(run(args, spec))
    print(
        json.dumps({k: v for k, v in results[-1].items() if k != "curve"}),
        flush=True,
    )
    report(results, args, time.time() - start)  # partial results survive
  print(report(results, args, time.time() - start))


if __name__ == "__main__":
  main()
