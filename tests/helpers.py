"""Small builders shared by tests: tiny configs, models and random batches."""

from __future__ import annotations

import importlib.util
import os
import types

from irtf_jax.config_base import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_repo_module(path: str, name: str) -> types.ModuleType:
  """Imports a repository file outside the package (a config, a script)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
