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

from irtf_jax.models import initializers
from irtf_jax.models import pretrained
from irtf_jax.models.layers import Conv
from irtf_jax.models.layers import max_pool

# Depth 10 (one block per stage) is a small variant for tests and quick runs.
_STAGES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
RESNET_DEPTHS = tuple(_STAGES)
_WIDTHS = (64, 128, 256, 512)
# Channels of the last map (and of the pooled feature) at every depth.
FEATURE_DIM = _WIDTHS[-1]


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convolutions and a residual."""

  features: int
  strides: int
  conv: type
  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    def conv_bn(y, kernel: int, strides: int, conv_name: str, bn_name: str):
      """A k x k convolution (padding k // 2, no bias), then BatchNorm."""
      pad = ((kernel // 2, kernel // 2),) * 2
      y = self.conv(
          self.features,
          (kernel, kernel),
          (strides, strides),
          pad,
          name=conv_name,
      )(y)
      return self.norm(name=bn_name)(y, use_running_average=not train)

    y = nn.relu(conv_bn(x, 3, self.strides, "conv1", "bn1"))
    y = conv_bn(y, 3, 1, "conv2", "bn2")
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = conv_bn(x, 1, self.strides, "downsample_conv", "downsample_bn")
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
      raise ValueError(
          f"config.model.image_encoder.depth: {self.depth} not "
          f"in {sorted(_STAGES)}"
      )
    conv = functools.partial(
        Conv,
        use_bias=False,
        dtype=self.dtype,
        implementation=self.conv_implementation,
        kernel_init=initializers.RESNET_CONV_KERNEL,
    )
    # torchvision: momentum 0.1 (flax: 0.9 for the running average), eps 1e-5.
    norm = functools.partial(
        nn.BatchNorm,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        axis_name=self.bn_axis_name,
    )
    x = conv(64, (7, 7), (2, 2), ((3, 3), (3, 3)), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x, use_running_average=not train))
    x = max_pool(x, window=3, stride=2, padding=1)
    for stage, (blocks, width) in enumerate(zip(_STAGES[self.depth], _WIDTHS)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
            width, strides, conv, norm, name=f"layer{stage + 1}_{block}"
        )(x, train)
    return x


class PooledResNet(nn.Module):
  """ResNet followed by global average pooling: (N, H, W, 3) -> (N, C).

  The trunk shares this module's scope, so the variables are exactly
  ResNet's (conv1, bn1, layer1_0, ...), and the output is what torchvision's
  `model.avgpool` gives (flattened) for the same images in NCHW.
  """

  depth: int = 18
  conv_implementation: str = "auto"
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.trunk = ResNet(
        depth=self.depth,
        conv_implementation=self.conv_implementation,
        dtype=self.dtype,
    )
    nn.share_scope(self, self.trunk)

  def __call__(self, x, train: bool = False):
    return jnp.mean(self.trunk(x, train).astype(jnp.float32), axis=(1, 2))


def _torch_conv(tensors, path, name, shape_oihw):
  kernel = pretrained.take(path, tensors, name, shape_oihw)
  return kernel.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def resnet_variables_from_torch(path: str, depth: int = 18) -> dict:
  """ResNet variables {"params", "batch_stats"} from a torchvision state dict.

  torchvision key -> this module's variable:
    conv1.weight (O, I, kh, kw)             -> params/conv1/kernel (kh, kw, I, O)
    bn1.{weight, bias}                      -> params/bn1/{scale, bias}
    bn1.{running_mean, running_var}         -> batch_stats/bn1/{mean, var}
    layerS.B.{conv1, bn1, conv2, bn2}.*     -> layerS_B/{conv1, bn1, ...}
    layerS.B.downsample.{0, 1}.*            -> layerS_B/downsample_{conv, bn}
  `fc.*` (the ImageNet classifier) and `num_batches_tracked` are not used.

  Args:
    path: `.pth`/`.pt`/`.bin` (torch zip format) or `.safetensors` file.
    depth: 10, 18 or 34 (BasicBlock ResNets).
  """
  if depth not in _STAGES:
    raise ValueError(f"resnet depth {depth} not in {sorted(_STAGES)}")
  tensors = pretrained.read_tensors(path)
  params, stats = {}, {}

  def norm(torch_name, flax_scope, width):
    get = lambda suffix: pretrained.take(
        path, tensors, f"{torch_name}.{suffix}", (width,)
    )
    params[flax_scope] = {"scale": get("weight"), "bias": get("bias")}
    stats[flax_scope] = {"mean": get("running_mean"), "var": get("running_var")}

  def conv(torch_name, out, inp, k):
    return {
        "kernel": _torch_conv(
            tensors, path, f"{torch_name}.weight", (out, inp, k, k)
        )
    }

  params["conv1"] = conv("conv1", 64, 3, 7)
  norm("bn1", "bn1", 64)
  inp = 64
  for stage, (blocks, width) in enumerate(zip(_STAGES[depth], _WIDTHS)):
    for block in range(blocks):
      t = f"layer{stage + 1}.{block}"
      f = f"layer{stage + 1}_{block}"
      p, s = {}, {}
      params[f], stats[f] = p, s
      p["conv1"] = conv(f"{t}.conv1", width, inp, 3)
      p["conv2"] = conv(f"{t}.conv2", width, width, 3)
      for bn in ("bn1", "bn2"):
        norm(f"{t}.{bn}", "_tmp", width)
        p[bn], s[bn] = params.pop("_tmp"), stats.pop("_tmp")
      strides = 2 if stage > 0 and block == 0 else 1
      if strides != 1 or inp != width:
        p["downsample_conv"] = conv(f"{t}.downsample.0", width, inp, 1)
        norm(f"{t}.downsample.1", "_tmp", width)
        p["downsample_bn"], s["downsample_bn"] = (
            params.pop("_tmp"),
            stats.pop("_tmp"),
        )
      inp = width
  deeper = f"layer1.{_STAGES[depth][0]}.conv1.weight"
  if deeper in tensors:
    raise ValueError(
        f"{path}: has {deeper!r}, so it is deeper than the "
        f"requested ResNet-{depth}; pass the matching depth"
    )
  return {"params": params, "batch_stats": stats}


def resnet_from_torch(
    path: str, depth: int = 18, *, conv_implementation: str = "auto"
) -> tuple[PooledResNet, dict]:
  """A pretrained torchvision ResNet as (module, variables), read offline.

  `module.apply(variables, images_nhwc, train=False)` gives the (N, 512)
  globally average-pooled features torchvision's ResNet computes up to
  `model.avgpool` for the same images in NCHW (standardize the images with the
  ImageNet mean and std first, as for torchvision). The checkpoint is read
  without executing pickled code (see `irtf_jax.models.pretrained`).

  Args:
    path: e.g. torchvision's `resnet18-f37072fd.pth`, or the same weights as
      `.safetensors`.
    depth: 18 (or 10, 34).
    conv_implementation: see `irtf_jax.models.layers.Conv`.
  """
  variables = resnet_variables_from_torch(path, depth)
  return (
      PooledResNet(depth=depth, conv_implementation=conv_implementation),
      variables,
  )
