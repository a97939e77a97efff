"""The package as a whole: its imports point down the layers that
CONTRIBUTING.md describes (import-linter's contract in setup.cfg)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_point_down_the_layers():
  lint_imports = shutil.which("lint-imports")
  assert lint_imports, "import-linter is part of the test extra"
  done = subprocess.run(
      [lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert "1 kept, 0 broken" in done.stdout


def module_names() -> set[str]:
  """Every module and folder a test file may be named after, as
  `path_with_underscores`: irtf_jax's modules without the package prefix
  (`models/layers.py` -> `models_layers`), and the repository's other
  folders and scripts (`scripts/ga_experiment.py` -> `scripts_ga_experiment`,
  `benchmarks`, `configs`, `notebooks`), plus `readme` and `package`."""
  names = {"readme", "package"}
  for root, prefix in ((os.path.join(REPO, "irtf_jax"), ""), (REPO, "")):
    for folder, dirs, files in os.walk(root):
      dirs[:] = [
          d
          for d in dirs
          if not d.startswith((".", "_"))
          and d != "tests"
          and not d.endswith(".egg-info")
      ]
      relative = os.path.relpath(folder, root)
      parts = [] if relative == "." else relative.split(os.sep)
      if parts:
        names.add(prefix + "_".join(parts))
      for name in files:
        if name.endswith(".py") and not name.startswith("_"):
          names.add(prefix + "_".join(parts + [name[:-3]]))
  return names


def test_test_files_are_named_after_what_they_test():
  """tests/test_<module>[_<aspect>].py, so a module's tests are found by
  its name (CONTRIBUTING.md)."""
  names = module_names()
  misnamed = []
  for name in sorted(os.listdir(os.path.join(REPO, "tests"))):
    if not (name.startswith("test_") and name.endswith(".py")):
      continue
    subject = name[len("test_") : -len(".py")]
    words = subject.split("_")
    if not any("_".join(words[:n]) in names for n in range(len(words), 0, -1)):
      misnamed.append(name)
  assert not misnamed, (
      f"{misnamed}: name each after the module it tests, "
      "e.g. tests/test_models_layers.py for "
      "irtf_jax/models/layers.py"
  )


SOURCES = ("irtf_jax", "tests", "benchmarks", "scripts", "configs")


@pytest.mark.slow  # pyink takes about 30 s over the tree
def test_code_is_formatted_and_lint_free():
  """pyink (pyproject.toml) formats, ruff (ruff.toml) lints; the fix for a
  failure is `pyink irtf_jax tests benchmarks scripts configs` and
  `ruff check --fix ...` (CONTRIBUTING.md)."""
  for tool in ("pyink", "ruff"):
    assert shutil.which(tool), f"{tool} is part of the test extra"
  formatted = subprocess.run(
      ["pyink", "--check", *SOURCES], cwd=REPO, capture_output=True, text=True
  )
  assert formatted.returncode == 0, formatted.stderr[-4000:]
  linted = subprocess.run(
      ["ruff", "check", "--no-cache", *SOURCES],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert linted.returncode == 0, linted.stdout[-4000:]
