"""Small builders shared by tests: tiny configs, models, random batches and
datasets prepared from fixtures."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pytest

from irtf_jax import data
from irtf_jax.config_base import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_repo_module(path: str, name: str) -> types.ModuleType:
  """Imports a repository file outside the package (a config, a script)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_main(
    args: list[str],
    *,
    program: tuple[str, ...] = ("-m", "irtf_jax.main"),
    timeout: float = 900,
) -> subprocess.CompletedProcess:
  """Runs the command line (or `program`, a driver wrapping it) from the
  repository as a user would: one CPU device at the default optimization
  level, with the suite's compilation cache (tests/conftest.py). Training
  runs here, not in the test process, whose level 0 compiles fast but runs
  convolutions many times slower (the 4 steps of configs/css.py:smoke took
  60 s there)."""
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="",
      PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  return subprocess.run(
      [sys.executable, *program, *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def tiny_config(**overrides):
  """A base config with a small model (fast to compile and run on CPU)."""
  config = base_config()
  config.model.name = "tirg"
  config.model.embed_dim = 32
  config.model.image_encoder.depth = 10
  config.model.text_encoder.word_embed_dim = 16
  config.model.text_encoder.hidden_dim = 16
  config.model.text_encoder.max_length = 6
  config.batch_size = 8
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def prepared_dataset(tmp_path_factory, name: str, write_fixture) -> dict:
  """Dataset `name` from a fixture, prepared once for a test module.

  Returns:
    "root" (the folder `write_fixture(root)` wrote), "written" (what it
    returned), "load" (split, **options -> the split, 16 px images unless
    image_size is given), and both splits, "train" and "test".
  """
  root = tmp_path_factory.mktemp(name)
  written = write_fixture(root)
  data_dir = str(tmp_path_factory.mktemp("data"))

  def load(split, **options):
    options.setdefault("image_size", 16)
    return data.load(
        name, split, data_dir=data_dir, manual_dir=str(root), **options
    )

  return {
      "root": root,
      "written": written,
      "load": load,
      "train": load("train"),
      "test": load("test"),
  }


def load_from(name: str, tmp_path, root, split="test", **options):
  """Split `split` of dataset `name` read from `root`, prepared into
  `tmp_path / "d"`."""
  return data.load(
      name,
      split,
      data_dir=str(tmp_path / "d"),
      manual_dir=str(root),
      **options,
  )


def load_error(name: str, tmp_path, root, error=ValueError, **options) -> str:
  """The message of the `error` that `load_from`'s test split raises."""
  with pytest.raises(error) as info:
    load_from(name, tmp_path, root, **options)
  return str(info.value)
