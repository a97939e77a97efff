"""The pure train step: (state, batch, rng) -> (state, metrics).

The step only composes what it is given: the model, the retrieval loss, the
optional input-gradient regularizer (adversarial GA, or FGSM adversarial
training) and the optax transformation (which carries isotropic GA, gradient
noise, weight decay and SGD). It is the same function under `jax.jit` and
under `jax.pmap`; `axis_name` is set only for the latter.

  L_all = L_CE + eta * L_S + L_GA^A      (+ L_GA^I through the optimizer)
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from irtf_jax import losses
from irtf_jax import regularizers

# ImageNet statistics (TIRG normalizes every dataset with them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 (..., H, W, 3) -> float32, scaled to [0, 1] and standardized."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with momentum, weight decay and step decay, plus gradient-level
  regularizers (isotropic GA; the gradient-noise baseline) from `config`.

  Order: noise terms and weight decay are added to the gradient before the
  momentum buffer, as PyTorch's SGD(weight_decay=...) and the official code's
  loss-level isotropic term do.

  Parameter groups (`models.parameter_labels`): the SGD update of the image
  encoder is scaled by `config.model.image_encoder.lr_multiplier` (SGD's
  update is linear in the learning rate, so this is PyTorch's per-group lr,
  momentum included), and frozen weights get a zero update.
  """
  from irtf_jax import models  # pylint: disable=g-import-not-at-top
  opt = config.optimizer
  schedule = optax.exponential_decay(
      opt.learning_rate, transition_steps=opt.lr_decay_steps,
      decay_rate=opt.lr_decay_factor, staircase=True)
  parts = []
  if config.ga.isotropic.gamma > 0:
    parts.append(regularizers.isotropic_gradient_augmentation(
        config.ga.isotropic.gamma, seed=config.seed + 1,
        distribution=config.ga.isotropic.distribution))
  if config.baselines.gradient_noise_eta > 0:
    parts.append(optax.add_noise(config.baselines.gradient_noise_eta,
                                 config.baselines.gradient_noise_gamma,
                                 seed=config.seed + 2))
  if opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  parts.append(optax.sgd(schedule, momentum=opt.momentum or None))
  labels = models.parameter_labels(config.model)
  if labels is not None:
    parts.append(optax.multi_transform(
        {"default": optax.identity(),
         "backbone": optax.scale(config.model.image_encoder.lr_multiplier),
         "frozen": optax.set_to_zero()}, labels))
  return optax.chain(*parts)


def learning_rate(config, step):
  opt = config.optimizer
  return opt.learning_rate * opt.lr_decay_factor ** (step // opt.lr_decay_steps)


def isotropic_noise_norm(opt_state) -> jax.Array | None:
  """The norm of the last isotropic GA noise, found in the optimizer state."""
  for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(
          x, regularizers.IsotropicGradientAugmentationState)):
    if isinstance(s, regularizers.IsotropicGradientAugmentationState):
      return s.noise_norm
  return None


def make_loss_fn(model: nn.Module, config, *, axis_name: str | None = None
                 ) -> Callable:
  """loss_fn(params, perturbable, batch, batch_stats, rng) -> (loss, aux).

  `perturbable` is the input the adversarial regularizers differentiate:
  the normalized query images ("query_image"), or an additive perturbation of
  the query texts' word embeddings, zero in the batch ("text_embedding").
  aux = (new batch_stats, dict of loss terms).
  """
  retrieval_loss = losses.retrieval_loss(config.loss.name)
  eta = config.loss.eta
  wrt = config.ga.adversarial.wrt

  def loss_fn(params, perturbable, batch, batch_stats, rng):
    if wrt == "query_image":
      query_images, text_perturbation = perturbable, None
    else:
      query_images = normalize_images(batch["query_image"])
      text_perturbation = perturbable
    (query, target), updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        query_images, batch["tokens"], batch["lengths"],
        normalize_images(batch["target_image"]), train=True,
        text_perturbation=text_perturbation,
        mutable=["batch_stats", "losses"], rngs={"dropout": rng})
    terms = {"ce": retrieval_loss(query, target, axis_name=axis_name)}
    if eta > 0:
      terms["similarity_matching"] = eta * losses.similarity_matching_loss(
          query, target)
    # Extra terms some models sow (e.g. autoencoder reconstructions).
    for name, values in flax.traverse_util.flatten_dict(
        updates.get("losses", {}), sep="/").items():
      terms[name] = sum(values)
    return sum(terms.values()), (updates["batch_stats"], terms)

  return loss_fn


def perturbable_input(model: nn.Module, config, batch) -> jax.Array:
  if config.ga.adversarial.wrt == "query_image":
    return normalize_images(batch["query_image"])
  b, t = batch["tokens"].shape
  return jnp.zeros((b, t, model.word_embed_dim), jnp.float32)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config, *, axis_name: str | None = None) -> Callable:
  """The pure step for `model`, optimizer `tx` and the regularizers in config."""
  loss_fn = make_loss_fn(model, config, axis_name=axis_name)
  adversarial = config.ga.adversarial
  objective = regularizers.adversarial_gradient_penalty(
      loss_fn, epsilon=adversarial.epsilon, q=adversarial.q, argnum=1,
      has_aux=True, with_penalty_in_aux=adversarial.epsilon > 0)
  objective = regularizers.fgsm_adversarial_loss(
      objective, epsilon=config.baselines.fgsm_epsilon, argnum=1,
      has_aux=True)
  penalized = adversarial.epsilon > 0

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:  # distinct dropout masks per device
      rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    (total, aux), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, perturbable_input(model, config, batch), batch,
        state.batch_stats, rng)
    (batch_stats, terms), ga_terms = aux if penalized else (aux, None)
    metrics = {"loss": total, **terms}
    if ga_terms is not None:
      metrics["adversarial_penalty"] = ga_terms.penalty
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
      metrics = lax.pmean(metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    noise_norm = isotropic_noise_norm(opt_state)
    if noise_norm is not None:
      metrics["isotropic_noise_norm"] = noise_norm
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               example_batch, rng) -> TrainState:
  """Initial TrainState from one (host) batch's shapes."""
  variables = model.init(
      {"params": rng, "dropout": jax.random.fold_in(rng, 1)},
      normalize_images(example_batch["query_image"]), example_batch["tokens"],
      example_batch["lengths"], normalize_images(example_batch["target_image"]),
      train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(params))
