"""The retrieval model: image encoder + text encoder + composer, as pure `apply`.

  query  = normalize(compose(image_encoder(x_ref), text_encoder(t)))
  target = normalize(project(pool(image_encoder(x_tgt))))

Query and target share the image encoder and its projection (TIRG's design),
and both are L2-normalized times a learned scale (TIRG's NormalizationLayer).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from irtf_jax.models.composers import COMPOSERS
from irtf_jax.models.image_encoders import ResNet
from irtf_jax.models.layers import FeatureNormalization
from irtf_jax.models.text_encoders import LSTMTextEncoder


class RetrievalModel(nn.Module):
  """Composed image retrieval model.

  Attributes:
    composer: name in `COMPOSERS`.
    vocab_size: text vocabulary size (ids 0 and 1: padding and unknown).
    embed_dim: query / target feature size (512 in TIRG).
    image_depth: ResNet depth.
    word_embed_dim, text_hidden_dim, text_dropout: LSTM text encoder sizes.
    normalization_scale: initial learned scale of the normalization (4.0).
    conv_implementation: see layers.Conv.
    bn_axis_name: mapped axis of BatchNorm statistics (under pmap).
    dtype: computation dtype of the convolutional parts.
  """
  composer: str
  vocab_size: int
  embed_dim: int = 512
  image_depth: int = 18
  word_embed_dim: int = 512
  text_hidden_dim: int = 512
  text_dropout: float = 0.1
  normalization_scale: float = 4.0
  conv_implementation: str = "auto"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.image_encoder = ResNet(
        depth=self.image_depth, conv_implementation=self.conv_implementation,
        bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    # TIRG replaces ResNet's classifier by this projection to the embedding.
    self.image_projection = nn.Dense(self.embed_dim)
    self.text_encoder = LSTMTextEncoder(
        vocab_size=self.vocab_size, word_embed_dim=self.word_embed_dim,
        hidden_dim=self.text_hidden_dim, output_dim=self.embed_dim,
        dropout_rate=self.text_dropout)
    self.composer_module = COMPOSERS[self.composer](
        embed_dim=self.embed_dim, conv_implementation=self.conv_implementation,
        bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    self.normalization = FeatureNormalization(self.normalization_scale)

  def pool_and_project(self, image_map):
    return self.image_projection(
        jnp.mean(image_map.astype(jnp.float32), axis=(1, 2)))

  def embed_target(self, images, *, train: bool):
    """(B, H, W, 3) normalized images -> (B, embed_dim) target features."""
    return self.normalization(
        self.pool_and_project(self.image_encoder(images, train)))

  def embed_query(self, images, tokens, lengths, *, train: bool,
                  text_perturbation=None):
    """Reference images + texts -> (B, embed_dim) query features.

    `text_perturbation` (B, T, word_embed_dim), if given, is added to the word
    embeddings (the text-side input of the adversarial penalty).
    """
    text = self.text_encoder(tokens, lengths, train=train,
                             embedding_perturbation=text_perturbation)
    image_map = self.image_encoder(images, train)
    if self.composer_module.operates_on == "map":
      query = self.pool_and_project(
          self.composer_module(image_map, text, train=train))
    else:
      query = self.composer_module(self.pool_and_project(image_map), text,
                                   train=train)
    return self.normalization(query)

  def __call__(self, query_images, tokens, lengths, target_images, *,
               train: bool = True, text_perturbation=None):
    """(query features, target features), as the training loss wants them."""
    query = self.embed_query(query_images, tokens, lengths, train=train,
                             text_perturbation=text_perturbation)
    return query, self.embed_target(target_images, train=train)
