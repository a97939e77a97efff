"""Text encoders beyond TIRG's LSTM: a BERT-style sentence encoder loaded from a
sentence-transformers checkpoint on disk, and precomputed text features.

Host-side, every text encoder has a tokenizer with the `TextTokenizer`
interface (`encode(texts, max_length) -> (tokens, lengths)`, `len()`), which
`irtf_jax.models.text_encoders.Vocabulary` already has:

- "lstm": `Vocabulary` (word ids of the training texts);
- "sentence_transformer": `WordPieceTokenizer` (the checkpoint's own
  `tokenizer.json`, through the `tokenizers` package);
- "precomputed": `PrecomputedTextFeatures` (row ids into a feature file).

Device-side, `SentenceTransformerEncoder` is BERT (Devlin et al., NAACL 2019)
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

import dataclasses
import json
import os
from typing import Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from irtf_jax.models import initializers
from irtf_jax.models import pretrained


class TextTokenizer(Protocol):
  """Host-side text -> fixed-shape int32 arrays for one text encoder."""

  def encode(
      self, texts: Sequence[str], max_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (tokens (B, T) int32, lengths (B,) int32, each >= 1)."""

  def __len__(self) -> int:
    """Number of token ids (the embedding table size)."""


# ---------------------------------------------------------------------------
# BERT-style encoder.


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (Hugging Face `config.json` fields)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    with open(path) as f:
      raw = json.load(f)
    if raw.get("model_type", "bert") != "bert":
      raise ValueError(
          f"{path}: model_type {raw['model_type']!r}; only BERT "
          "encoders (e.g. all-MiniLM-L6-v2) are supported"
      )
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ValueError(
          f"{path}: hidden_act {raw['hidden_act']!r}; only 'gelu' is supported"
      )
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


class BertLayer(nn.Module):
  """Post-LayerNorm transformer layer (BERT):
  h = LN(x + W_o MultiHeadAttention(x)),  y = LN(h + W_2 GELU(W_1 h)).
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, heads, d)
    q = split(nn.Dense(c.hidden_size, name="query")(x))
    k = split(nn.Dense(c.hidden_size, name="key")(x))
    v = split(nn.Dense(c.hidden_size, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    logits = jnp.where(
        mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min
    )
    attended = jnp.einsum(
        "bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v
    ).reshape(b, t, c.hidden_size)
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name)
    h = ln("attention_norm")(
        x + nn.Dense(c.hidden_size, name="attention_output")(attended)
    )
    y = jax.nn.gelu(
        nn.Dense(c.intermediate_size, name="intermediate")(h), approximate=False
    )
    return ln("output_norm")(h + nn.Dense(c.hidden_size, name="output")(y))


class BertEncoder(nn.Module):
  """Token ids -> contextual token features (B, T, hidden_size).

  Embeddings: word + position + token type 0, LayerNorm; then the layers,
  attending only to the first `lengths[b]` tokens of row b.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, tokens, lengths, *, embedding_perturbation=None):
    c = self.config
    t = tokens.shape[1]
    x = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(tokens)
    if embedding_perturbation is not None:
      x = x + embedding_perturbation
    x = (
        x
        + nn.Embed(
            c.max_position_embeddings, c.hidden_size, name="position_embeddings"
        )(jnp.arange(t))[None]
    )
    x = x + nn.Embed(
        c.type_vocab_size, c.hidden_size, name="token_type_embeddings"
    )(jnp.zeros((), jnp.int32))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embedding_norm")(x)
    mask = jnp.arange(t)[None, :] < lengths[:, None]
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, name=f"layer_{i}")(x, mask)
    return x


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
  `bert_params_from_checkpoint`); "projection" is trained from scratch.
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


def checkpoint_weights_path(model_dir: str) -> str:
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"{model_dir}: no model.safetensors or pytorch_model.bin; point "
      "config.model.text_encoder.pretrained at a sentence-transformers model "
      "folder (config.json, tokenizer.json, model.safetensors)"
  )


def bert_config_from_checkpoint(model_dir: str) -> BertConfig:
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: missing; config.model.text_encoder.pretrained must be a "
        "sentence-transformers model folder (config.json, tokenizer.json, "
        "model.safetensors)"
    )
  return BertConfig.from_json(path)


def bert_params_from_checkpoint(model_dir: str, config: BertConfig) -> dict:
  """BertEncoder params from a Hugging Face BERT checkpoint in `model_dir`.

  Hugging Face Linear weights are (out, in): transposed to Flax's (in, out).
  """
  path = checkpoint_weights_path(model_dir)
  tensors = pretrained.read_tensors(path)
  if "bert.embeddings.word_embeddings.weight" in tensors:  # BertFor... heads
    tensors = {
        k[len("bert.") :]: v
        for k, v in tensors.items()
        if k.startswith("bert.")
    }
  h, inter = config.hidden_size, config.intermediate_size
  get = lambda name, shape: pretrained.take(path, tensors, name, shape)

  def dense(name, inp, out):
    return {
        "kernel": get(f"{name}.weight", (out, inp)).T,
        "bias": get(f"{name}.bias", (out,)),
    }

  def norm(name):
    return {
        "scale": get(f"{name}.weight", (h,)),
        "bias": get(f"{name}.bias", (h,)),
    }

  params = {
      "word_embeddings": {
          "embedding": get(
              "embeddings.word_embeddings.weight", (config.vocab_size, h)
          )
      },
      "position_embeddings": {
          "embedding": get(
              "embeddings.position_embeddings.weight",
              (config.max_position_embeddings, h),
          )
      },
      "token_type_embeddings": {
          "embedding": get(
              "embeddings.token_type_embeddings.weight",
              (config.type_vocab_size, h),
          )
      },
      "embedding_norm": norm("embeddings.LayerNorm"),
  }
  for i in range(config.num_hidden_layers):
    p = f"encoder.layer.{i}"
    params[f"layer_{i}"] = {
        "query": dense(f"{p}.attention.self.query", h, h),
        "key": dense(f"{p}.attention.self.key", h, h),
        "value": dense(f"{p}.attention.self.value", h, h),
        "attention_output": dense(f"{p}.attention.output.dense", h, h),
        "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
        "intermediate": dense(f"{p}.intermediate.dense", h, inter),
        "output": dense(f"{p}.output.dense", inter, h),
        "output_norm": norm(f"{p}.output.LayerNorm"),
    }
  return params


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
