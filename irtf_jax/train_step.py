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
from jax import lax
import jax.numpy as jnp
import optax

from irtf_jax import losses
from irtf_jax import models
from irtf_jax import regularizers
from irtf_jax.models import normalize_images

# What the adversarial regularizers may perturb (config.ga.adversarial.wrt):
# the normalized query images, or an additive perturbation of the query
# texts' word embeddings.
PERTURBABLE_INPUTS = ("query_image", "text_embedding")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


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
  opt = config.optimizer
  schedule = learning_rate_schedule(config)
  parts = []
  isotropic = config.ga.isotropic
  if isotropic.gamma > 0:
    parts.append(
        regularizers.isotropic_gradient_augmentation(
            isotropic.gamma,
            seed=config.seed + 1,
            scaling=isotropic.scaling,
            registration_order=(
                models.official_parameter_positions(config.model)
                if isotropic.scaling == "official"
                else None
            ),
            distribution=isotropic.distribution,
            sampler=isotropic.sampler,
        )
    )
  if config.baselines.gradient_noise_eta > 0:
    parts.append(
        optax.add_noise(
            config.baselines.gradient_noise_eta,
            config.baselines.gradient_noise_gamma,
            seed=config.seed + 2,
        )
    )
  if opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  parts.append(optax.sgd(schedule, momentum=opt.momentum or None))
  labels = models.parameter_labels(config.model)
  if labels is not None:
    parts.append(
        optax.multi_transform(
            {
                "default": optax.identity(),
                "backbone": optax.scale(
                    config.model.image_encoder.lr_multiplier
                ),
                "frozen": optax.set_to_zero(),
            },
            labels,
        )
    )
  return optax.chain(*parts)


def learning_rate_schedule(config) -> optax.Schedule:
  """Step decay: lr * factor ** (step // lr_decay_steps)."""
  opt = config.optimizer
  return optax.exponential_decay(
      opt.learning_rate,
      transition_steps=opt.lr_decay_steps,
      decay_rate=opt.lr_decay_factor,
      staircase=True,
  )


def model_inputs(model: nn.Module, batch, *, perturb_text: bool) -> dict:
  """The model's inputs from a host batch: normalized float images, the
  tokens, and with `perturb_text` a zero "text_embedding" perturbation of
  the word embeddings (the text-side input of the adversarial regularizers,
  which differentiate w.r.t. one of these entries)."""
  inputs = {
      "query_image": normalize_images(batch["query_image"]),
      "target_image": normalize_images(batch["target_image"]),
      "tokens": batch["tokens"],
      "lengths": batch["lengths"],
  }
  if perturb_text:
    b, t = batch["tokens"].shape
    inputs["text_embedding"] = jnp.zeros(
        (b, t, model.word_embed_dim), jnp.float32
    )
  return inputs


def make_loss_fn(
    model: nn.Module, config, *, axis_name: str | None = None
) -> Callable:
  """loss_fn(params, inputs, batch_stats, rng) -> (loss, aux).

  `inputs` is `model_inputs(...)`; aux = (new batch_stats, dict of loss
  terms).
  """
  retrieval_loss = losses.retrieval_loss(config.loss.name)
  eta = config.loss.eta

  def loss_fn(params, inputs, batch_stats, rng):
    (query, target), updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        inputs["query_image"],
        inputs["tokens"],
        inputs["lengths"],
        inputs["target_image"],
        train=True,
        text_perturbation=inputs.get("text_embedding"),
        mutable=["batch_stats", "losses"],
        rngs={"dropout": rng},
    )
    terms = {"ce": retrieval_loss(query, target, axis_name=axis_name)}
    if eta > 0:
      terms["similarity_matching"] = eta * losses.similarity_matching_loss(
          query, target
      )
    # Extra terms some models sow (e.g. autoencoder reconstructions).
    for name, values in flax.traverse_util.flatten_dict(
        updates.get("losses", {}), sep="/"
    ).items():
      terms[name] = sum(values)
    return sum(terms.values()), (updates["batch_stats"], terms)

  return loss_fn


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config,
    *,
    axis_name: str | None = None,
) -> Callable:
  """The pure step for `model`, optimizer `tx` and the regularizers in config."""
  loss_fn = make_loss_fn(model, config, axis_name=axis_name)
  adversarial = config.ga.adversarial
  objective = regularizers.fgsm_adversarial_loss(
      loss_fn,
      epsilon=config.baselines.fgsm_epsilon,
      argnums=1,
      wrt=adversarial.wrt,
      has_aux=True,
  )
  objective = regularizers.adversarial_gradient_penalty(
      objective,
      epsilon=adversarial.epsilon,
      q=adversarial.q,
      argnums=1,
      wrt=adversarial.wrt,
      has_aux=True,
  )
  perturb_text = adversarial.wrt == "text_embedding"

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:  # distinct dropout masks per device
      rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    inputs = model_inputs(model, batch, perturb_text=perturb_text)
    (total, ((batch_stats, terms), ga_terms)), grads = jax.value_and_grad(
        objective, has_aux=True
    )(state.params, inputs, state.batch_stats, rng)
    metrics = {"loss": total, **terms}
    if adversarial.epsilon > 0:
      metrics["adversarial_penalty"] = ga_terms.penalty
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
      metrics = lax.pmean(metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if config.ga.isotropic.gamma > 0:
      metrics["isotropic_noise_norm"] = optax.tree_utils.tree_get(
          opt_state, "noise_norm"
      )
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, metrics

  return train_step


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, example_batch, rng
) -> TrainState:
  """Initial TrainState from one (host) batch's shapes."""
  variables = model.init(
      {"params": rng, "dropout": jax.random.fold_in(rng, 1)},
      normalize_images(example_batch["query_image"]),
      example_batch["tokens"],
      example_batch["lengths"],
      normalize_images(example_batch["target_image"]),
      train=False,
  )
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(params),
  )
