"""ComposeAE (Anwaar, Labintcev & Kleinsteuber, "Compositional Learning of
Image-Text Query for Image Retrieval", WACV 2021) and its real-space
ablation, RealSpaceConcatAE.

ComposeAE treats the text feature as rotation angles in a complex space:
with image projection z = eta(phi_x) and angles delta = gamma(phi_t),

  phi_c = z * exp(i delta) = z cos(delta) + i z sin(delta)   (elementwise),

maps the complex query back to the image space twice and mixes the two,

  theta = a_1 rho([Re, Im])  +  a_0 rho_conv([z, delta, phi_x, Re, Im]),

rho an MLP on the 2D-vector [Re, Im], rho_conv a 1-D convolution over the
five stacked D-vectors, adaptive max-pooled to 16 positions, and an MLP
(a = (1, 10, ...) learned, as in TIRG). It trains with three extra terms,
sown into the "losses" collection with their weights (the paper's code:
main loss 1.0, image and text reconstruction 0.1 each, symmetry 0.01):

  L_img = mean (d_img(theta) - phi_x)^2,   L_txt = mean (d_txt(theta) - phi_t)^2
  L_sym = CE( N(compose_conj(phi_y, phi_t)), N(phi_x) )

where the rotational symmetry term composes the *target* feature phi_y with
the conjugate rotation exp(-i delta) and asks it to retrieve the query image
among the batch (softmax cross-entropy over in-batch negatives, N the
retrieval model's normalization). Any batch size works (the paper's code
fixes 32 through the shape of its conjugation vector).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import optax

from irtf_jax.models import initializers
from irtf_jax.models.composers import Composer
from irtf_jax.models.composers import register

# Loss terms: pure functions of features.


def reconstruction_loss(reconstruction, original):
  """Mean squared error, mean((reconstruction - original)^2) (PyTorch MSELoss,
  as the paper's code uses for both decoders)."""
  return jnp.mean(
      jnp.square(
          reconstruction.astype(jnp.float32) - original.astype(jnp.float32)
      )
  )


def rotational_symmetry_loss(conjugate_composed_target, source):
  """CE of row i of `conjugate_composed_target` picking row i of `source`
  among the batch: -mean_i log softmax_j(<c_i, s_j>)_i (both normalized,
  scaled features; the batch-based classification loss)."""
  logits = conjugate_composed_target @ source.T
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.arange(logits.shape[0])
  ).mean()


def complex_rotation(magnitude, angle, conjugate: bool = False):
  """(Re, Im) of magnitude * exp(+-i angle), elementwise."""
  sign = -1.0 if conjugate else 1.0
  return magnitude * jnp.cos(angle), sign * magnitude * jnp.sin(angle)


def adaptive_max_pool_1d(x, size: int):
  """PyTorch's AdaptiveMaxPool1d over axis 1 of (B, L, C): output bin k
  covers [floor(k L / size), ceil((k + 1) L / size))."""
  length = x.shape[1]
  bins = [
      jnp.max(
          x[:, (k * length) // size : -(-((k + 1) * length) // size)], axis=1
      )
      for k in range(size)
  ]
  return jnp.stack(bins, axis=1)


class _Mlp(nn.Module):
  """BN -> ReLU -> Linear(hidden) -> ReLU -> Linear(out): the paper's
  mappings and decoders."""

  hidden: int
  out: int
  bn_axis_name: str | None = None
  initialization: str = "flax"

  @nn.compact
  def __call__(self, x, train):
    dense = lambda features, fan_in, name: nn.Dense(
        features, name=name, **initializers.dense(self.initialization, fan_in)
    )
    x = nn.BatchNorm(
        momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name, name="bn"
    )(x, use_running_average=not train)
    x = nn.relu(dense(self.hidden, x.shape[-1], "fc1")(nn.relu(x)))
    return dense(self.out, self.hidden, "fc2")(x)


class _ComplexProjection(nn.Module):
  """z = eta(phi_x), delta = gamma(phi_t), and the rotated (Re, Im).

  eta: BN, Linear, Dropout(0.5), ReLU, Linear; gamma: BN, Linear, ReLU,
  Linear (the paper's code).
  """

  dim: int
  bn_axis_name: str | None = None
  initialization: str = "flax"

  @nn.compact
  def __call__(self, image, text, *, conjugate, train):
    bn = lambda name: nn.BatchNorm(
        momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name, name=name
    )
    dense = lambda fan_in, name: nn.Dense(
        self.dim, name=name, **initializers.dense(self.initialization, fan_in)
    )
    z = dense(image.shape[-1], "image_fc1")(
        bn("image_bn")(image, use_running_average=not train)
    )
    z = nn.relu(nn.Dropout(0.5, deterministic=not train)(z))
    z = dense(self.dim, "image_fc2")(z)
    delta = nn.relu(
        dense(text.shape[-1], "text_fc1")(
            bn("text_bn")(text, use_running_average=not train)
        )
    )
    delta = dense(self.dim, "text_fc2")(delta)
    re, im = complex_rotation(z, delta, conjugate)
    return z, delta, re, im


# Both official modules register these last, in this order.
_SHARED_ORDER = ("conv_mapping", "conv", "image_decoder", "text_decoder")
# The official ComplexProjectionModule registers its text branch first.
_PROJECTION_ORDER = (
    "text_bn",
    "text_fc1",
    "text_fc2",
    "image_bn",
    "image_fc1",
    "image_fc2",
)


class _AutoencoderComposer(Composer):
  """Shared by ComposeAE and RealSpaceConcatAE: the a-weighted mix of a
  linear and a convolutional mapping, the two decoders and their losses.

  Subclasses implement `mappings(image, text, conjugate, train) ->
  (theta_linear, theta_conv)` and list their own layers before
  `_SHARED_ORDER` in `torch_order`.
  """

  uses_target = True
  torch_own_parameters = ("a",)
  image_reconstruction_weight: float = 0.1
  text_reconstruction_weight: float = 0.1
  rotational_symmetry_weight: float = 0.01
  conv_channels: int = 64

  def setup(self):
    self.weights = self.param("a", lambda _: jnp.array([1.0, 10.0, 1.0, 1.0]))
    self.image_decoder = self.mlp()
    self.text_decoder = self.mlp()
    self.build_mappings()

  def mlp(self) -> _Mlp:
    return _Mlp(
        self.embed_dim, self.embed_dim, self.bn_axis_name, self.initialization
    )

  def conv1d(self, in_channels: int) -> nn.Conv:
    """The 1-D convolution (kernel 3) over `in_channels` stacked vectors."""
    return nn.Conv(
        self.conv_channels,
        (3,),
        padding=((1, 1),),
        **initializers.conv(self.initialization, 3 * in_channels),
    )

  def compose(self, image, text, *, conjugate=False, train):
    theta_linear, theta_conv = self.mappings(image, text, conjugate, train)
    return self.weights[1] * theta_linear + self.weights[0] * theta_conv

  def __call__(
      self,
      image,
      text,
      *,
      train,
      target=None,
      normalize: Callable | None = None,
  ):
    theta = self.compose(image, text, train=train)
    if train or self.is_initializing():  # the decoders exist after init
      self.sow(
          "losses",
          "image_reconstruction",
          self.image_reconstruction_weight
          * reconstruction_loss(self.image_decoder(theta, train), image),
      )
      self.sow(
          "losses",
          "text_reconstruction",
          self.text_reconstruction_weight
          * reconstruction_loss(self.text_decoder(theta, train), text),
      )
      if train and (
          target is not None
          and self.rotational_symmetry_weight > 0
          and self.symmetric
      ):
        back = self.compose(target, text, conjugate=True, train=train)
        self.sow(
            "losses",
            "rotational_symmetry",
            self.rotational_symmetry_weight
            * rotational_symmetry_loss(normalize(back), normalize(image)),
        )
    return theta


@register("compose_ae")
class ComposeAE(_AutoencoderComposer):
  """ComposeAE (Anwaar et al., WACV 2021): text as rotation in complex space,
  linear + convolutional mappings, image/text decoders, rotational symmetry
  loss (see the module docstring for the formulas)."""

  symmetric = True
  torch_order = (
      *(f"linear_projection/{layer}" for layer in _PROJECTION_ORDER),
      "linear_mapping",
      *(f"conv_projection/{layer}" for layer in _PROJECTION_ORDER),
      *_SHARED_ORDER,
  )
  pooled_length: int = 16

  def build_mappings(self):
    projection = lambda: _ComplexProjection(
        self.embed_dim, self.bn_axis_name, self.initialization
    )
    self.linear_projection = projection()
    self.linear_mapping = self.mlp()
    self.conv_projection = projection()
    self.conv = self.conv1d(5)  # [z, delta, phi_x, Re, Im]
    self.conv_mapping = self.mlp()

  def mappings(self, image, text, conjugate, train):
    _, _, re, im = self.linear_projection(
        image, text, conjugate=conjugate, train=train
    )
    theta_linear = self.linear_mapping(jnp.concatenate([re, im], -1), train)
    z, delta, re, im = self.conv_projection(
        image, text, conjugate=conjugate, train=train
    )
    stacked = jnp.stack([z, delta, image, re, im], axis=-1)  # (B, D, 5)
    pooled = adaptive_max_pool_1d(self.conv(stacked), self.pooled_length)
    flat = pooled.transpose(0, 2, 1).reshape(pooled.shape[0], -1)
    return theta_linear, self.conv_mapping(flat, train)


@register("real_space_concat_ae")
class RealSpaceConcatAE(_AutoencoderComposer):
  """RealSpaceConcatAE (Anwaar et al., WACV 2021, Table 5 ablation): ComposeAE
  without the complex space: both mappings read the concatenation
  [phi_x, phi_t] (the convolutional one as a 1-channel signal, pooled to 20
  positions); same decoders and reconstruction losses, no symmetry loss.
  """

  symmetric = False
  torch_order = ("linear_mapping", *_SHARED_ORDER)
  pooled_length: int = 20

  def build_mappings(self):
    self.linear_mapping = self.mlp()
    self.conv = self.conv1d(1)  # [phi_x, phi_t] as one channel
    self.conv_mapping = self.mlp()

  def mappings(self, image, text, conjugate, train):
    del conjugate
    joint = jnp.concatenate([image, text], -1)
    pooled = adaptive_max_pool_1d(
        self.conv(joint[..., None]), self.pooled_length
    )
    flat = pooled.transpose(0, 2, 1).reshape(pooled.shape[0], -1)
    return self.linear_mapping(joint, train), self.conv_mapping(flat, train)
