"""Parameter initializations: Flax's defaults or PyTorch's (config.model.init).

The one place where "flax" and "torch" become initializers. Every model
layer with a framework-default initialization asks here, so a model
initializes as Flax's layers do or as the same layers of the official
PyTorch code (TIRG, the GA paper's fork) do:

  layer                      "flax"                   "torch"
  Dense kernel (in, out)     LeCun normal             U(+-1/sqrt(in)) [1]
  Dense bias                 0                        U(+-1/sqrt(in))
  Conv kernel (k.., in, out) LeCun normal             U(+-1/sqrt(in prod(k)))
  Conv bias                  0                        U(+-1/sqrt(in prod(k)))
  ResNet conv (no bias)      N(0, 2/(out prod(k)))    the same [2]
  Embedding (vocab, dim)     N(0, 1/dim)              N(0, 1)
  LSTM kernel_ih, kernel_hh  LeCun normal; orthogonal U(+-1/sqrt(hidden))
                             per gate
  LSTM bias_ih, bias_hh      0                        U(+-1/sqrt(hidden))
  BatchNorm scale, bias      1, 0                     1, 0

[1] PyTorch's `kaiming_uniform_(a=sqrt(5))`; [2] torchvision's ResNet draws
its convolutions with `kaiming_normal_(mode="fan_out", nonlinearity="relu")`,
and the Flax ResNet always has.

Initializations a model chooses on purpose (TIRG's weights a = (1, 10, 1,
1), the normalization scale 4, FiLM's identity modulation, the operators of
Attribute as Operator, the hashed candidates of parameter hashing) are the
model's, the same under both.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

INITIALIZATIONS = ("flax", "torch")

# The ResNet's convolution kernels under both: torchvision's own
# `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
RESNET_CONV_KERNEL = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check(initialization: str) -> str:
  """`initialization`, or ValueError naming config.model.init."""
  if initialization not in INITIALIZATIONS:
    raise ValueError(
        f"config.model.init: unknown {initialization!r}; "
        f"allowed: {', '.join(INITIALIZATIONS)}"
    )
  return initialization


def symmetric_uniform(bound: float) -> nn.initializers.Initializer:
  """U(-bound, bound), as PyTorch's `uniform_(-bound, bound)`."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dense(initialization: str, fan_in: int) -> dict:
  """`kernel_init` and `bias_init` of a Dense layer with `fan_in` inputs
  (PyTorch: `torch.nn.Linear(fan_in, out)`).

  PyTorch draws the weight with `kaiming_uniform_(a=sqrt(5))`: gain
  sqrt(2 / (1 + a^2)) = sqrt(1 / 3) and bound gain * sqrt(3 / fan_in) =
  1 / sqrt(fan_in), the bias's bound. `fan_in` is passed rather than read
  from the kernel's shape, so a layer split in parts (the Relationship
  composer's g1) initializes each part as the whole layer.
  """
  if check(initialization) == "flax":
    return dict(
        kernel_init=nn.linear.default_kernel_init,
        bias_init=nn.initializers.zeros_init(),
    )
  bound = symmetric_uniform(1.0 / math.sqrt(fan_in))
  return dict(kernel_init=bound, bias_init=bound)


def conv(initialization: str, fan_in: int) -> dict:
  """`kernel_init` and `bias_init` of a convolution (PyTorch's ConvNd with
  its default initialization); `fan_in` = input channels x kernel size."""
  return dense(initialization, fan_in)  # PyTorch initializes both alike.


def embedding(initialization: str) -> nn.initializers.Initializer:
  """`embedding_init` of a (vocab, dim) table (PyTorch: N(0, 1))."""
  if check(initialization) == "flax":
    return nn.linear.default_embed_init
  return nn.initializers.normal(stddev=1.0)


def lstm(initialization: str, hidden_dim: int) -> dict:
  """`kernel_init`, `recurrent_init` and `bias_init` of a one-layer LSTM
  (`text_encoders.LSTM`; PyTorch: every tensor U(+-1/sqrt(hidden)))."""
  if check(initialization) == "flax":
    return {}  # The LSTM's own defaults, Flax's LSTM cell's.
  bound = symmetric_uniform(1.0 / math.sqrt(hidden_dim))
  return dict(kernel_init=bound, recurrent_init=bound, bias_init=bound)
