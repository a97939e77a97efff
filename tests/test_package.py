"""The package as a whole: its imports point down the layers that
CONTRIBUTING.md describes (import-linter's contract in setup.cfg)."""

from __future__ import annotations

import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_point_down_the_layers():
  lint_imports = shutil.which("lint-imports")
  assert lint_imports, "import-linter is part of the test extra"
  done = subprocess.run([lint_imports, "--no-cache"], cwd=REPO,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert "1 kept, 0 broken" in done.stdout
