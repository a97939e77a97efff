"""Models: image encoders, text encoders, composers, and the retrieval model.

`build_model(config.model, vocab_size)` is the one place a config becomes a
model; composers join the registry in `composers.py` with `@register(name)`.
"""

from __future__ import annotations

import jax.numpy as jnp

from irtf_jax.models.composers import COMPOSERS, register
from irtf_jax.models.retrieval import RetrievalModel

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(precision: str):
  """config.precision -> computation dtype of the convolutional parts."""
  if precision not in _DTYPES:
    raise ValueError(f"config.precision: unknown {precision!r}; allowed: "
                     f"{', '.join(_DTYPES)}")
  return _DTYPES[precision]


def build_model(model_config, vocab_size: int, *, precision: str = "float32",
                bn_axis_name: str | None = None) -> RetrievalModel:
  """The RetrievalModel that `config.model` describes."""
  if model_config.name not in COMPOSERS:
    raise ValueError(f"config.model.name: unknown {model_config.name!r}; "
                     f"allowed: {', '.join(sorted(COMPOSERS))}")
  text = model_config.text_encoder
  return RetrievalModel(
      composer=model_config.name,
      vocab_size=vocab_size,
      embed_dim=model_config.embed_dim,
      image_depth=model_config.image_encoder.depth,
      word_embed_dim=text.word_embed_dim,
      text_hidden_dim=text.hidden_dim,
      text_dropout=text.dropout,
      normalization_scale=model_config.normalization_scale,
      conv_implementation=model_config.conv_implementation,
      bn_axis_name=bn_axis_name,
      dtype=compute_dtype(precision))


__all__ = ["COMPOSERS", "register", "RetrievalModel", "build_model",
           "compute_dtype"]
