"""The base config every `configs/*.py` starts from, and its validation.

Defaults are the Gradient Augmentation paper's code settings where it has
one (SGD momentum 0.9, lr 1e-2, weight decay 1e-6, lr x0.1 every 50k steps,
ResNet-18 + LSTM, embeddings of 512, eta 1e-3); GA itself is off here and
switched on per config or on the command line.
"""

from __future__ import annotations

import math

import ml_collections

from irtf_jax import data
from irtf_jax import evaluate
from irtf_jax import losses
from irtf_jax import models
from irtf_jax import parallel
from irtf_jax import train_step
from irtf_jax.regularizers import isotropic
from irtf_jax.regularizers import sampling


def dataset_options(name: str, **options) -> ml_collections.ConfigDict:
  """All loader options of dataset `name`: `options` over its defaults."""
  return ml_collections.ConfigDict(data.check_options(name, options))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "css_synth"
  c.data.data_dir = ""  # "" = ~/.cache/irtf_jax/tfds
  c.data.manual_dir = ""  # the user's copy of a dataset
  # The dataset's loader options, every one listed with its default so that
  # --config.data.options.<name>=... can override it.
  c.data.options = dataset_options("css_synth")
  c.data.fixture = False  # smoke runs: write a tiny copy in the real format
  # >0: build training batches in grain worker processes, and decode
  # evaluation images in as many threads. -1: none on a CPU backend, one per
  # host core but one (at most 8) beside a GPU or TPU
  # (data.pipeline.resolve_workers).
  c.data.workers = -1

  c.model = ml_collections.ConfigDict()
  c.model.name = "tirg_lastconv"
  c.model.embed_dim = 512
  c.model.normalization_scale = 4.0
  c.model.conv_implementation = "auto"
  # "torch": PyTorch's default initializers, as the official code (TIRG's)
  # gets them; "flax": Flax's. See irtf_jax/models/initializers.py.
  c.model.init = "torch"
  c.model.image_encoder = ml_collections.ConfigDict()
  c.model.image_encoder.depth = 18
  c.model.image_encoder.pretrained = ""  # torchvision .pth / .safetensors
  c.model.image_encoder.lr_multiplier = 1.0  # TIRG on real datasets: 0.1
  c.model.text_encoder = ml_collections.ConfigDict()
  c.model.text_encoder.name = "lstm"  # | "sentence_transformer" | "precomputed"
  c.model.text_encoder.pretrained = ""  # sentence-transformers model folder
  c.model.text_encoder.features = ""  # precomputed: .npz (texts, features)
  c.model.text_encoder.trainable = True  # fine-tune the sentence encoder
  c.model.text_encoder.word_embed_dim = 512
  c.model.text_encoder.hidden_dim = 512
  c.model.text_encoder.dropout = 0.1
  c.model.text_encoder.max_length = 24
  # ComposeAE's extra loss weights (its code: 0.1, 0.1, 0.01; main loss 1.0).
  c.model.compose_ae = ml_collections.ConfigDict()
  c.model.compose_ae.image_reconstruction_weight = 0.1
  c.model.compose_ae.text_reconstruction_weight = 0.1
  c.model.compose_ae.rotational_symmetry_weight = 0.01

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "batch_classification"
  c.loss.eta = 1e-3  # similarity matching weight

  c.ga = ml_collections.ConfigDict()
  c.ga.adversarial = ml_collections.ConfigDict()
  c.ga.adversarial.epsilon = 0.0  # paper: 1e-6
  c.ga.adversarial.q = 1.0
  c.ga.adversarial.wrt = "query_image"
  c.ga.isotropic = ml_collections.ConfigDict()
  c.ga.isotropic.gamma = 0.0  # paper: 1e-2
  # "official" (the official code's noise), "mean" or "element"; see
  # regularizers.isotropic_gradient_augmentation.
  c.ga.isotropic.scaling = "official"
  c.ga.isotropic.distribution = "gaussian"
  c.ga.isotropic.sampler = "auto"  # "hashed" on CPU, jax.random elsewhere

  # The regularizers the paper compares GA with.
  c.baselines = ml_collections.ConfigDict()
  c.baselines.fgsm_epsilon = 0.0  # FGSM adversarial training
  c.baselines.gradient_noise_eta = 0.0  # optax.add_noise (Neelakantan et al.)
  c.baselines.gradient_noise_gamma = 0.55

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-2
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-6
  c.optimizer.lr_decay_steps = 50_000
  c.optimizer.lr_decay_factor = 0.1

  c.batch_size = 32
  c.num_train_steps = 160_000
  c.log_every = 50
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.ks = (1, 5, 10, 50, 100)
  c.eval.max_test_queries = 0  # 0 = all
  c.eval.max_train_queries = 2000  # train-split recall (Ms) on a sample
  # Ms against the whole train split ("all") or against its first families
  # with as many images and queries as the test evaluation ("test_size"; see
  # evaluate.train_recall_split).
  c.eval.train_gallery = "all"
  c.eval.chunk_size = 1024
  c.eval.whm_alpha = 1.0
  c.eval.num_qualitative = 6

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "jit"
  c.precision = "float32"
  return c


def use_paper_ga(config: ml_collections.ConfigDict) -> None:
  """The GA paper's code settings: adversarial GA eps 1e-6 with q = 1 on the
  query pixels, isotropic GA gamma 1e-2 (eta 1e-3 and the optimizer are
  already the base defaults)."""
  config.ga.adversarial.epsilon = 1e-6
  config.ga.adversarial.q = 1.0
  config.ga.adversarial.wrt = "query_image"
  config.ga.isotropic.gamma = 1e-2


def paper_config(
    dataset: str, *, batch_size: int, num_train_steps: int
) -> ml_collections.ConfigDict:
  """A published benchmark with the GA paper's code settings: ResNet-18 +
  LSTM + TIRG-LastConv, SGD (the base defaults), GA on (`use_paper_ga`),
  evaluation on every test query every 10k steps."""
  config = base_config()
  config.data.name = dataset
  config.data.options = dataset_options(dataset)
  config.data.manual_dir = ""  # the user's copy: --config.data.manual_dir=...
  config.model.name = "tirg_lastconv"
  use_paper_ga(config)
  config.batch_size = batch_size
  config.num_train_steps = num_train_steps
  config.log_every = 100
  config.eval_every = 10_000
  config.checkpoint_every = 5_000
  config.eval.max_test_queries = 0  # all of them
  config.eval.max_train_queries = 0  # all of the loader's train-split queries
  return config


def unknown_argument(
    config_file: str, arg: str, allowed: tuple[str, ...] = ("", "smoke")
) -> ValueError:
  """The error a config file's `get_config(arg)` raises for an unknown arg."""
  return ValueError(
      f"{config_file}: unknown argument {arg!r}; allowed: "
      f"{', '.join(repr(a) for a in allowed)}"
  )


def use_smoke_settings(config: ml_collections.ConfigDict) -> None:
  """The `smoke` argument of the real-dataset configs: a tiny model, a few
  steps and one evaluation on a copy of the dataset written in its published
  format (`config.data.fixture`): the full code path in about a minute."""
  config.data.fixture = True
  config.model.embed_dim = 32
  config.model.image_encoder.depth = 10
  config.model.text_encoder.word_embed_dim = 16
  config.model.text_encoder.hidden_dim = 16
  config.batch_size = 16
  config.num_train_steps = 4
  config.log_every = 2
  config.eval_every = 4
  config.checkpoint_every = 4
  config.eval.batch_size = 64
  config.eval.max_test_queries = 200
  config.eval.max_train_queries = 200


class ConfigError(ValueError):
  """A config value is not usable; the message names the field and the fix."""


def _choices() -> dict[str, tuple]:
  """Fields naming one of a set: the allowed names, from the registries
  that hold them (so the two cannot disagree)."""
  return {
      "data.name": data.DATASETS,
      "model.name": tuple(sorted(models.COMPOSERS)),
      "model.text_encoder.name": models.TEXT_ENCODERS,
      "model.conv_implementation": models.CONV_IMPLEMENTATIONS,
      "model.init": models.INITIALIZATIONS,
      "model.image_encoder.depth": models.RESNET_DEPTHS,
      "precision": models.PRECISIONS,
      "loss.name": tuple(losses.RETRIEVAL_LOSSES),
      "ga.adversarial.wrt": train_step.PERTURBABLE_INPUTS,
      "ga.adversarial.q": (1.0, 2.0, math.inf),
      "ga.isotropic.distribution": isotropic.DISTRIBUTIONS,
      "ga.isotropic.scaling": isotropic.SCALINGS,
      "ga.isotropic.sampler": sampling.SAMPLERS,
      "parallel.strategy": parallel.STRATEGIES,
      "eval.train_gallery": evaluate.TRAIN_GALLERIES,
  }


_NON_NEGATIVE = (
    "loss.eta",
    "ga.adversarial.epsilon",
    "ga.isotropic.gamma",
    "baselines.fgsm_epsilon",
    "baselines.gradient_noise_eta",
    "baselines.gradient_noise_gamma",
    "optimizer.learning_rate",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "optimizer.lr_decay_factor",
    "model.text_encoder.dropout",
    "model.image_encoder.lr_multiplier",
    "model.normalization_scale",
    "eval.whm_alpha",
)
_POSITIVE_INTS = (
    "batch_size",
    "num_train_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "optimizer.lr_decay_steps",
    "eval.batch_size",
    "eval.chunk_size",
    "model.embed_dim",
    "model.text_encoder.max_length",
    "model.text_encoder.word_embed_dim",
    "model.text_encoder.hidden_dim",
)
_NON_NEGATIVE_INTS = (
    "seed",
    "eval.max_test_queries",
    "eval.max_train_queries",
    "eval.num_qualitative",
)
_BELOW_ONE = ("model.text_encoder.dropout", "optimizer.momentum")
_STRINGS = (
    "data.data_dir",
    "data.manual_dir",
    "model.image_encoder.pretrained",
    "model.text_encoder.pretrained",
    "model.text_encoder.features",
)


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate(config, num_devices: int) -> None:
  """Checks every field a run reads, before anything loads or compiles.

  Raises:
    ConfigError: one line naming `config.<field>`, the value, and what is
      allowed.
  """
  for field, allowed in _choices().items():
    value = _get(config, field)
    if isinstance(value, bool) or value not in allowed:
      raise ConfigError(
          f"config.{field}: unknown {value!r}; allowed: "
          f"{', '.join(map(str, allowed))}"
      )
  for field in _NON_NEGATIVE:
    value = _get(config, field)
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
      raise ConfigError(
          f"config.{field}: must be a finite number >= 0, got {value!r}"
      )
  for field in _BELOW_ONE:
    if not _get(config, field) < 1:
      raise ConfigError(
          f"config.{field}: must be < 1, got {_get(config, field)!r}"
      )
  for field in _POSITIVE_INTS:
    value = _get(config, field)
    if not (_is_int(value) and value > 0):
      raise ConfigError(
          f"config.{field}: must be a positive integer, got {value!r}"
      )
  for field in _NON_NEGATIVE_INTS:
    value = _get(config, field)
    if not (_is_int(value) and value >= 0):
      raise ConfigError(
          f"config.{field}: must be an integer >= 0, got {value!r}"
      )
  workers = config.data.workers
  if not (_is_int(workers) and workers >= -1):
    raise ConfigError(
        "config.data.workers: must be an integer >= -1 (-1: chosen for the "
        f"host), got {workers!r}"
    )
  for field in _STRINGS:
    if not isinstance(_get(config, field), str):
      raise ConfigError(
          f"config.{field}: must be a path (a string), got "
          f"{_get(config, field)!r}"
      )
  ks = config.eval.ks
  if not (
      isinstance(ks, (tuple, list))
      and ks
      and all(_is_int(k) and k > 0 for k in ks)
  ):
    raise ConfigError(
        "config.eval.ks: must be a non-empty tuple of "
        f"positive integers such as (1, 5, 10), got {ks!r}"
    )
  for field in ("batch_size", "eval.batch_size"):
    if _get(config, field) % num_devices:
      raise ConfigError(
          f"config.{field}: {_get(config, field)} is not divisible by the "
          f"{num_devices} devices; use a multiple of {num_devices}"
      )
  try:
    data.check_options(config.data.name, dict(config.data.options))
  except ValueError as e:
    raise ConfigError(str(e)) from None
