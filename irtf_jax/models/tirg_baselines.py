"""The composers TIRG (Vo et al., CVPR 2019, Sec. 4) compares with, as
registered composers. Each maps (image, text) to a query feature; see the
`Composer` interface in `composers.py`.

Some need more than the pooled features: a composer declares it with class
attributes, and the retrieval model passes the extra inputs:
  operates_on = "map":   the last convolutional map (B, h, w, C) as `image`;
                         it returns a map (pooled and projected by the
                         retrieval model) or a (B, D) feature (used as is);
  uses_tokens = True:    also `tokens` (B, T), `lengths` (B,) and
                         `text_perturbation` (B, T, word_embed_dim) or None.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from irtf_jax.models.composers import Composer
from irtf_jax.models.composers import register
from irtf_jax.models.text_encoders import last_valid
from irtf_jax.models.text_encoders import lstm_layer
from irtf_jax.models.text_encoders import word_embeddings


@register("show_and_tell")
class ShowAndTell(Composer):
  """Show and Tell (Vinyals et al., "Show and Tell: A Neural Image Caption
  Generator", CVPR 2015) as a query encoder (TIRG's baseline): an LSTM reads
  the image feature as its first input, then the words,

    h = LSTM([W_x phi_x, e(w_1), ..., e(w_L)]),   phi = W_o h_{L+1},

  with its own word embedding e; the text feature is not used.
  """

  uses_tokens = True
  torch_order = ("embedding", "image_input", "lstm", "output")
  vocab_size: int = 0
  word_embed_dim: int = 512

  @nn.compact
  def __call__(
      self, image, text, *, train, tokens, lengths, text_perturbation=None
  ):
    del text, train
    words = word_embeddings(
        tokens,
        self.vocab_size,
        self.word_embed_dim,
        self.initialization,
        text_perturbation,
    )
    first = self.dense(
        self.word_embed_dim, image.shape[-1], name="image_input"
    )(image)
    sequence = jnp.concatenate([first[:, None, :], words], axis=1)
    outputs = lstm_layer(self.embed_dim, self.initialization)(sequence)
    last = last_valid(outputs, lengths + 1)
    return self.dense(self.embed_dim, last.shape[-1], name="output")(last)


def _hash_tables(rows: int, cols: int, buckets: int, seed: int = 0):
  """Fixed hash h(i, j) in [0, buckets) and sign xi(i, j) in {-1, 1}."""
  rng = np.random.default_rng(seed)
  return (
      rng.integers(0, buckets, size=(rows, cols)).astype(np.int32),
      rng.choice(np.array([-1.0, 1.0], np.float32), size=(rows, cols)),
  )


@register("parameter_hashing")
class ParameterHashing(Composer):
  """Parameter hashing (Noh et al., "Image Question Answering using
  Convolutional Neural Network with Dynamic Parameter Prediction", CVPR 2016;
  TIRG's baseline): the text predicts the weights of a fully connected layer
  applied to the image feature. The D x D matrix is hashed from K candidate
  weights p(t) = W_p phi_t (Chen et al.'s HashedNets):

    W(t)_{ij} = xi(i, j) p(t)_{h(i, j)},    phi = W(t) phi_x + b

  with a fixed random hash h and sign xi.
  """

  torch_order = ("candidates", "bias")
  num_hashed_weights: int = 4096

  @nn.compact
  def __call__(self, image, text, *, train):
    del train
    d_out, d_in = self.embed_dim, image.shape[-1]
    bucket, sign = _hash_tables(d_out, d_in, self.num_hashed_weights)
    # The kernel's scale keeps W(t) phi_x of unit order; the model's choice.
    candidates = self.dense(
        self.num_hashed_weights,
        text.shape[-1],
        name="candidates",
        kernel_init=nn.initializers.normal(
            1.0 / np.sqrt(text.shape[-1] * d_in)
        ),
    )(text)
    weights = candidates[:, bucket] * sign  # (B, D, D_in)
    bias = self.param("bias", nn.initializers.zeros, (d_out,))
    return jnp.einsum("bij,bj->bi", weights, image) + bias


@register("attribute_as_operator")
class AttributeAsOperator(Composer):
  """Attribute as Operator (Nagarajan & Grauman, "Attributes as Operators:
  Factorizing Unseen Attribute-Object Compositions", ECCV 2018; TIRG's
  baseline): the text acts on the image feature as a learned matrix,

    phi = M(t) phi_x,    M(t) = sum_k softmax(W_a phi_t)_k M_k,

  a soft choice among K learned operators, each initialized to the identity
  as in the paper. With one operator per attribute and one-hot weights this
  is the paper's "one matrix per attribute"; the soft choice lets free-form
  texts share operators.
  """

  torch_order = ("operators", "choice")
  num_operators: int = 16

  @nn.compact
  def __call__(self, image, text, *, train):
    del train
    d = image.shape[-1]
    operators = self.param(
        "operators",
        lambda key, shape: jnp.eye(d)[None]
        + 0.01 * jax.random.normal(key, shape),
        (self.num_operators, d, d),
    )
    choice = jax.nn.softmax(
        self.dense(self.num_operators, text.shape[-1], name="choice")(text)
    )
    applied = jnp.einsum("kij,bj->bki", operators, image)
    return jnp.einsum("bk,bki->bi", choice, applied)


@register("relationship")
class Relationship(Composer):
  """Relationship / relation network (Santoro et al., "A simple neural
  network module for relational reasoning", NeurIPS 2017; TIRG's baseline):
  over all pairs of regions (i, j) of the last convolutional map, each with
  its (x, y) position, and the text,

    phi = f( sum_{i, j} g([r_i, r_j, phi_t]) ),

  g and f MLPs. g's first layer is applied to r_i, r_j and phi_t separately
  and summed, which equals the layer on the concatenation and costs
  O(h w) instead of O((h w)^2) matrix products.
  """

  operates_on = "map"
  torch_order = ("g1_left", "g1_right", "g1_text", "g2", "f1", "f2")
  hidden_dim: int = 256

  @nn.compact
  def __call__(self, image, text, *, train):
    del train
    b, h, w, c = image.shape
    ys, xs = jnp.meshgrid(
        jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij"
    )
    coords = jnp.broadcast_to(jnp.stack([ys, xs], -1)[None], (b, h, w, 2))
    regions = jnp.concatenate([image.astype(jnp.float32), coords], -1).reshape(
        b, h * w, c + 2
    )
    # g1 is one Linear on [r_i, r_j, phi_t] split in three: each part is
    # initialized with the fan-in of the whole layer, its bias on `g1_left`.
    fan_in = 2 * (c + 2) + text.shape[-1]
    left = self.dense(self.hidden_dim, fan_in, name="g1_left")(regions)
    right = self.dense(
        self.hidden_dim, fan_in, use_bias=False, name="g1_right"
    )(regions)
    words = self.dense(self.hidden_dim, fan_in, use_bias=False, name="g1_text")(
        text
    )
    pairs = nn.relu(
        left[:, :, None] + right[:, None, :] + words[:, None, None, :]
    )  # (B, hw, hw, hidden)
    pairs = nn.relu(
        self.dense(self.hidden_dim, self.hidden_dim, name="g2")(pairs)
    )
    relation = jnp.sum(pairs, axis=(1, 2))
    out = nn.relu(
        self.dense(self.hidden_dim, self.hidden_dim, name="f1")(relation)
    )
    return self.dense(self.embed_dim, self.hidden_dim, name="f2")(out)


@register("film")
class FiLM(Composer):
  """FiLM (Perez et al., "FiLM: Visual Reasoning with a General Conditioning
  Layer", AAAI 2018; TIRG's baseline): one FiLM residual block on the last
  convolutional map, modulated by the text,

    x1 = ReLU(conv1x1(x)),   y = ReLU(gamma(t) * BN(conv3x3(x1)) + beta(t)),
    out = x1 + y,            (gamma, beta) = W_f phi_t,

  BN without its own affine parameters. The retrieval model pools and
  projects the output map.
  """

  operates_on = "map"
  torch_order = ("conv1", "conv2", "film")

  @nn.compact
  def __call__(self, image, text, *, train):
    c = image.shape[-1]
    x1 = nn.relu(self.conv(c, 1, c, name="conv1")(image))
    y = self.conv(c, 3, c, name="conv2")(x1)
    y = nn.BatchNorm(
        momentum=0.9,
        epsilon=1e-5,
        use_scale=False,
        use_bias=False,
        axis_name=self.bn_axis_name,
        dtype=self.dtype,
        name="bn",
    )(y, use_running_average=not train)
    # Identity modulation at the start (gamma 1, beta 0): the model's choice.
    film = self.dense(
        2 * c,
        text.shape[-1],
        name="film",
        bias_init=lambda key, shape, dtype=jnp.float32: jnp.concatenate(
            [jnp.ones((c,)), jnp.zeros((c,))]
        ).astype(dtype),
    )(text)
    gamma, beta = film[:, None, None, :c], film[:, None, None, c:]
    y = nn.relu(gamma * y.astype(jnp.float32) + beta)
    return (x1 + y).astype(image.dtype)
