"""scripts/ga_experiment.py: its config, run commands, statistics and report."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from irtf_jax import config_base
from tests.helpers import load_repo_module


@pytest.fixture(scope="module")
def script():
  return load_repo_module("scripts/ga_experiment.py", "ga_experiment")


def _args(script, tmp_path, *argv):
  return script.parse_args(
      [f"--workdir={tmp_path}/runs", f"--results-dir={tmp_path}/results", *argv]
  )


def test_ga_config_is_the_default_model_with_test_sized_train_recall():
  config = load_repo_module(
      "configs/css_synth.py", "css_synth_config"
  ).get_config("ga")
  config_base.validate(config, num_devices=1)
  default = load_repo_module(
      "configs/css_synth.py", "css_synth_default"
  ).get_config()
  assert config.model.to_dict() == default.model.to_dict()
  assert config.loss.to_dict() == default.loss.to_dict()
  assert config.ga.adversarial.epsilon == 0 and config.ga.isotropic.gamma == 0
  assert config.eval.train_gallery == "test_size"
  # Evaluations (the learning curves) fall on the last step.
  assert config.num_train_steps % config.eval_every == 0
  assert config.num_train_steps // config.eval_every >= 2


def fake_subprocess(calls, returncode=0, output=""):
  """A stand-in for subprocess.run: writes a run's metrics.jsonl and
  `output` to its log, and exits with `returncode`."""

  def fake_run(command, stdout, stderr):
    assert stderr == subprocess.STDOUT
    calls.append(command)
    stdout.write(output)
    workdir = next(c for c in command if c.startswith("--workdir="))
    workdir = workdir.split("=", 1)[1]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(
          '{"step": 1, "train/loss": 1.0}\n'
          '{"step": 2, "test/recall@1": 0.4, "train/recall@1": 0.2, '
          '"whm": 0.3}\n'
          '{"step": 4, "test/recall@1": 0.5, "train/recall@1": 0.25, '
          '"whm": 0.33}\n'
      )
    return subprocess.CompletedProcess(command, returncode)

  return fake_run


def test_runs_pass_each_arms_overrides_and_resume(
    script, tmp_path, monkeypatch
):
  calls = []
  monkeypatch.setattr(script.subprocess, "run", fake_subprocess(calls))
  args = _args(script, tmp_path, "--override=num_train_steps=4")
  both = script.run(args, script.Run("both", 2))
  scan = script.run(args, script.Run("adversarial", 0, epsilon=1e-3))
  gamma = script.run(args, script.Run("isotropic", 0, gamma=0.1))
  assert calls[0][:3] == [sys.executable, "-m", "irtf_jax.main"]
  assert "--config=configs/css_synth.py:ga" in calls[0]
  assert "--config.ga.adversarial.epsilon=1e-06" in calls[0]
  assert "--config.ga.isotropic.gamma=0.01" in calls[0]
  assert "--config.seed=2" in calls[0]
  assert "--config.num_train_steps=4" in calls[0]
  assert "--config.ga.adversarial.epsilon=0.001" in calls[1]
  assert not any("isotropic" in c for c in calls[1])
  assert "--config.ga.isotropic.gamma=0.1" in calls[2]
  assert (both["arm"], both["seed"], both["mt"], both["ms"], both["step"]) == (
      "both",
      2,
      0.5,
      0.25,
      4,
  )
  assert [e["step"] for e in both["curve"]] == [2, 4]
  assert (scan["name"], scan["epsilon"]) == ("adversarial_eps0.001_seed0", 1e-3)
  assert gamma["name"] == "isotropic_gamma0.1_seed0"
  # A finished run is read back, not trained again.
  assert script.run(args, script.Run("both", 2)) == both
  assert len(calls) == 3
  assert both["diverged"] is None


def test_a_diverged_run_is_a_result_other_failures_raise(
    script, tmp_path, monkeypatch
):
  calls = []
  args = _args(script, tmp_path)
  monkeypatch.setattr(
      script.subprocess,
      "run",
      fake_subprocess(
          calls,
          1,
          "irtf_jax.train.NonFiniteLossError: train/loss is not "
          "finite at step 3; training stopped.\n",
      ),
  )
  result = script.run(args, script.Run("isotropic", 0, gamma=10.0))
  assert result["diverged"].startswith("irtf_jax.train.NonFiniteLossError")
  assert result["mt"] is None and result["curve"] == []
  monkeypatch.setattr(
      script.subprocess, "run", fake_subprocess(calls, 1, "MemoryError\n")
  )
  with pytest.raises(subprocess.CalledProcessError):
    script.run(args, script.Run("baseline", 0))
  assert not os.path.exists(
      tmp_path / "runs" / "baseline_seed0" / "result.json"
  )
  # Diverged runs are counted, and left out of the statistics.
  results = synthetic_results(script) + [
      {**result, "arm": "fgsm", "gamma": None, "seed": 7}
  ]
  text = script.table(results, args, wall_seconds=60)
  assert "| fgsm: FGSM adversarial training | 5 (1 diverged) | " in text
  assert script.summarize(results)["fgsm"]["diff_mt"]["n"] == 5


def test_planned_runs_are_seed_major_and_scans_skip_the_arms_values(
    script, tmp_path
):
  args = _args(
      script,
      tmp_path,
      "--seeds=3,4",
      "--scan-seeds=3",
      "--epsilon-scan=1e-6,1e-2",
      "--gamma-scan=1e-3,1e-2,1",
  )
  runs = script.planned_runs(args)
  assert runs[:5] == [(arm, 3, None, None) for arm in script.ARMS]
  assert runs[5:10] == [(arm, 4, None, None) for arm in script.ARMS]
  assert runs[10:] == [
      ("adversarial", 3, 1e-2, None),
      ("isotropic", 3, None, 1e-3),
      ("isotropic", 3, None, 1.0),
  ]


def test_paired_difference_is_a_t_interval(script):
  # By hand: d = (1, 2, 3): mean 2, sd 1, t_{0.975, 2} = 4.302652729911275.
  d = script.paired_difference(
      {0: 2.0, 1: 4.0, 2: 6.0, 9: 7.0}, {0: 1.0, 1: 2.0, 2: 3.0}
  )
  half = 4.302652729911275 / math.sqrt(3)
  assert d["n"] == 3 and d["mean"] == pytest.approx(2.0)
  assert d["sd"] == pytest.approx(1.0)
  assert (d["low"], d["high"]) == pytest.approx((2 - half, 2 + half))
  # Against scipy's paired t test on random values.
  rng = np.random.default_rng(0)
  arm, base = rng.normal(0.3, 0.05, 6), rng.normal(0.28, 0.05, 6)
  d = script.paired_difference(dict(enumerate(arm)), dict(enumerate(base)))
  interval = stats.ttest_rel(arm, base).confidence_interval(0.95)
  assert (d["low"], d["high"]) == pytest.approx((interval.low, interval.high))
  assert d["mean"] == pytest.approx(np.mean(arm - base))
  one = script.paired_difference({0: 1.0}, {0: 0.5})
  assert one["n"] == 1 and math.isnan(one["low"])


def synthetic_results(script, seeds=range(5)):
  rng = np.random.default_rng(1)
  results = []
  for seed in seeds:
    for arm in script.ARMS:
      values = {k: float(rng.uniform(0.1, 0.6)) for k in script.METRICS}
      results.append({
          "name": f"{arm}_seed{seed}",
          "arm": arm,
          "seed": seed,
          "epsilon": None,
          "gamma": None,
          "seconds": 60.0,
          "load": [1.0, 2.0],
          "step": 4,
          **values,
          "curve": [{"step": 2, **values}, {"step": 4, **values}],
          "command": "python -m irtf_jax.main",
      })
  for kind, value in (("epsilon", 1e-2), ("gamma", 1.0)):
    arm = "adversarial" if kind == "epsilon" else "isotropic"
    results.append({
        **results[0],
        "name": f"scan_{kind}",
        "arm": arm,
        "seed": 0,
        "epsilon": None,
        "gamma": None,
        kind: value,
        "mt": 0.123,
    })
  return results


def test_table_reports_means_stds_and_paired_intervals(script, tmp_path):
  args = _args(
      script, tmp_path, "--epsilon-scan=1e-6,1e-2", "--gamma-scan=1e-2,1"
  )
  results = synthetic_results(script)
  text = script.report(results, args, wall_seconds=600)
  assert text == open(tmp_path / "results" / "table.md").read()
  rows = {
      line.split(":")[0].strip("| "): line.split(" | ")
      for line in text.splitlines()
      if re.match(r"\| [a-z]+: ", line)
  }
  assert set(rows) == set(script.ARMS)
  for arm in script.ARMS:
    runs = {
        r["seed"]: r
        for r in results
        if r["arm"] == arm and r["epsilon"] is None and r["gamma"] is None
    }
    base = {r["seed"]: r for r in results if r["name"].startswith("baseline")}
    assert rows[arm][1] == "5"
    for column, key in enumerate(script.METRICS):
      values = 100 * np.array([runs[s][key] for s in sorted(runs)])
      mean, std = re.fullmatch(
          r"([\d.]+) \+- ([\d.]+)", rows[arm][2 + column]
      ).groups()
      assert float(mean) == round(values.mean(), 2)
      assert float(std) == round(values.std(ddof=1), 2)
      if arm == "baseline":
        continue
      diff = 100 * np.array([runs[s][key] - base[s][key] for s in sorted(runs)])
      interval = stats.ttest_rel(
          values, 100 * np.array([base[s][key] for s in sorted(runs)])
      ).confidence_interval(0.95)
      cell = rows[arm][5 + column].strip(" |")
      assert cell == (
          f"{diff.mean():+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"
      )
  # Each scan lists the arm's run at the paper's value and the scanned one.
  assert "| 1e-06 | 1 | " in text and "| 0.01 | 1 | 12.30 |" in text
  assert "| 1 | 1 | 12.30 |" in text
  assert "27 runs, 27.0 min of training" in text
  saved = json.load(open(tmp_path / "results" / "results.json"))
  assert len(saved["runs"]) == 27
  assert saved["summary"]["fgsm"]["n"] == 5
  for name in ("arms.png", "curves.png", "sensitivity.png"):
    assert (tmp_path / "results" / name).stat().st_size > 1000
