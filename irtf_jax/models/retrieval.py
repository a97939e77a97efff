"""The retrieval model: image encoder + text encoder + composer, as pure `apply`.

  query  = normalize(compose(image_encoder(x_ref), text_encoder(t)))
  target = normalize(project(pool(image_encoder(x_tgt))))

Query and target share the image encoder and its projection (TIRG's design),
and both are L2-normalized times a learned scale (TIRG's NormalizationLayer).
Evaluation splits a query in two, `encode_images` (once per image: the
composer's input and the target feature) and `compose_query`.

What a composer receives depends on what it declares (class attributes):
`operates_on = "map"`: the last convolutional map instead of the pooled
feature (a map it returns is pooled and projected, a (B, D) feature is used as
is); `uses_tokens`: also the token ids, lengths and the text-embedding
perturbation; `uses_target`: during training (`__call__`), also the target's
projected feature and the normalization (ComposeAE's symmetry loss).
Composers that declare nothing are called exactly as before.

Text encoders (`text_encoder_kind`): "lstm" (TIRG's), "sentence_transformer"
(BERT + mean pooling), "precomputed" (a feature table). The model is only a
model: pretrained weights are put into its initialized variables by
`irtf_jax.models.load_pretrained`, outside any compiled function.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from irtf_jax.models import initializers
from irtf_jax.models import sentence_encoder
from irtf_jax.models.bert import BertConfig
from irtf_jax.models.composers import COMPOSERS
from irtf_jax.models.image_encoders import FEATURE_DIM
from irtf_jax.models.image_encoders import ResNet
from irtf_jax.models.layers import FeatureNormalization
from irtf_jax.models.text_encoders import LSTMTextEncoder

TEXT_ENCODERS = ("lstm", "sentence_transformer", "precomputed")
# ImageNet statistics (TIRG normalizes every dataset with them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 (..., H, W, 3) -> float32 scaled to [0, 1] and standardized: the
  images a `RetrievalModel` takes."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


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
    composer_options: (name, value) pairs of extra composer attributes
      (e.g. ComposeAE's loss weights).
    text_encoder_kind: "lstm", "sentence_transformer" or "precomputed".
    bert: the BertConfig of the "sentence_transformer" encoder.
    num_texts, text_feature_dim: the "precomputed" table's shape.
    initialization: "flax" or "torch" (`config.model.init`): Flax's or
      PyTorch's default initializers for every layer that has no
      initialization of its own (see `initializers`).
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
  composer_options: tuple = ()
  text_encoder_kind: str = "lstm"
  bert: BertConfig | None = None
  num_texts: int = 0
  text_feature_dim: int = 0
  initialization: str = "flax"

  def setup(self):
    initializers.check(self.initialization)
    self.image_encoder = ResNet(
        depth=self.image_depth,
        conv_implementation=self.conv_implementation,
        bn_axis_name=self.bn_axis_name,
        dtype=self.dtype,
    )
    # TIRG replaces ResNet's classifier by this projection to the embedding.
    self.image_projection = nn.Dense(
        self.embed_dim, **initializers.dense(self.initialization, FEATURE_DIM)
    )
    self.text_encoder = self._make_text_encoder()
    composer_class = COMPOSERS[self.composer]
    options = dict(self.composer_options)
    if getattr(composer_class, "uses_tokens", False):
      options.update(
          vocab_size=self.vocab_size, word_embed_dim=self.word_embed_dim
      )
    self.composer_module = composer_class(
        embed_dim=self.embed_dim,
        conv_implementation=self.conv_implementation,
        bn_axis_name=self.bn_axis_name,
        dtype=self.dtype,
        initialization=self.initialization,
        **options,
    )
    self.normalization = FeatureNormalization(self.normalization_scale)

  def _make_text_encoder(self):
    if self.text_encoder_kind == "lstm":
      return LSTMTextEncoder(
          vocab_size=self.vocab_size,
          word_embed_dim=self.word_embed_dim,
          hidden_dim=self.text_hidden_dim,
          output_dim=self.embed_dim,
          dropout_rate=self.text_dropout,
          initialization=self.initialization,
      )
    if self.text_encoder_kind == "sentence_transformer":
      return sentence_encoder.SentenceTransformerEncoder(
          self.bert,
          output_dim=self.embed_dim,
          initialization=self.initialization,
      )
    if self.text_encoder_kind == "precomputed":
      return sentence_encoder.PrecomputedTextEncoder(
          self.num_texts,
          self.text_feature_dim,
          output_dim=self.embed_dim,
          initialization=self.initialization,
      )
    raise ValueError(
        "config.model.text_encoder.name: unknown "
        f"{self.text_encoder_kind!r}; allowed: "
        f"{', '.join(TEXT_ENCODERS)}"
    )

  def pool_and_project(self, image_map):
    return self.image_projection(
        jnp.mean(image_map.astype(jnp.float32), axis=(1, 2))
    )

  def embed_target(self, images, *, train: bool):
    """(B, H, W, 3) normalized images -> (B, embed_dim) target features."""
    return self.encode_images(images, train=train)[1]

  def encode_images(self, images, *, train: bool):
    """(B, H, W, 3) normalized images -> (composer input, target features).

    One image-encoder pass gives both what a query on the image composes
    (the last map for a composer that `operates_on` it, else the pooled and
    projected feature) and the image's target feature, so an evaluation
    encodes each image once however many queries start from it:
    `compose_query(encode_images(x)[0], t, l)` is `embed_query(x, t, l)`.
    """
    image_map = self.image_encoder(images, train)
    pooled = self.pool_and_project(image_map)
    if self.composer_module.operates_on == "map":
      return image_map, self.normalization(pooled)
    return pooled, self.normalization(pooled)

  def compose_query(
      self,
      composer_input,
      tokens,
      lengths,
      *,
      train: bool,
      text_perturbation=None,
  ):
    """`encode_images`' composer input + texts -> (B, embed_dim) query
    features."""
    text = self.text_encoder(
        tokens, lengths, train=train, embedding_perturbation=text_perturbation
    )
    return self._compose(
        composer_input, text, tokens, lengths, train, text_perturbation, None
    )

  def _compose(
      self, image, text, tokens, lengths, train, text_perturbation, target
  ):
    """The normalized query feature from the composer's image input."""
    extras = {}
    if getattr(self.composer_module, "uses_tokens", False):
      extras.update(
          tokens=tokens, lengths=lengths, text_perturbation=text_perturbation
      )
    if target is not None:
      extras.update(target=target, normalize=self.normalization)
    query = self.composer_module(image, text, train=train, **extras)
    if query.ndim == 4:  # a map
      query = self.pool_and_project(query)
    return self.normalization(query)

  def _embed_query(
      self, images, tokens, lengths, train, text_perturbation, target_images
  ):
    """(query features, target features before normalization or None).

    With `target_images` (a composer that `uses_target`), the targets are
    encoded after the query images (the order of BatchNorm updates) and given
    to the composer with the normalization.
    """
    text = self.text_encoder(
        tokens, lengths, train=train, embedding_perturbation=text_perturbation
    )
    image, _ = self.encode_images(images, train=train)
    target = None
    if target_images is not None:
      target = self.pool_and_project(self.image_encoder(target_images, train))
    query = self._compose(
        image, text, tokens, lengths, train, text_perturbation, target
    )
    return query, target

  def embed_query(
      self, images, tokens, lengths, *, train: bool, text_perturbation=None
  ):
    """Reference images + texts -> (B, embed_dim) query features.

    `text_perturbation` (B, T, word_embed_dim), if given, is added to the word
    embeddings (the text-side input of the adversarial penalty).
    """
    query, _ = self._embed_query(
        images, tokens, lengths, train, text_perturbation, None
    )
    return query

  def __call__(
      self,
      query_images,
      tokens,
      lengths,
      target_images,
      *,
      train: bool = True,
      text_perturbation=None,
  ):
    """(query features, target features), as the training loss wants them.

    BatchNorm sees the query images first, then the targets, whether or not
    the composer uses the target.
    """
    if getattr(self.composer_module, "uses_target", False):
      query, target = self._embed_query(
          query_images, tokens, lengths, train, text_perturbation, target_images
      )
      return query, self.normalization(target)
    query = self.embed_query(
        query_images,
        tokens,
        lengths,
        train=train,
        text_perturbation=text_perturbation,
    )
    return query, self.embed_target(target_images, train=train)
