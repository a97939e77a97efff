"""benchmarks/run_all.py in its smoke mode: every benchmark runs and reports;
benchmarks/step_profile.py sorts a step's operations by what they compute."""

import importlib
import json
import os
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
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


@pytest.fixture
def step_profile(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  return importlib.import_module("step_profile")


def compiled_kinds(step_profile, function, *args) -> set[str]:
  hlo = jax.jit(function).lower(*args).compile().as_text()
  return set(step_profile.operation_kinds(hlo).values())


def test_step_profile_sorts_operations_by_what_their_hlo_computes(
    step_profile,
):
  x = np.ones((8, 6, 6, 4), np.float32)
  w = np.ones((3, 3, 4, 5), np.float32)
  two_patches = lambda x: jnp.concatenate([x[:, :-1], x[:, 1:]], axis=-1)
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  assert compiled_kinds(step_profile, two_patches, x) == {"patches"}
  assert compiled_kinds(step_profile, conv, x, w) == {"convolution"}
  assert compiled_kinds(step_profile, lambda a, b: a @ b, x[0, 0], w[0, 0]) == {
      "matmul"
  }
  assert compiled_kinds(step_profile, lambda x: jnp.sum(x, 0), x) == {
      "reduction"
  }
  assert compiled_kinds(step_profile, lambda x: jnp.tanh(x) * 2, x) == {
      "elementwise"
  }
  assert compiled_kinds(
      step_profile, lambda x: lax.top_k(x, 2), x.reshape(8, -1)
  ) == {"TopK"}


@pytest.mark.slow
def test_step_profile_smoke_accounts_for_the_traced_operations(
    step_profile, tmp_path, capsys
):
  out = tmp_path / "profile.json"
  step_profile.main([
      "--smoke",
      "--image-size=32",
      "--batch-size=4",
      "--steps=1",
      f"--json-out={out}",
  ])
  result = json.loads(out.read_text())
  assert result == json.loads(capsys.readouterr().out)
  by_kind = result["by_kind_ms_per_step"]
  assert by_kind["matmul"] > 0 and result["ms_per_step"] > 0
  np.testing.assert_allclose(
      sum(by_kind.values()), result["operations_ms_per_step"], rtol=1e-9
  )
  assert result["slowest"] and all(
      op["kind"] != "other" for op in result["slowest"]
  )


@pytest.fixture
def train_step_benchmark(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  return importlib.import_module("train_step")


def test_train_step_times_variants_in_alternating_rounds(
    train_step_benchmark,
):
  clock = [0.0]
  calls = []

  # A machine that slows by 1% with every call: a base step costs 1 unit and
  # an isotropic one 1.1 units, times the slowdown.
  def runner(variant, cost):
    def run_steps(n):
      calls.append((variant, n))
      for _ in range(n):
        clock[0] += cost * (1.0 + 0.01 * len(calls))

    return run_steps

  args = train_step_benchmark.parse_args(
      ["--repeats=4", "--steps=2", "--warmup=1", "--frameworks=jax"]
  )
  rounds = train_step_benchmark.interleaved_seconds(
      {"base": runner("base", 1.0), "isotropic": runner("isotropic", 1.1)},
      args,
      "jax",
      clock=lambda: clock[0],
  )
  assert calls == [
      ("base", 1), ("isotropic", 1),
      ("base", 2), ("isotropic", 2),
      ("isotropic", 2), ("base", 2),
      ("base", 2), ("isotropic", 2),
      ("isotropic", 2), ("base", 2),
  ]  # fmt: skip
  assert [len(r) for r in rounds.values()] == [4, 4]
  # Per round, the two timings are adjacent: their ratio is close to the
  # true 1 / 1.1 although the machine slowed by 8% over the run.
  ratio = train_step_benchmark.paired_ratio(rounds["base"], rounds["isotropic"])
  expected = [
      (1.0 + 0.01 * b) / (1.1 * (1.0 + 0.01 * i))
      for b, i in [(3, 4), (6, 5), (7, 8), (10, 9)]
  ]
  np.testing.assert_allclose(ratio, np.median(expected), rtol=1e-12)
  assert abs(ratio - 1 / 1.1) < 0.01
