"""Pretrained weights into a model's initialized variables (host side).

The split big_vision makes between a model and its `load`: the model
(`RetrievalModel`) only computes, and `load_pretrained(variables, config)`
replaces parts of its initialized variables with the files' weights, outside
any compiled function (inside one, they would become compile-time constants).
Every tensor is checked against the model's shapes.
"""

from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp

from irtf_jax.models import sentence_encoder
from irtf_jax.models.bert import bert_config_from_checkpoint
from irtf_jax.models.bert import bert_params_from_checkpoint
from irtf_jax.models.image_encoders import resnet_variables_from_torch


def load_pretrained(variables: Any, model_config) -> dict:
  """`variables` with the weights `config.model` names put in.

  Args:
    variables: {"params", "batch_stats"} of the `RetrievalModel` that
      `build_model(model_config, ...)` returns (arrays or shape structs).
    model_config: `config.model`: `image_encoder.pretrained` (a torchvision
      ResNet state dict, .pth or .safetensors), and for the text encoder
      "sentence_transformer" its `pretrained` folder, for "precomputed" its
      `features` file.

  Returns:
    The variables with those parts replaced (unchanged when none is named).

  Raises:
    ValueError: a file's tensors do not match the model (names or shapes).
  """
  image_path = model_config.image_encoder.get("pretrained", "")
  text = model_config.text_encoder
  kind = text.get("name", "lstm")
  text_path = {
      "sentence_transformer": text.get("pretrained", ""),
      "precomputed": text.get("features", ""),
  }.get(kind, "")
  if not (image_path or text_path):
    return variables
  variables = flax.core.unfreeze(variables)
  if image_path:
    loaded = resnet_variables_from_torch(
        image_path, model_config.image_encoder.depth
    )
    for collection in ("params", "batch_stats"):
      variables[collection]["image_encoder"] = _replace(
          variables[collection]["image_encoder"], loaded[collection], image_path
      )
  text_params = variables["params"]["text_encoder"]
  if kind == "sentence_transformer" and text_path:
    bert = bert_config_from_checkpoint(text_path)
    text_params["encoder"] = _replace(
        text_params["encoder"],
        bert_params_from_checkpoint(text_path, bert),
        text_path,
    )
  if kind == "precomputed" and text_path:
    table = sentence_encoder.PrecomputedTextFeatures(text_path)
    text_params["features"] = _replace(
        text_params["features"], table.features, text_path
    )
  return variables


def _replace(current, loaded, path):
  """`loaded` (a tree like `current`), checked leaf by leaf for shape."""
  flatten = lambda tree: (
      flax.traverse_util.flatten_dict(tree, sep="/")
      if isinstance(tree, dict)
      else {"": tree}
  )
  flat_current, flat_loaded = flatten(current), flatten(loaded)
  if set(flat_current) != set(flat_loaded):
    missing = sorted(set(flat_current) - set(flat_loaded))
    extra = sorted(set(flat_loaded) - set(flat_current))
    raise ValueError(
        f"{path}: weights do not match the model (missing "
        f"{missing[:3]}, unexpected {extra[:3]})"
    )
  for name, value in flat_current.items():
    if tuple(value.shape) != tuple(flat_loaded[name].shape):
      raise ValueError(
          f"{path}: {name or 'table'} has shape "
          f"{tuple(flat_loaded[name].shape)}, the model expects "
          f"{tuple(value.shape)}"
      )
  if not isinstance(current, dict):
    return jnp.asarray(loaded, current.dtype)
  return flax.traverse_util.unflatten_dict(
      {
          k: jnp.asarray(v, flat_current[k].dtype)
          for k, v in flat_loaded.items()
      },
      sep="/",
  )
