"""The LSTM text encoder against PyTorch's LSTM, and the word vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from irtf_jax.models import text_encoders

BATCH, STEPS, EMBED, HIDDEN = 3, 5, 4, 6


def test_lstm_matches_torch_lstm():
  """Same four tensors (transposed kernels), same outputs, in float64."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, STEPS, EMBED))
  lstm = text_encoders.LSTM(HIDDEN)
  with jax.enable_x64(True):
    variables = lstm.init(jax.random.key(0), jnp.asarray(x))
    params = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, jnp.float64),
        variables["params"],
    )
    got = np.asarray(lstm.apply({"params": params}, jnp.asarray(x)))
  assert set(params) == {"kernel_ih", "kernel_hh", "bias_ih", "bias_hh"}
  reference = torch.nn.LSTM(EMBED, HIDDEN, batch_first=True).double()
  with torch.no_grad():
    reference.weight_ih_l0.copy_(
        torch.from_numpy(np.asarray(params["kernel_ih"]).T)
    )
    reference.weight_hh_l0.copy_(
        torch.from_numpy(np.asarray(params["kernel_hh"]).T)
    )
    reference.bias_ih_l0.copy_(torch.from_numpy(np.asarray(params["bias_ih"])))
    reference.bias_hh_l0.copy_(torch.from_numpy(np.asarray(params["bias_hh"])))
    want, _ = reference(torch.from_numpy(x))
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


def test_last_valid_ignores_padding():
  """The encoder's feature of a text does not depend on what pads it."""
  encoder = text_encoders.LSTMTextEncoder(
      vocab_size=10, word_embed_dim=4, hidden_dim=6, output_dim=3
  )
  tokens = np.array([[2, 3, 4, 0, 0], [2, 3, 4, 7, 9]], np.int32)
  lengths = np.array([3, 3], np.int32)
  variables = encoder.init(jax.random.key(0), tokens, lengths, train=False)
  features = encoder.apply(variables, tokens, lengths, train=False)
  np.testing.assert_allclose(features[0], features[1], rtol=1e-6)
  longer = encoder.apply(
      variables, tokens, np.array([3, 5], np.int32), train=False
  )
  assert not np.allclose(longer[0], longer[1])


def test_vocabulary_round_trip_and_unknown_words():
  vocab = text_encoders.Vocabulary.build(["Make the Circle red!", "add cube"])
  tokens, lengths = vocab.encode(["make the square red", ""], max_length=3)
  assert lengths.tolist() == [3, 1]
  assert tokens[0, 2] == text_encoders.UNKNOWN_ID  # "square" is unseen
  assert tokens[1, 0] == text_encoders.UNKNOWN_ID  # empty text
  assert text_encoders.Vocabulary.from_json(vocab.to_json()) == vocab
