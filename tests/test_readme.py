"""The README's commands and code are the ones the project runs."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_ci_runs_the_readme_test_command():
  text = README.read_text()
  command = next(
      line
      for line in text.splitlines()
      if re.match(r"^pip install .*pytest", line)
  )
  assert "'.[test]'" in command
  ci = (README.parent / ".ci" / "run").read_text()
  assert "README.md" in ci and "eval" in ci


def test_optax_example_runs_and_learns(tmp_path):
  text = README.read_text()
  section = text.split("## Gradient Augmentation in your own JAX code")[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  script = tmp_path / "example.py"
  script.write_text(code)
  env = {**os.environ, "PYTHONPATH": str(README.parent)}
  out = subprocess.run(
      [sys.executable, str(script)],
      capture_output=True,
      text=True,
      check=True,
      cwd=tmp_path,
      env=env,
  ).stdout
  found = re.search(r"loss ([0-9.]+), penalty ([0-9.]+), noise ([0-9.]+)", out)
  final, penalty, noise = (float(v) for v in found.groups())
  # The parameters start at zero, so the initial loss is mean(target^2).
  x = jax.random.normal(jax.random.key(0), (64, 8))
  initial = float(jnp.mean(jnp.sin(x[:, :1]) ** 2))
  assert final < 0.5 * initial  # it trained
  assert penalty > 0 and noise > 0  # both regularizers acted
