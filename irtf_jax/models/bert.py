"""BERT (Devlin et al., NAACL 2019) in Flax, and its weights from a Hugging
Face checkpoint folder.

`BertEncoder` maps token ids to contextual token features with post-LayerNorm
transformer layers (`BertLayer`) of the architecture a `BertConfig` describes
(the fields of the checkpoint's `config.json`). `bert_config_from_checkpoint`
and `bert_params_from_checkpoint` read a checkpoint folder (`config.json`,
`model.safetensors` or `pytorch_model.bin`, read without torch) into that
config and the encoder's parameters. Pooling and the projection to the
embedding are `irtf_jax.models.sentence_encoder`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from irtf_jax.models import pretrained


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
