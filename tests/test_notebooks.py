"""notebooks/: stored without outputs, listed in the README, and executed.

Each notebook runs with papermill in a subprocess at SMOKE size on 8 fake
CPU devices, from the checkout (its install cell finds irtf_jax importable
and installs nothing, so nothing reaches the network); a failing cell fails
the test.
"""

import base64
import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("quickstart", "ga_in_your_optax_loop", "results")
REPO_URL = "https://github.com/irtf-jax/irtf-jax"


def _read(name):
  return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code_cells(notebook):
  return [c for c in notebook.cells if c.cell_type == "code"]


def _outputs(notebook):
  return [o for c in _code_cells(notebook) for o in c.outputs]


def _text(notebook) -> str:
  """Everything the notebook's cells printed or displayed as text."""
  parts = []
  for output in _outputs(notebook):
    if output.output_type == "stream":
      parts.append(output.text)
    elif "data" in output:
      parts.append(output.data.get("text/markdown", ""))
      parts.append(output.data.get("text/plain", ""))
  return "\n".join(parts)


def _images(notebook) -> list[bytes]:
  return [
      base64.b64decode(o.data["image/png"])
      for o in _outputs(notebook)
      if "data" in o and "image/png" in o.data
  ]


# On an oversubscribed CPU one of the 8 device threads of a pmap collective
# can arrive later than XLA's default 40 s. The deadlocks this test used to
# hit (6 or 7 of 8 device threads at an all-reduce for 600 s, in 2 of 14 CI
# runs) were the trainer's: DataParallel.unreplicate dispatched a gather per
# leaf while the step still ran, and in the deadlock's stacks the XLA:CPU
# client's threads were held by calls waiting for the step's outputs or for
# their device's turn, while the step's last devices never started. It now
# only transfers.
EIGHT_DEVICES = (
    "--xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
)


def execute(name, tmp_path, xla_flags=EIGHT_DEVICES, **parameters):
  """Runs notebooks/<name>.ipynb with SMOKE=True and `parameters` under
  `xla_flags`; returns the executed notebook."""
  output = tmp_path / f"{name}.out.ipynb"
  env = {
      **os.environ,  # with the suite's compilation cache (tests/conftest.py)
      "XLA_FLAGS": xla_flags,
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": os.pathsep.join(
          [str(REPO)]
          + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
      ),
  }
  env.pop("MPLBACKEND", None)  # the inline backend makes the image outputs
  command = [
      sys.executable,
      "-m",
      "papermill",
      str(NOTEBOOKS / f"{name}.ipynb"),
      str(output),
      "--cwd",
      str(NOTEBOOKS),
      "--kernel",
      "python3",
      "--no-progress-bar",
      "-p",
      "SMOKE",
      "True",
  ]
  for key, value in parameters.items():
    command += ["-p", key, str(value)]
  process = subprocess.run(
      command, env=env, capture_output=True, text=True, check=False, timeout=900
  )
  assert (
      process.returncode == 0
  ), f"{name}.ipynb failed:\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
  notebook = nbformat.read(output, as_version=4)
  errors = [o for o in _outputs(notebook) if o.output_type == "error"]
  assert not errors, errors
  return notebook


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
  notebook = _read(name)
  for cell in _code_cells(notebook):
    assert cell.outputs == [], (name, cell.source[:80])
    assert cell.execution_count is None, (name, cell.source[:80])
  assert "widgets" not in notebook.metadata


@pytest.mark.parametrize("name", NAMES)
def test_notebook_installs_from_repo_url_then_takes_parameters(name):
  install, parameters = _code_cells(_read(name))[:2]
  assert f'REPO_URL = "{REPO_URL}"' in install.source
  assert 'find_spec("irtf_jax")' in install.source  # no install if importable
  assert "parameters" in parameters.metadata.get("tags", [])
  assert "SMOKE = False" in parameters.source


@pytest.mark.parametrize("name", NAMES)
def test_readme_lists_notebook_with_colab_badge(name):
  readme = (REPO / "README.md").read_text()
  section = readme.split("## Notebooks")[1].split("\n## ")[0]
  assert (
      "(https://colab.research.google.com/github/irtf-jax/irtf-jax/"
      f"blob/main/notebooks/{name}.ipynb)"
  ) in section
  assert f"`notebooks/{name}.ipynb`" in section


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text())


def _run_quickstart(tmp_path, **parameters):
  """Runs the quickstart notebook, its training run in tmp_path / "run".

  Returns:
    (the executed notebook, its text, the run's folder, its config.json).
  """
  workdir = tmp_path / "run"
  notebook = execute(
      "quickstart",
      tmp_path,
      WORKDIR=workdir,
      DATA_DIR=tmp_path / "data",
      **parameters,
  )
  return notebook, _text(notebook), workdir, _read_json(workdir / "config.json")


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_shows_results(tmp_path):
  notebook, text, workdir, config = _run_quickstart(tmp_path)
  # CPU: the default strategy, over the 8 devices of one program.
  assert "strategy: jit over 8 devices, precision float32" in text
  assert config["parallel"]["strategy"] == "jit"
  pictures = sorted(workdir.glob("retrievals_step*.png"))
  assert pictures
  images = _images(notebook)
  assert pictures[-1].read_bytes() in images  # the trainer's grid, inline
  assert len(images) >= 2  # and the learning curves
  assert "| test |" in text and "| WHM |" in text


@pytest.mark.slow
def test_quickstart_tpu_branch_runs_pmap_over_all_8_devices(tmp_path):
  notebook, text, workdir, config = _run_quickstart(tmp_path, FORCE_PMAP=True)
  assert "strategy: pmap over 8 devices, precision bfloat16" in text
  assert "trained with strategy pmap over 8 devices" in text
  assert config["parallel"]["strategy"] == "pmap"
  assert config["precision"] == "bfloat16"
  evaluations = [
      json.loads(line)
      for line in (workdir / "metrics.jsonl").read_text().splitlines()
      if "test/recall@1" in line
  ]
  assert evaluations and evaluations[-1]["step"] == config["num_train_steps"]
  assert _images(notebook)


@pytest.mark.slow
def test_ga_in_your_optax_loop(tmp_path):
  notebook = execute("ga_in_your_optax_loop", tmp_path)
  text = _text(notebook)
  # The notebook asserts each arm's penalty and noise are on exactly when
  # asked for; here: its plots and its comparison table came out.
  assert len(_images(notebook)) >= 2
  for arm in ("none", "adversarial", "isotropic", "both"):
    assert f"| {arm} |" in text


@pytest.mark.slow
def test_results_runs_the_ga_experiment_and_plots_it(tmp_path):
  experiment = tmp_path / "experiment"
  # One device at the default level: its training runs are command-line runs
  # (started by scripts/ga_experiment.py), with no collective to wait on.
  notebook = execute(
      "results",
      tmp_path,
      xla_flags="",
      EXPERIMENT_DIR=experiment,
      DATA_DIR=tmp_path / "data",
  )
  results = _read_json(experiment / "results" / "results.json")
  # SMOKE: one seed of the two arms (the paired statistics over seeds are
  # tested in tests/test_scripts_ga_experiment.py).
  assert {(r["arm"], r["seed"]) for r in results["runs"]} == {
      ("baseline", 0),
      ("isotropic", 0),
  }
  assert results["summary"]["isotropic"]["diff_mt"]["n"] == 1
  text = _text(notebook)
  assert "2 runs; GA experiment results:" in text
  assert "| isotropic | 1 |" in text
  assert len(_images(notebook)) >= 4  # curves, recall@K, WHM, paired arms
