"""Models: image encoders, text encoders, composers, and the retrieval model.

`build_model(config.model, vocab_size)` is the one place a config becomes a
model, `build_text_tokenizer(config.model, texts)` the host-side tokenizer
that goes with its text encoder, and `parameter_labels(config.model)` the
optimizer groups (pretrained backbone, frozen weights). Composers join the
registry with `@register(name)`: TIRG's in `composers.py`, TIRG's baselines in
`tirg_baselines.py`, ComposeAE in `compose_ae.py`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from irtf_jax.models import (
    compose_ae,  # registers compose_ae, real_space_concat_ae
)
from irtf_jax.models import initializers
from irtf_jax.models import sentence_encoder
from irtf_jax.models import tirg_baselines  # registers TIRG's baselines
from irtf_jax.models import torch_order
from irtf_jax.models.bert import bert_config_from_checkpoint
from irtf_jax.models.composers import COMPOSERS
from irtf_jax.models.composers import register
from irtf_jax.models.image_encoders import RESNET_DEPTHS
from irtf_jax.models.initializers import INITIALIZATIONS
from irtf_jax.models.layers import CONV_IMPLEMENTATIONS
from irtf_jax.models.loading import load_pretrained
from irtf_jax.models.retrieval import TEXT_ENCODERS
from irtf_jax.models.retrieval import RetrievalModel
from irtf_jax.models.retrieval import normalize_images
from irtf_jax.models.sentence_encoder import TextTokenizer
from irtf_jax.models.text_encoders import Vocabulary

del compose_ae, tirg_baselines

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRECISIONS = tuple(_DTYPES)

# config.model.<group> fields passed to composers of these names.
_COMPOSER_OPTION_GROUPS = {
    "compose_ae": "compose_ae",
    "real_space_concat_ae": "compose_ae",
}


def compute_dtype(precision: str):
  """config.precision -> computation dtype of the convolutional parts."""
  if precision not in _DTYPES:
    raise ValueError(
        f"config.precision: unknown {precision!r}; allowed: "
        f"{', '.join(_DTYPES)}"
    )
  return _DTYPES[precision]


def _text_encoder_name(model_config) -> str:
  name = model_config.text_encoder.get("name", "lstm")
  if name not in TEXT_ENCODERS:
    raise ValueError(
        f"config.model.text_encoder.name: unknown {name!r}; "
        f"allowed: {', '.join(TEXT_ENCODERS)}"
    )
  return name


def _required_path(model_config, field: str, encoder: str) -> str:
  path = model_config.text_encoder.get(field, "")
  if not path:
    raise ValueError(
        f"config.model.text_encoder.{field}: required for "
        f"text_encoder.name={encoder!r}; set it to "
        + (
            "a sentence-transformers model folder"
            if field == "pretrained"
            else "an .npz file with arrays `texts` and `features`"
        )
    )
  return path


def build_text_tokenizer(model_config, texts: Sequence[str]) -> TextTokenizer:
  """The host-side tokenizer of config.model.text_encoder.name: a Vocabulary
  of `texts` ("lstm"), the checkpoint's WordPiece tokenizer
  ("sentence_transformer"), or the feature file's text index ("precomputed").
  `len(tokenizer)` is the `vocab_size` build_model wants."""
  name = _text_encoder_name(model_config)
  if name == "lstm":
    return Vocabulary.build(texts)
  if name == "sentence_transformer":
    return sentence_encoder.WordPieceTokenizer(
        _required_path(model_config, "pretrained", name)
    )
  return sentence_encoder.PrecomputedTextFeatures(
      _required_path(model_config, "features", name)
  )


def _composer_options(model_config) -> tuple:
  group = _COMPOSER_OPTION_GROUPS.get(model_config.name)
  if group is None or group not in model_config:
    return ()
  fields = COMPOSERS[model_config.name].__dataclass_fields__
  return tuple(
      (k, v) for k, v in sorted(model_config[group].items()) if k in fields
  )


def build_model(
    model_config,
    vocab_size: int,
    *,
    precision: str = "float32",
    bn_axis_name: str | None = None,
) -> RetrievalModel:
  """The RetrievalModel that `config.model` describes."""
  if model_config.name not in COMPOSERS:
    raise ValueError(
        f"config.model.name: unknown {model_config.name!r}; "
        f"allowed: {', '.join(sorted(COMPOSERS))}"
    )
  text = model_config.text_encoder
  encoder = _text_encoder_name(model_config)
  word_embed_dim = text.word_embed_dim
  extra = {}
  if encoder == "sentence_transformer":
    folder = _required_path(model_config, "pretrained", encoder)
    bert = bert_config_from_checkpoint(folder)
    extra = dict(bert=bert)
    vocab_size, word_embed_dim = bert.vocab_size, bert.hidden_size
  elif encoder == "precomputed":
    path = _required_path(model_config, "features", encoder)
    with np.load(path, allow_pickle=False) as archive:
      if "features" not in archive or archive["features"].ndim != 2:
        raise ValueError(
            f"{path}: needs a 2-D array `features` (N, F) and `texts` (N,)"
        )
      num_texts, feature_dim = archive["features"].shape
    extra = dict(num_texts=num_texts, text_feature_dim=feature_dim)
    vocab_size, word_embed_dim = num_texts, feature_dim
  return RetrievalModel(
      composer=model_config.name,
      vocab_size=vocab_size,
      embed_dim=model_config.embed_dim,
      image_depth=model_config.image_encoder.depth,
      word_embed_dim=word_embed_dim,
      text_hidden_dim=text.hidden_dim,
      text_dropout=text.dropout,
      normalization_scale=model_config.normalization_scale,
      conv_implementation=model_config.conv_implementation,
      bn_axis_name=bn_axis_name,
      dtype=compute_dtype(precision),
      composer_options=_composer_options(model_config),
      text_encoder_kind=encoder,
      initialization=initializers.check(model_config.init),
      **extra,
  )


def official_parameter_positions(model_config) -> Callable:
  """params -> same-structure tree of each leaf's 1-based position in the
  official PyTorch model's `named_parameters()` order: the
  `registration_order` of isotropic GA's "official" scaling."""
  if model_config.name not in COMPOSERS:
    raise ValueError(
        f"config.model.name: unknown {model_config.name!r}; "
        f"allowed: {', '.join(sorted(COMPOSERS))}"
    )
  return torch_order.official_parameter_positions(COMPOSERS[model_config.name])


def parameter_labels(model_config) -> Callable | None:
  """params -> same-structure tree of "default" | "backbone" | "frozen", or
  None when every parameter is trained alike.

  "backbone": the image encoder (ResNet), trained at
  `image_encoder.lr_multiplier` times the learning rate (TIRG: 0.1 for the
  ImageNet-pretrained ResNet on real datasets); "frozen": the sentence
  encoder's BERT weights when `text_encoder.trainable` is False, and always
  the precomputed feature table. The projections stay "default".
  """
  multiplier = model_config.image_encoder.get("lr_multiplier", 1.0)
  encoder = _text_encoder_name(model_config)
  frozen_text = {
      "sentence_transformer": (
          ()
          if model_config.text_encoder.get("trainable", True)
          else ("encoder",)
      ),
      "precomputed": ("features",),
  }.get(encoder, ())
  if multiplier == 1.0 and not frozen_text:
    return None

  def labels(params):
    def label(path, _):
      keys = [getattr(k, "key", str(k)) for k in path]
      if keys[0] == "image_encoder" and multiplier != 1.0:
        return "backbone"
      if keys[0] == "text_encoder" and len(keys) > 1 and keys[1] in frozen_text:
        return "frozen"
      return "default"

    return jax.tree_util.tree_map_with_path(label, params)

  return labels


__all__ = [
    "COMPOSERS",
    "CONV_IMPLEMENTATIONS",
    "INITIALIZATIONS",
    "PRECISIONS",
    "RESNET_DEPTHS",
    "register",
    "RetrievalModel",
    "build_model",
    "build_text_tokenizer",
    "compute_dtype",
    "load_pretrained",
    "normalize_images",
    "official_parameter_positions",
    "parameter_labels",
    "TextTokenizer",
    "TEXT_ENCODERS",
]
