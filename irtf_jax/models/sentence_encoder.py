"""Text encoders beyond TIRG's LSTM: a BERT-style sentence encoder loaded from a
sentence-transformers checkpoint on disk, and precomputed text features.

Host-side, every text encoder has a tokenizer with the `TextTokenizer`
interface (`encode(texts, max_length) -> (tokens, lengths)`, `len()`), which
`irtf_jax.models.text_encoders.Vocabulary` already has:

- "lstm": `Vocabulary` (word ids of the training texts);
- "sentence_transformer": `WordPieceTokenizer` (the checkpoint's own
  `tokenizer.json`, through the `tokenizers` package);
- "precomputed": `PrecomputedTextFeatures` (row ids into a feature file).

Device-side, `SentenceTransformerEncoder` is BERT (`irtf_jax.models.bert`)
with mean pooling over the valid tokens, as sentence-transformers computes
sentence embeddings (Reimers & Gurevych, EMNLP 2019), followed by a trainable
projection to the embedding size.

Precomputed feature file (`.npz`, e.g. `np.savez(path, texts=np.array(texts),
features=features)`): `texts`, a (N,) array of str, each text once; `features`,
an (N, F) float array, row i the feature of texts[i], made with any model
(what ComposeAE's BERT-as-service setup amounts to). Every text the dataset
asks for must be in the file, spelled exactly.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from irtf_jax.models import initializers
from irtf_jax.models.bert import BertConfig
from irtf_jax.models.bert import BertEncoder


class TextTokenizer(Protocol):
  """Host-side text -> fixed-shape int32 arrays for one text encoder."""

  def encode(
      self, texts: Sequence[str], max_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (tokens (B, T) int32, lengths (B,) int32, each >= 1)."""

  def __len__(self) -> int:
    """Number of token ids (the embedding table size)."""


def mean_pool(token_features, lengths):
  """Mean of the first lengths[b] rows of token_features[b] (sentence-
  transformers' mean pooling): (B, T, H), (B,) -> (B, H)."""
  mask = jnp.arange(token_features.shape[1])[None, :] < lengths[:, None]
  mask = mask[..., None].astype(token_features.dtype)
  return jnp.sum(token_features * mask, axis=1) / jnp.maximum(
      jnp.sum(mask, axis=1), 1.0
  )


class SentenceTransformerEncoder(nn.Module):
  """BERT + mean pooling + a linear projection to `output_dim`.

  The BERT weights live under "encoder" (loaded from the checkpoint by
  `bert.bert_params_from_checkpoint`); "projection" is trained from scratch.
  Whether the encoder is fine-tuned is the optimizer's business
  (`config.model.text_encoder.trainable`).
  """

  config: BertConfig
  output_dim: int = 512
  initialization: str = "flax"  # of the projection (see `initializers`)

  @nn.compact
  def __call__(
      self, tokens, lengths, *, train: bool = False, embedding_perturbation=None
  ):
    del train  # no dropout: the encoder runs as in inference
    tokens_out = BertEncoder(self.config, name="encoder")(
        tokens, lengths, embedding_perturbation=embedding_perturbation
    )
    pooled = mean_pool(tokens_out, lengths)
    return nn.Dense(
        self.output_dim,
        name="projection",
        **initializers.dense(self.initialization, pooled.shape[-1]),
    )(pooled)


class WordPieceTokenizer:
  """The checkpoint's own tokenizer (`tokenizer.json`, via `tokenizers`):
  [CLS] word pieces [SEP], truncated to max_length, padded with id 0."""

  def __init__(self, model_dir: str):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{path}: missing; the sentence-transformers "
          "model folder must contain tokenizer.json"
      )
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "text_encoder.name='sentence_transformer' needs the "
          "`tokenizers` package: pip install tokenizers"
      ) from e
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()

  def __len__(self) -> int:
    return self._tokenizer.get_vocab_size()

  def encode(
      self, texts: Sequence[str], max_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(texts), max_length), np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for row, encoding in enumerate(self._tokenizer.encode_batch(list(texts))):
      ids = encoding.ids
      if len(ids) > max_length:  # keep [SEP] last, as truncation does
        ids = ids[: max_length - 1] + ids[-1:]
      tokens[row, : len(ids)] = ids
      lengths[row] = len(ids)
    return tokens, lengths


# ---------------------------------------------------------------------------
# Precomputed text features.


class PrecomputedTextFeatures:
  """Host side of "precomputed": text -> its row in the feature file.

  `encode` returns tokens (B, 1) holding row ids and lengths of ones
  (max_length is irrelevant); `features` is the (N, F) float32 table.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{path}: no such feature file; config.model.text_encoder.features "
          "must name an .npz with arrays `texts` (N,) and `features` (N, F)"
      )
    with np.load(path, allow_pickle=False) as archive:
      for key in ("texts", "features"):
        if key not in archive:
          raise ValueError(
              f"{path}: no array {key!r}; the file needs `texts` "
              "(N,) str and `features` (N, F) float"
          )
      texts, features = archive["texts"], archive["features"]
    if texts.ndim != 1 or features.ndim != 2 or len(texts) != len(features):
      raise ValueError(
          f"{path}: `texts` {texts.shape} and `features` "
          f"{features.shape} must be (N,) and (N, F)"
      )
    self.path = path
    self.features = features.astype(np.float32)
    self._rows = {}
    for row, text in enumerate(texts.tolist()):
      if text in self._rows:
        raise ValueError(
            f"{path}: text {text!r} appears twice (rows "
            f"{self._rows[text]} and {row}); keep one"
        )
      self._rows[text] = row

  def __len__(self) -> int:
    return len(self._rows)

  @property
  def feature_dim(self) -> int:
    return self.features.shape[1]

  def encode(
      self, texts: Sequence[str], max_length: int = 1
  ) -> tuple[np.ndarray, np.ndarray]:
    del max_length
    tokens = np.zeros((len(texts), 1), np.int32)
    for i, text in enumerate(texts):
      if text not in self._rows:
        raise KeyError(
            f"{self.path}: no feature for text {text!r}; add it "
            "to the file's `texts` and `features`"
        )
      tokens[i, 0] = self._rows[text]
    return tokens, np.ones((len(texts),), np.int32)


class PrecomputedTextEncoder(nn.Module):
  """Row ids -> stored feature (a frozen "features" table) -> linear to
  `output_dim`. The table is filled from the file when the retrieval model
  is initialized."""

  num_texts: int
  feature_dim: int
  output_dim: int = 512
  initialization: str = "flax"  # of the projection (see `initializers`)

  @nn.compact
  def __call__(
      self, tokens, lengths, *, train: bool = False, embedding_perturbation=None
  ):
    del lengths, train
    table = self.param(
        "features", nn.initializers.zeros, (self.num_texts, self.feature_dim)
    )
    x = table[tokens]  # (B, 1, F)
    if embedding_perturbation is not None:
      x = x + embedding_perturbation
    return nn.Dense(
        self.output_dim,
        name="projection",
        **initializers.dense(self.initialization, self.feature_dim),
    )(x[:, 0])
