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

from irtf_jax.data.fixtures import random_batch
from tests.helpers import load_repo_module

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


def test_step_profile_counts_the_flops_of_untimed_dots(step_profile):
  # Compiled HLO in XLA:CPU's text form: a plain dot contracting 64 rows
  # (run asynchronously, untimed) and a YNNPACK fusion holding another dot
  # (traced as one operation, timed): only the first is counted.
  hlo = """HloModule jit_f

%fused_computation (param_0: f32[8,64], param_1: f32[64,5]) -> f32[8,5] {
  %param_0 = f32[8,64]{1,0} parameter(0)
  %param_1 = f32[64,5]{1,0} parameter(1)
  ROOT %dot.2 = f32[8,5]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.4 (a.1: f32[64,12], b.1: f32[64,5], c.1: f32[8,64]) -> (f32[12,5], f32[8,5]) {
  %a.1 = f32[64,12]{1,0} parameter(0)
  %b.1 = f32[64,5]{1,0} parameter(1)
  %c.1 = f32[8,64]{1,0} parameter(2)
  %dot_general.1 = f32[12,5]{1,0} dot(%a.1, %b.1), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
  %ynn_fusion = f32[8,5]{1,0} fusion(%c.1, %b.1), kind=kCustom, calls=%fused_computation
  ROOT %tuple = (f32[12,5]{1,0}, f32[8,5]{1,0}) tuple(%dot_general.1, %ynn_fusion)
}
"""
  assert step_profile.untimed_dots(hlo) == {
      "dot_general.1": pytest.approx(2 * 12 * 5 * 64 * 1e-9)
  }


def _hlo_loop(name: str, rows: int, result: tuple[int, int]) -> str:
  """The body and condition of an XLA:CPU while loop whose body holds a
  plain dot contracting `rows` rows into `result`, in compiled HLO text."""
  m, n = result
  carry = f"(s32[], f32[{m},{n}]{{1,0}})"
  return f"""
%{name} (p.{name}: (s32[], f32[{m},{n}])) -> (s32[], f32[{m},{n}]) {{
  %p.{name} = {carry} parameter(0)
  %a.{name} = f32[{rows},{m}]{{1,0}} constant({{...}})
  %b.{name} = f32[{rows},{n}]{{1,0}} constant({{...}})
  %dot.{name} = f32[{m},{n}]{{1,0}} dot(%a.{name}, %b.{name}), lhs_contracting_dims={{0}}, rhs_contracting_dims={{0}}
  %i.{name} = s32[] get-tuple-element(%p.{name}), index=0
  ROOT %t.{name} = {carry} tuple(%i.{name}, %dot.{name})
}}

%cond.{name} (q.{name}: (s32[], f32[{m},{n}])) -> pred[] {{
  %q.{name} = {carry} parameter(0)
  ROOT %c.{name} = pred[] constant(true)
}}
"""


def test_step_profile_counts_a_loop_bodys_dot_once_per_iteration(step_profile):
  # A kernel gradient taken in chunks: lax.scan's while loop, 16 iterations
  # XLA knows of, whose body holds a plain dot; and a loop of unknown trip
  # count, whose dot counts once.
  hlo = (
      "HloModule jit_f\n"
      + _hlo_loop("chunks", 64, (12, 5))
      + _hlo_loop("unknown", 10, (3, 3))
      + """
ENTRY %main.9 (i1: (s32[], f32[12,5]), i2: (s32[], f32[3,3])) -> f32[12,5] {
  %i1 = (s32[], f32[12,5]{1,0}) parameter(0)
  %i2 = (s32[], f32[3,3]{1,0}) parameter(1)
  %while.1 = (s32[], f32[12,5]{1,0}) while(%i1), condition=%cond.chunks, body=%chunks, backend_config={"known_trip_count":{"n":"16"}}
  %while.2 = (s32[], f32[3,3]{1,0}) while(%i2), condition=%cond.unknown, body=%unknown
  ROOT %out = f32[12,5]{1,0} get-tuple-element(%while.1), index=1
}
"""
  )
  assert step_profile.untimed_dots(hlo) == {
      "dot.chunks": pytest.approx(16 * 2 * 12 * 5 * 64 * 1e-9),
      "dot.unknown": pytest.approx(2 * 3 * 3 * 10 * 1e-9),
  }


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
  # Which dots XLA leaves unfused depends on the CPU, so not how many; but
  # every counted dot does work, and no work is reported without one.
  dots = result["untimed_dots"]
  assert isinstance(dots["count"], int)
  assert (dots["count"] > 0) == (dots["gflop_per_step"] > 0)
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


@pytest.fixture
def run_all(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  return importlib.import_module("run_all")


def test_run_all_times_pytorch_only_on_the_device_jax_uses(run_all):
  gpu = {"platform": "gpu", "torch_cuda": "NVIDIA H200"}
  assert run_all.timed_frameworks(gpu) == "jax,torch"
  assert run_all.timed_frameworks({**gpu, "torch_cuda": None}) == "jax"
  assert run_all.timed_frameworks({"platform": "tpu", "torch_cuda": None}) == (
      "jax"
  )
  assert run_all.timed_frameworks({"platform": "cpu", "torch_cuda": None}) == (
      "jax,torch"
  )
  step = run_all.plan(False, "jax")["train_step_224px_b32_float32"]
  assert "--frameworks=jax" in step


def test_run_all_times_more_steps_per_round_on_accelerators(run_all):
  # Millisecond steps on an accelerator; seconds on a CPU.
  on_gpu = run_all.plan(False, "jax,torch", accelerator=True)
  on_cpu = run_all.plan(False, "jax,torch", accelerator=False)
  assert "--steps=20" in on_gpu["train_step_64px_b200_float32"]
  assert "--steps-per-round=20" in on_gpu["isotropic_noise"]
  assert not any("--steps" in a for a in on_cpu["train_step_64px_b200_float32"])
  assert on_cpu["isotropic_noise"] == ["isotropic_noise.py"]


def test_run_all_deadline_bounds_each_benchmark_and_keeps_partial_results(
    run_all, monkeypatch, tmp_path
):
  clock = [0.0]
  out = tmp_path / "all.json"
  seen = []

  # Each benchmark takes 6 s of the fake clock; what the JSON file held when
  # it started shows the file is rewritten after every benchmark.
  def run_one(arguments, folder, timeout):
    del folder
    written = json.loads(out.read_text()) if out.exists() else None
    seen.append((arguments[0], timeout, written))
    clock[0] += 6.0
    return {"seconds": 6.0}

  monkeypatch.setattr(run_all, "run_one", run_one)
  monkeypatch.setattr(run_all.time, "perf_counter", lambda: clock[0])
  monkeypatch.setattr(
      run_all,
      "device_description",
      lambda: {"platform": "cpu", "torch_cuda": None},
  )
  status = run_all.main([
      "--only=ranking_100k,ranking_30k,end_to_end",
      "--deadline=10",
      f"--json-out={out}",
  ])
  assert status == 1  # a skipped benchmark counts as not run
  # In --only's order; the second gets what is left of the 10 s.
  assert [(a, t) for a, t, _ in seen] == [
      ("ranking.py", 10.0),
      ("ranking.py", 4.0),
  ]
  assert seen[0][2] is None
  assert list(seen[1][2]["benchmarks"]) == ["ranking_100k"]
  result = json.loads(out.read_text())
  assert list(result["benchmarks"]) == [
      "ranking_100k",
      "ranking_30k",
      "end_to_end",
  ]
  assert "--deadline=10" in result["benchmarks"]["end_to_end"]["error"]
  assert result["benchmarks"]["ranking_30k"]["wall_seconds"] == 6.0


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_torch_reference_computes_in_the_precision_asked_for(precision):
  import torch  # pylint: disable=g-import-not-at-top

  torch_reference = load_repo_module(
      "benchmarks/torch_reference.py", "torch_reference"
  )
  trainer = torch_reference.Trainer(
      vocab_size=20, device="cpu", precision=precision
  )
  dtypes = []
  trainer.model.image_encoder.conv1.register_forward_hook(
      lambda module, inputs, output: dtypes.append(output.dtype)
  )
  batch = random_batch(0, batch_size=2, image_size=32, vocab_size=20)
  before = trainer.model.image_projection.weight.detach().clone()
  loss = trainer.step(torch_reference.to_torch(batch))
  assert np.isfinite(loss)
  assert set(dtypes) == {getattr(torch, precision)}
  # The step's parameters stay float32 and move.
  after = trainer.model.image_projection.weight
  assert after.dtype == torch.float32 and not torch.equal(before, after)
  with pytest.raises(ValueError, match="precision='float16'"):
    torch_reference.Trainer(vocab_size=20, device="cpu", precision="float16")


SIDE_SCRIPT = """
import argparse, os, sys
sys.path.insert(0, {benchmarks!r})
import cli
parser = argparse.ArgumentParser()
cli.add_side_flag(parser)
args = parser.parse_args()
seen = lambda args: {{"seen": os.environ.get("GLIBC_TUNABLES", "")}}
cli.answer_side(args, {{"jax": seen, "torch": seen}})
"""


def test_each_side_runs_with_the_memory_settings_its_users_get(
    tmp_path, monkeypatch
):
  """The JAX side starts as `python -m irtf_jax.main` restarts itself (huge
  pages), the PyTorch side with the C library's defaults; both answers say
  which."""
  from irtf_jax import host_memory  # pylint: disable=g-import-not-at-top

  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  cli = importlib.import_module("cli")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(host_memory.OPT_OUT, raising=False)
  script = tmp_path / "sides.py"
  script.write_text(
      SIDE_SCRIPT.format(benchmarks=os.path.join(REPO, "benchmarks"))
  )
  jax_side = cli.run_side(str(script), "jax", [])
  torch_side = cli.run_side(str(script), "torch", [])
  # glibc, on every CI machine: the tunable alone is what the JAX side gets.
  expected = host_memory.HUGE_PAGES
  assert host_memory.huge_page_environment({}) == {"GLIBC_TUNABLES": expected}
  assert jax_side == {"seen": expected, "glibc_tunables": expected}
  assert torch_side == {"seen": "", "glibc_tunables": ""}
