"""Composers: how a query image and a modification text become one query feature.

Each composer is registered under the name `config.model.name` selects, and
declares whether it composes the pooled image feature (`operates_on =
"feature"`, input (B, D)) or the last convolutional map (`operates_on = "map"`,
input (B, h, w, C); the retrieval model pools and projects its output). A
composer never computes a loss: where a model needs extra training terms
(autoencoder reconstructions, say) it `sow`s them into the "losses"
collection, which the train step adds up.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from irtf_jax.models import initializers
from irtf_jax.models.layers import Conv

COMPOSERS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  def wrap(cls):
    COMPOSERS[name] = cls
    return cls

  return wrap


class Composer(nn.Module):
  """Base: `__call__(image, text, *, train) -> query feature`.

  Attributes:
    embed_dim: size of the text feature and of the output feature.
    conv_implementation: for composers with convolutions (see layers.Conv).
    bn_axis_name: mapped axis for BatchNorm statistics under pmap.
    dtype: computation dtype.
    initialization: "flax" or "torch" (`config.model.init`): the
      initializers of the composer's layers (see `initializers`).
  """

  operates_on = "feature"
  # PyTorch registration order (see `torch_order.py`): the composer's layers,
  # and its parameters that the official top-level module owns.
  torch_order = ()
  torch_own_parameters = ()
  embed_dim: int = 512
  conv_implementation: str = "auto"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  initialization: str = "flax"

  def batch_norm(self, name):
    return nn.BatchNorm(
        momentum=0.9,
        epsilon=1e-5,
        axis_name=self.bn_axis_name,
        dtype=self.dtype,
        name=name,
    )

  def dense(
      self, features: int, fan_in: int, *, name: str, **kwargs
  ) -> nn.Dense:
    """A Dense layer with `fan_in` inputs, initialized as `initialization`
    says unless `kwargs` name an initializer."""
    return nn.Dense(
        features,
        name=name,
        **{**initializers.dense(self.initialization, fan_in), **kwargs},
    )

  def conv(
      self, features: int, kernel_size: int, fan_in_channels: int, *, name: str
  ) -> Conv:
    """A k x k, stride-1, same-padded `layers.Conv` on `fan_in_channels`
    channels, initialized as `initialization` says."""
    pad = ((kernel_size // 2, kernel_size // 2),) * 2
    return Conv(
        features,
        (kernel_size, kernel_size),
        padding=pad,
        dtype=self.dtype,
        implementation=self.conv_implementation,
        name=name,
        **initializers.conv(
            self.initialization, fan_in_channels * kernel_size * kernel_size
        ),
    )


@register("image_only")
class ImageOnly(Composer):
  """Ignores the text: the query is the image feature (TIRG's baseline)."""

  def __call__(self, image, text, *, train):
    del text, train
    return image


@register("text_only")
class TextOnly(Composer):
  """Ignores the image: the query is the text feature (TIRG's baseline)."""

  def __call__(self, image, text, *, train):
    del image, train
    return text


@register("concat")
class Concat(Composer):
  """MLP on [image, text] (TIRG's concatenation baseline):
  BN, ReLU, Linear(2D, 2D), ReLU, Dropout(0.1), Linear(2D, D)."""

  torch_order = ("bn", "fc1", "fc2")
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, image, text, *, train):
    x = jnp.concatenate([image, text], axis=-1)
    x = nn.relu(self.batch_norm("bn")(x, use_running_average=not train))
    x = nn.relu(
        self.dense(
            2 * self.embed_dim, x.shape[-1], dtype=self.dtype, name="fc1"
        )(x)
    )
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return self.dense(
        self.embed_dim, x.shape[-1], dtype=self.dtype, name="fc2"
    )(x)


class _TirgWeights(nn.Module):
  """TIRG's learned scalars a = (1, 10, 1, 1); a[0] weighs the gated image,
  a[1] the residual."""

  @nn.compact
  def __call__(self):
    return self.param("a", lambda _: jnp.array([1.0, 10.0, 1.0, 1.0]))


@register("tirg")
class Tirg(Composer):
  """TIRG (Vo et al., "Composing Text and Image for Image Retrieval - An
  Empirical Odyssey", CVPR 2019), on the pooled image feature phi_x:

    gate = W_g ReLU(BN([phi_x, phi_t]))
    res  = W_r2 ReLU(W_r1 ReLU(BN([phi_x, phi_t])))
    phi  = a_0 * sigmoid(gate) * phi_x + a_1 * res
  """

  torch_own_parameters = ("weights",)
  torch_order = ("gate_bn", "gate_fc", "res_bn", "res_fc1", "res_fc2")

  @nn.compact
  def __call__(self, image, text, *, train):
    x = jnp.concatenate([image, text], axis=-1)
    d = self.embed_dim
    gate = nn.relu(self.batch_norm("gate_bn")(x, use_running_average=not train))
    gate = self.dense(d, x.shape[-1], dtype=self.dtype, name="gate_fc")(gate)
    res = nn.relu(self.batch_norm("res_bn")(x, use_running_average=not train))
    res = nn.relu(
        self.dense(2 * d, x.shape[-1], dtype=self.dtype, name="res_fc1")(res)
    )
    res = self.dense(d, 2 * d, dtype=self.dtype, name="res_fc2")(res)
    a = _TirgWeights(name="weights")()
    return a[0] * nn.sigmoid(gate) * image + a[1] * res


@register("tirg_lastconv")
class TirgLastConv(Composer):
  """TIRG composed on the last convolutional map (TIRG's "TIRGLastConv"; the
  Gradient Augmentation paper's code calls it "tirg").

  The text feature is tiled over the h x w map and concatenated on channels:
  z = [x, t]; gate and residual are BN -> 3x3 conv (C+D) -> ReLU -> 3x3 conv C;
  out = a_0 * sigmoid(gate(z)) * x + a_1 * res(z), then pooled and projected by
  the retrieval model like any image map.
  """

  operates_on = "map"
  torch_own_parameters = ("weights",)
  # The official code registers the residual branch (mod2d) first.
  torch_order = (
      "res_bn",
      "res_conv1",
      "res_conv2",
      "gate_bn",
      "gate_conv1",
      "gate_conv2",
  )

  @nn.compact
  def __call__(self, image, text, *, train):
    b, h, w, c = image.shape
    tiled = jnp.broadcast_to(
        text[:, None, None, :].astype(image.dtype), (b, h, w, text.shape[-1])
    )
    z = jnp.concatenate([image, tiled], axis=-1)

    def branch(prefix):
      y = self.batch_norm(f"{prefix}_bn")(z, use_running_average=not train)
      # BatchNorm acts per channel, so y's text channels are still the same
      # at every position: the convolution takes them as one vector per
      # image (`layers.Conv`'s `tiled`), half its multiply-adds.
      y = self.conv(z.shape[-1], 3, z.shape[-1], name=f"{prefix}_conv1")(
          y[..., :c], tiled=y[:, 0, 0, c:]
      )
      y = nn.relu(y)
      return self.conv(c, 3, z.shape[-1], name=f"{prefix}_conv2")(y)

    a = _TirgWeights(name="weights")()
    return (
        a[0] * nn.sigmoid(branch("gate")) * image + a[1] * branch("res")
    ).astype(image.dtype)
