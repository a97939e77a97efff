"""benchmarks/run_all.py in its smoke mode: every benchmark runs and reports."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_run_all_smoke_runs_every_benchmark(tmp_path):
  out = tmp_path / "all.json"
  finished = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "benchmarks", "run_all.py"),
          "--smoke",
          f"--json-out={out}",
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      timeout=900,
      check=False,
      # One device at the default optimization level (tests/conftest.py).
      env={**os.environ, "XLA_FLAGS": ""},
  )
  assert out.exists(), finished.stderr[-3000:]
  result = json.loads(out.read_text())
  failed = {name: r for name, r in result["benchmarks"].items() if "error" in r}
  assert not failed, json.dumps(failed, indent=1)[-3000:]
  assert finished.returncode == 0
  assert result["device"]["platform"] == "cpu"
  assert result["smoke"] is True
  benchmarks = result["benchmarks"]
  # Both sides of every comparison are present, measured in the same run.
  for name in ("train_step_32px_b4_float32", "train_step_32px_b4_bfloat16"):
    assert benchmarks[name]["jax"]["base"] > 0, name
    assert benchmarks[name]["torch"]["base"] > 0, name
  ranking = benchmarks["ranking_2k"]
  assert ranking["matmul_floor_seconds"] > 0
  assert ranking["recalls_identical"] is True
  end_to_end = benchmarks["end_to_end"]
  for side in ("irtf_jax", "torch"):
    assert end_to_end["train"][side] > 0
    assert end_to_end["evaluate"][side] > 0
  assert benchmarks["isotropic_noise"]["ms_per_update"]["baseline"] > 0
