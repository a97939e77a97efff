"""Image encoders: ResNet in torchvision's layout, NHWC.

The module returns the last convolutional map (N, h, w, C); pooling and the
projection to the embedding live in the retrieval model, because some
composers work on the map (TIRG-LastConv, FiLM, Relationship) and others on
the pooled feature. Submodule names follow torchvision's state-dict keys
(conv1, bn1, layer1_0/conv1, layer1_0/downsample_conv, ...) so pretrained
weights map one to one.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from irtf_jax.models.layers import Conv, max_pool

# Depth 10 (one block per stage) is a small variant for tests and quick runs.
_STAGES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convolutions and a residual."""
  features: int
  strides: int
  conv: type
  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = self.conv(self.features, (3, 3), (self.strides, self.strides),
                  ((1, 1), (1, 1)), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, use_running_average=not train))
    y = self.conv(self.features, (3, 3), (1, 1), ((1, 1), (1, 1)),
                  name="conv2")(y)
    y = self.norm(name="bn2")(y, use_running_average=not train)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = self.conv(self.features, (1, 1), (self.strides, self.strides),
                           ((0, 0), (0, 0)), name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(
          residual, use_running_average=not train)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet-10/18/34 trunk (He et al., CVPR 2016) as torchvision builds it.

  Attributes:
    depth: 10, 18 or 34.
    conv_implementation: see `irtf_jax.models.layers.Conv`.
    bn_axis_name: mapped axis over which BatchNorm averages statistics
      (set under pmap so statistics cover the global batch).
    dtype: computation dtype (bfloat16 for mixed precision).
  """
  depth: int = 18
  conv_implementation: str = "auto"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.depth not in _STAGES:
      raise ValueError(f"config.model.image_encoder.depth: {self.depth} not "
                       f"in {sorted(_STAGES)}")
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             implementation=self.conv_implementation,
                             kernel_init=nn.initializers.variance_scaling(
                                 2.0, "fan_out", "normal"))
    # torchvision: momentum 0.1 (flax: 0.9 for the running average), eps 1e-5.
    norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype, axis_name=self.bn_axis_name)
    x = conv(64, (7, 7), (2, 2), ((3, 3), (3, 3)), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x, use_running_average=not train))
    x = max_pool(x, window=3, stride=2, padding=1)
    for stage, (blocks, width) in enumerate(zip(_STAGES[self.depth], _WIDTHS)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, conv, norm,
                       name=f"layer{stage + 1}_{block}")(x, train)
    return x
