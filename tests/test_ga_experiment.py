"""scripts/ga_experiment.py: its config, its run commands and its table."""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

from irtf_jax import config_base
from tests.helpers import load_repo_module


def _args(**kwargs):
  defaults = dict(workdir="w", config="configs/css_synth.py:ga", seeds="0,1,2",
                  epsilon=1e-6, gamma=1e-2, fgsm_epsilon=1e-2, override=[],
                  epsilon_scan=[1e-3])
  defaults.update(kwargs)
  return argparse.Namespace(**defaults)


def test_ga_config_is_the_default_model_with_one_evaluation():
  config = load_repo_module("configs/css_synth.py", "css_synth_config").get_config("ga")
  config_base.validate(config, num_devices=1)
  default = load_repo_module("configs/css_synth.py", "css_synth_default").get_config()
  assert config.model.to_dict() == default.model.to_dict()
  assert config.loss.to_dict() == default.loss.to_dict()
  assert config.num_train_steps == config.eval_every  # one evaluation
  assert config.ga.adversarial.epsilon == 0 and config.ga.isotropic.gamma == 0


def test_runs_pass_each_variants_overrides(tmp_path, monkeypatch):
  script = load_repo_module("scripts/ga_experiment.py", "ga_experiment")
  commands = []

  def fake_run(command, check):
    assert check
    commands.append(command)
    workdir = next(c for c in command if c.startswith("--workdir="))
    workdir = workdir.split("=", 1)[1]
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write('{"step": 1, "train/loss": 1.0}\n'
              '{"step": 2, "test/recall@1": 0.5, "train/recall@1": 0.25, '
              '"whm": 0.33}\n')

  monkeypatch.setattr(script.subprocess, "run", fake_run)
  args = _args(workdir=str(tmp_path))
  both = script.run_variant(args, "both", 2)
  scan = script.run_variant(args, "adversarial", 0, epsilon=1e-3)
  assert commands[0][:3] == [sys.executable, "-m", "irtf_jax.main"]
  assert "--config.ga.adversarial.epsilon=1e-06" in commands[0]
  assert "--config.ga.isotropic.gamma=0.01" in commands[0]
  assert "--config.seed=2" in commands[0]
  assert "--config.ga.adversarial.epsilon=0.001" in commands[1]
  assert (both["variant"], both["mt"], both["ms"]) == ("both", 0.5, 0.25)
  assert scan["variant"] == "adversarial_eps0.001"


def test_table_reports_mean_and_sample_std_over_seeds():
  script = load_repo_module("scripts/ga_experiment.py", "ga_experiment")
  rng = np.random.default_rng(0)
  results = [{"variant": v, "seed": s, "ms": rng.uniform(), "mt": rng.uniform(),
              "whm": rng.uniform()}
             for v in ("baseline", "fgsm") for s in range(3)]
  results.append({"variant": "adversarial_eps0.001", "seed": 0, "ms": 0.1,
                  "mt": 0.2, "whm": 0.3})
  text = script.table(results, _args(), wall_seconds=600)
  rows = {line.split(":")[0].strip("| "): line for line in text.splitlines()
          if line.startswith("| ") and ":" in line}
  assert set(rows) == {"baseline", "fgsm", "adversarial_eps0.001"}
  for variant in ("baseline", "fgsm"):
    cells = re.findall(r"([\d.]+) \+- ([\d.]+)", rows[variant])
    for (mean, std), key in zip(cells, ("ms", "mt", "whm")):
      values = 100 * np.array([r[key] for r in results
                               if r["variant"] == variant])
      assert float(mean) == round(values.mean(), 2)
      assert float(std) == round(values.std(ddof=1), 2)
  assert "10.00 +- n/a | 20.00 +- n/a | 30.00 +- n/a" in rows[
      "adversarial_eps0.001"]
  assert "7 runs, 10.0 min wall time" in text
