"""Text side: TIRG's word vocabulary and LSTM text encoder.

The vocabulary lives on the host (strings never reach the device); the
encoder sees int32 token ids padded to a fixed length plus the true lengths,
so every batch has one shape and the train step compiles once.
"""

from __future__ import annotations

import json
import string
from typing import Iterable, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from irtf_jax.models import initializers

PAD_ID = 0
UNKNOWN_ID = 1
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def tokenize(text: str) -> list[str]:
  """TIRG's tokenizer: ASCII only, lower case, punctuation removed, split on spaces."""
  text = text.encode("ascii", "ignore").decode("ascii")
  return text.lower().translate(_PUNCTUATION).split()


class Vocabulary:
  """Word -> id map built from training texts; id 0 pads, id 1 is unknown."""

  def __init__(self, words: Sequence[str]):
    self.words = list(words)
    self._ids = {w: i + 2 for i, w in enumerate(self.words)}

  @classmethod
  def build(cls, texts: Iterable[str]) -> "Vocabulary":
    """The sorted set of words of `texts` (sorted: the ids do not depend on order)."""
    return cls(sorted({w for t in texts for w in tokenize(t)}))

  def __len__(self) -> int:
    """Number of ids, padding and unknown included (the embedding table size)."""
    return len(self.words) + 2

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and self.words == other.words

  def encode(
      self, texts: Sequence[str], max_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (token ids (B, max_length) int32, lengths (B,) int32).

    Texts longer than `max_length` words are truncated; an empty text becomes
    one unknown token, so every sequence has a last valid step.
    """
    tokens = np.full((len(texts), max_length), PAD_ID, np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for row, text in enumerate(texts):
      ids = [self._ids.get(w, UNKNOWN_ID) for w in tokenize(text)][:max_length]
      ids = ids or [UNKNOWN_ID]
      tokens[row, : len(ids)] = ids
      lengths[row] = len(ids)
    return tokens, lengths

  def to_json(self) -> str:
    return json.dumps({"words": self.words})

  @classmethod
  def from_json(cls, text: str) -> "Vocabulary":
    return cls(json.loads(text)["words"])


def _per_gate(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
  """Initializes each gate's (H, H) block of a (H, 4H) kernel on its own."""

  def initialize(key, shape, dtype=jnp.float32):
    rows, columns = shape
    keys = jax.random.split(key, 4)
    return jnp.concatenate(
        [init(k, (rows, columns // 4), dtype) for k in keys], axis=1
    )

  return initialize


class LSTM(nn.Module):
  """A one-layer LSTM with PyTorch's parameters (`torch.nn.LSTM`).

  For input x_t and state (h, c), with the gates in PyTorch's order:

    [i, f, g, o] = x_t K_ih + b_ih + h K_hh + b_hh
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g),   h' = sigmoid(o) * tanh(c')

  `kernel_ih` (E, 4H) and `kernel_hh` (H, 4H) are PyTorch's `weight_ih_l0`
  and `weight_hh_l0` transposed; `bias_ih` and `bias_hh` are its two biases.
  Keeping PyTorch's four tensors (rather than one fused bias, or a kernel per
  gate) makes each parameter correspond to exactly one tensor of the official
  code, which is what its initialization and its per-tensor isotropic noise
  (`regularizers.isotropic_gradient_augmentation(scaling="official")`) are
  defined on. The input projection of every step is one matmul before the
  scan; the scan carries only the recurrent product.

  Attributes:
    hidden_dim: H.
    kernel_init, recurrent_init, bias_init: initializers of K_ih, K_hh and
      both biases (by default Flax's LSTM cells': LeCun normal, an orthogonal
      matrix per gate, zeros).
  """

  hidden_dim: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  recurrent_init: nn.initializers.Initializer = _per_gate(
      nn.initializers.orthogonal()
  )
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, E) inputs -> (B, T, H) outputs h_1..h_T, from h_0 = c_0 = 0."""
    h = self.hidden_dim
    kernel_ih = self.param("kernel_ih", self.kernel_init, (x.shape[-1], 4 * h))
    kernel_hh = self.param("kernel_hh", self.recurrent_init, (h, 4 * h))
    bias_ih = self.param("bias_ih", self.bias_init, (4 * h,))
    bias_hh = self.param("bias_hh", self.bias_init, (4 * h,))
    projected = x @ kernel_ih + (bias_ih + bias_hh)

    def step(carry, z):
      hidden, cell = carry
      i, f, g, o = jnp.split(z + hidden @ kernel_hh, 4, axis=-1)
      cell = nn.sigmoid(f) * cell + nn.sigmoid(i) * jnp.tanh(g)
      hidden = nn.sigmoid(o) * jnp.tanh(cell)
      return (hidden, cell), hidden

    zeros = jnp.zeros((x.shape[0], h), projected.dtype)
    _, outputs = lax.scan(step, (zeros, zeros), jnp.swapaxes(projected, 0, 1))
    return jnp.swapaxes(outputs, 0, 1)


def last_valid(outputs: jax.Array, lengths: jax.Array) -> jax.Array:
  """(B, T, H) outputs -> (B, H): each row's output at position length - 1.

  The LSTM is causal, so what it computed on the padding after a sequence
  never reaches this output.
  """
  return jnp.take_along_axis(
      outputs, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1
  )[:, 0]


def word_embeddings(
    tokens, vocab_size: int, dim: int, initialization: str, perturbation=None
):
  """(B, T, dim) embeddings of `tokens` by the submodule "embedding" of the
  calling compact module, plus `perturbation` if given (the text-side input
  of the adversarial penalty)."""
  x = nn.Embed(
      vocab_size,
      dim,
      embedding_init=initializers.embedding(initialization),
      name="embedding",
  )(tokens)
  return x if perturbation is None else x + perturbation


def lstm_layer(hidden_dim: int, initialization: str) -> LSTM:
  """The submodule "lstm" of the calling compact module: one LSTM layer."""
  return LSTM(
      hidden_dim,
      name="lstm",
      **initializers.lstm(initialization, hidden_dim),
  )


class LSTMTextEncoder(nn.Module):
  """TIRG's text model: word embedding, one-layer LSTM, last valid output,
  dropout, linear.

  Attributes:
    vocab_size: embedding table size (`len(Vocabulary)`).
    word_embed_dim: word embedding size (512 in TIRG).
    hidden_dim: LSTM size (512 in TIRG).
    output_dim: text feature size (the embedding size).
    dropout_rate: dropout before the output layer (0.1 in TIRG).
    initialization: "flax" or "torch" (`config.model.init`; see
      `initializers`).
  """

  vocab_size: int
  word_embed_dim: int = 512
  hidden_dim: int = 512
  output_dim: int = 512
  dropout_rate: float = 0.1
  initialization: str = "flax"

  @nn.compact
  def __call__(
      self, tokens, lengths, *, train: bool, embedding_perturbation=None
  ):
    """Encodes texts.

    Args:
      tokens: (B, T) int32 ids.
      lengths: (B,) number of valid tokens (>= 1).
      train: dropout on/off.
      embedding_perturbation: optional (B, T, word_embed_dim) added to the word
        embeddings: the input the adversarial penalty differentiates when it
        perturbs the text side.

    Returns:
      (B, output_dim) text features.
    """
    x = word_embeddings(
        tokens,
        self.vocab_size,
        self.word_embed_dim,
        self.initialization,
        embedding_perturbation,
    )
    lstm = lstm_layer(self.hidden_dim, self.initialization)
    last = last_valid(lstm(x), lengths)
    last = nn.Dropout(self.dropout_rate, deterministic=not train)(last)
    return nn.Dense(
        self.output_dim,
        name="output",
        **initializers.dense(self.initialization, self.hidden_dim),
    )(last)
