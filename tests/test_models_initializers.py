"""config.model.init="torch" initializes every layer as PyTorch's own layers.

Each parameter of the models is compared with the same tensor drawn by
PyTorch's initializers (torch.nn.Linear / Conv1d / Conv2d / LSTM /
Embedding / BatchNorm defaults, and torchvision's ResNet convolutions) for a
layer of the same shape: a two-sample Kolmogorov-Smirnov test on the values,
and for the uniforms the bound 1 / sqrt(fan_in) that both must respect and
approach. Kinds are named by the path of each parameter, so a layer missed
by the initialization (left at Flax's default) fails here; so does "flax",
checked to be rejected by the same comparison.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
import torch

from irtf_jax import config_base
from irtf_jax import models
from irtf_jax.data.fixtures import random_batch
from irtf_jax.models import bert
from irtf_jax.models import initializers
from irtf_jax.models import sentence_encoder
from irtf_jax.models.composers import COMPOSERS
from irtf_jax.models.layers import FeatureNormalization
from irtf_jax.train_step import normalize_images
from tests.helpers import tiny_config

# A KS p-value below this rejects "same distribution". Seeds are fixed, so
# each comparison is deterministic; over the ~1,000 comparisons here a true
# null falls below it with probability about 1e-3 in all.
P_REJECT = 1e-6
EMBED, CHANNELS, BATCH, VOCAB = 32, 48, 4, 400

# Parameters a model initializes on purpose, the same under both (paths
# inside the composer; "" = the retrieval model's own).
MODEL_OWN = {
    "": ("normalization/scale",),
    "tirg": ("weights/a",),
    "tirg_lastconv": ("weights/a",),
    "compose_ae": ("a",),
    "real_space_concat_ae": ("a",),
    "attribute_as_operator": ("operators",),
    "parameter_hashing": ("candidates/kernel", "bias"),
    "film": ("film/bias",),
}


def torch_reference(
    kind: str, shape: tuple[int, ...], fan_in: int, seed: int
) -> np.ndarray:
  """The tensor PyTorch's layer of this kind initializes, in the JAX
  parameter's layout and shape."""
  torch.manual_seed(seed)
  if kind == "dense_kernel":
    layer = torch.nn.Linear(fan_in, shape[1])
    # A part of a layer split in the JAX model (Relationship's g1) has
    # fewer rows than the whole layer's fan-in: take that many.
    return layer.weight.detach().numpy().T[: shape[0]]
  if kind == "dense_bias":
    return torch.nn.Linear(fan_in, shape[0]).bias.detach().numpy()
  if kind == "conv_bias":
    # PyTorch's conv bias depends on in_channels * kernel size only.
    return torch.nn.Conv1d(fan_in, shape[0], 1).bias.detach().numpy()
  if kind == "conv_kernel":
    *window, in_channels, out = shape
    conv = (torch.nn.Conv1d if len(window) == 1 else torch.nn.Conv2d)(
        in_channels, out, tuple(window)
    )
    weight = conv.weight.detach().numpy()  # (O, I, *k) -> (*k, I, O)
    return np.moveaxis(weight, (0, 1), (-1, -2))
  if kind == "resnet_conv":
    kh, kw, in_channels, out = shape
    conv = torch.nn.Conv2d(in_channels, out, (kh, kw), bias=False)
    # What torchvision's ResNet.__init__ does to every convolution.
    torch.nn.init.kaiming_normal_(
        conv.weight, mode="fan_out", nonlinearity="relu"
    )
    return conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  if kind == "embedding":
    return torch.nn.Embedding(*shape).weight.detach().numpy()
  if kind.startswith("lstm_"):
    hidden = fan_in
    lstm = torch.nn.LSTM(
        shape[0] if kind == "lstm_kernel_ih" else hidden, hidden
    )
    return (
        {
            "lstm_kernel_ih": lstm.weight_ih_l0.T,
            "lstm_kernel_hh": lstm.weight_hh_l0.T,
            "lstm_bias_ih": lstm.bias_ih_l0,
            "lstm_bias_hh": lstm.bias_hh_l0,
        }[kind]
        .detach()
        .numpy()
    )
  if kind in ("bn_scale", "bn_bias"):
    bn = torch.nn.BatchNorm1d(shape[0])
    return (bn.weight if kind == "bn_scale" else bn.bias).detach().numpy()
  raise ValueError(kind)


def classify(
    path: tuple[str, ...], siblings: dict, composer: str, composer_params: dict
) -> tuple[str, int] | None:
  """(kind, fan_in) of a parameter from its path (`composer_params`: the
  composer's own tree); None for a model's own initialization."""
  if path[0] == "composer_module":
    own, inner = MODEL_OWN.get(composer, ()), path[1:]
  else:
    own, inner = MODEL_OWN[""] + MODEL_OWN.get(composer, ()), path
  if "/".join(inner) in own:
    return None
  name = path[-1]
  if name in ("kernel_ih", "kernel_hh", "bias_ih", "bias_hh"):
    return f"lstm_{name}", siblings["kernel_hh"].shape[0]  # the hidden size
  if name == "embedding":
    return "embedding", 0
  if name in ("scale", "bias") and "kernel" not in siblings:
    return f"bn_{name}", 0
  if path[0] == "image_encoder":
    return "resnet_conv", 0
  kernel = siblings["kernel"]
  if composer == "relationship" and inner[0].startswith("g1_"):
    # One Linear on [r_i, r_j, phi_t], split in three parts.
    fan_in = (
        2 * composer_params["g1_left"]["kernel"].shape[0]
        + composer_params["g1_text"]["kernel"].shape[0]
    )
    return f"dense_{name}", fan_in
  if kernel.ndim == 2:
    return f"dense_{name}", kernel.shape[0]
  return f"conv_{name}", int(np.prod(kernel.shape[:-1]))


def leaves(params: dict, composer: str):
  """(seed, path, values, kind) of every parameter of `params` (a retrieval
  model's, or a composer's alone)."""
  composer_params = params.get("composer_module", params)
  flat = flax.traverse_util.flatten_dict(params)
  for seed, (path, leaf) in enumerate(sorted(flat.items())):
    siblings = params
    for key in path[:-1]:
      siblings = siblings[key]
    yield seed, path, np.asarray(leaf), classify(
        path, siblings, composer, composer_params
    )


def composer_inputs(name: str):
  """(image, text, extra kwargs) a composer of `name` receives."""
  rng = np.random.default_rng(0)
  cls = COMPOSERS[name]
  if cls.operates_on == "map":
    image = rng.normal(size=(BATCH, 2, 2, CHANNELS)).astype(np.float32)
  else:
    image = rng.normal(size=(BATCH, EMBED)).astype(np.float32)
  text = rng.normal(size=(BATCH, EMBED)).astype(np.float32)
  extra = {}
  if getattr(cls, "uses_tokens", False):
    extra = dict(
        tokens=jnp.asarray(rng.integers(2, 12, (BATCH, 5)), jnp.int32),
        lengths=jnp.full((BATCH,), 5, jnp.int32),
    )
  if getattr(cls, "uses_target", False):
    extra = dict(target=jnp.asarray(image), normalize=FeatureNormalization())
  return image, text, extra


def init_composer(name: str, initialization: str) -> dict:
  cls = COMPOSERS[name]
  options = (
      dict(vocab_size=12, word_embed_dim=16)
      if getattr(cls, "uses_tokens", False)
      else {}
  )
  module = cls(embed_dim=EMBED, initialization=initialization, **options)
  image, text, extra = composer_inputs(name)
  variables = module.init(
      {"params": jax.random.key(1), "dropout": jax.random.key(2)},
      image,
      text,
      train=False,
      **extra,
  )
  return flax.core.unfreeze(variables.get("params", {}))


@pytest.fixture(scope="module")
def retrieval_params():
  """init -> the params of a small retrieval model (TIRG, ResNet-10, LSTM)."""
  batch = random_batch(0, BATCH, image_size=16, vocab_size=VOCAB)
  params = {}
  for initialization in initializers.INITIALIZATIONS:
    config = tiny_config(**{"model.init": initialization})
    # A vocabulary big enough for the embedding's statistics to tell.
    model = models.build_model(config.model, vocab_size=VOCAB)
    init = jax.jit(
        lambda rng, model=model: model.init(
            {"params": rng, "dropout": rng},
            normalize_images(batch["query_image"]),
            batch["tokens"],
            batch["lengths"],
            normalize_images(batch["target_image"]),
            train=False,
        )
    )
    params[initialization] = flax.core.unfreeze(
        jax.device_get(init(jax.random.key(0))["params"])
    )
  return params


def compare(path, values, kind, fan_in, seed):
  """Asserts `values` are distributed as PyTorch's tensor of this kind."""
  reference = torch_reference(kind, values.shape, fan_in, seed)
  where = f"{'/'.join(path)} ({kind}, shape {values.shape})"
  assert reference.shape == values.shape, where
  if kind in ("bn_scale", "bn_bias"):
    np.testing.assert_array_equal(values, reference, err_msg=where)
    return
  if kind.startswith(("dense", "conv", "lstm")):  # U(+-1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    slack = bound * 2.0**-22  # a float32 rounding of the bound
    assert np.abs(reference).max() <= bound + slack, where  # the derivation
    assert np.abs(values).max() <= bound + slack, where
    if values.size >= 1000:
      # P(max |x| < b (1 - t)) = (1 - t)^n < e^-30 for t = 30 / n.
      assert np.abs(values).max() >= bound * (1 - 30 / values.size), where
  if values.size >= 8:
    x, y = values.ravel().astype(np.float64), reference.ravel()
    p = stats.ks_2samp(x, y).pvalue
    assert p > P_REJECT, f"{where}: KS p = {p:.2e} against PyTorch"
    # Mean and second moment: equal within 6 standard errors of their
    # difference (central limit theorem; 6 sigma: about 2e-9 per check).
    for a, b in ((x, y), (x * x, y * y)):
      error = math.sqrt(a.var() / a.size + b.var() / b.size)
      assert abs(a.mean() - b.mean()) <= 6 * error + 1e-12, where


def test_torch_init_matches_pytorch_in_the_retrieval_model(retrieval_params):
  own = flax.traverse_util.flatten_dict(retrieval_params["flax"])
  checked = set()
  for seed, path, values, kind in leaves(retrieval_params["torch"], "tirg"):
    if kind is None:
      np.testing.assert_array_equal(values, own[path])
    else:
      compare(path, values, *kind, seed=seed)
      checked.add(kind[0])
  assert checked >= {
      "resnet_conv",
      "bn_scale",
      "bn_bias",
      "dense_kernel",
      "dense_bias",
      "embedding",
      "lstm_kernel_ih",
      "lstm_kernel_hh",
      "lstm_bias_ih",
      "lstm_bias_hh",
  }


@pytest.mark.parametrize("name", sorted(COMPOSERS))
def test_torch_init_matches_pytorch_in_every_composer(name):
  own = flax.traverse_util.flatten_dict(init_composer(name, "flax"))
  for seed, path, values, kind in leaves(init_composer(name, "torch"), name):
    if kind is None:
      np.testing.assert_array_equal(values, own[path])
    else:
      compare(path, values, *kind, seed=100 + seed)


@pytest.mark.parametrize("encoder", ["sentence_transformer", "precomputed"])
def test_torch_init_of_the_pretrained_text_encoders_projection(encoder):
  tokens = jnp.ones((BATCH, 3), jnp.int32)
  lengths = jnp.full((BATCH,), 3, jnp.int32)
  if encoder == "sentence_transformer":
    module = sentence_encoder.SentenceTransformerEncoder(
        bert.BertConfig(
            vocab_size=12,
            hidden_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        ),
        output_dim=EMBED,
        initialization="torch",
    )
  else:
    module = sentence_encoder.PrecomputedTextEncoder(
        num_texts=5, feature_dim=40, output_dim=EMBED, initialization="torch"
    )
  params = module.init(jax.random.key(3), tokens, lengths)["params"]
  projection = params["projection"]
  for seed, name in enumerate(("kernel", "bias")):
    compare(
        ("projection", name),
        np.asarray(projection[name]),
        f"dense_{name}",
        40,
        seed=200 + seed,
    )


def test_flax_init_fails_the_same_comparison(retrieval_params):
  """The comparison has power: Flax's defaults differ from PyTorch's for
  Dense kernels, embeddings and LSTM kernels, and it sees each."""
  rejected = set()
  for seed, path, values, kind in leaves(retrieval_params["flax"], "tirg"):
    if (
        kind
        and kind[0]
        in ("dense_kernel", "embedding", "lstm_kernel_ih", "lstm_kernel_hh")
        and values.size >= 100
    ):
      with pytest.raises(AssertionError):
        compare(path, values, *kind, seed=seed)
      rejected.add(kind[0])
  assert rejected == {
      "dense_kernel",
      "embedding",
      "lstm_kernel_ih",
      "lstm_kernel_hh",
  }


def test_config_model_init_is_validated():
  config = tiny_config(**{"model.init": "kaiming"})
  with pytest.raises(
      ValueError,
      match=r"^config.model.init: unknown 'kaiming'; " r"allowed: flax, torch$",
  ):
    config_base.validate(config, num_devices=1)
  with pytest.raises(ValueError, match=r"^config.model.init: unknown"):
    models.build_model(config.model, vocab_size=12)
