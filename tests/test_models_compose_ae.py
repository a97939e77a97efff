"""ComposeAE's loss terms on inputs with known answers, its pieces against
PyTorch, and its wiring in the retrieval model and the train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from irtf_jax import models
from irtf_jax import train_step as train_step_lib
from irtf_jax.data.fixtures import random_batch
from irtf_jax.models import compose_ae
from tests.helpers import tiny_config


def test_reconstruction_loss_is_mean_squared_error():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  y = x + np.array([[1, 0, 0], [0, 2, 0]], np.float32)
  # (1 + 4) / 6, the mean over all elements (PyTorch's MSELoss).
  np.testing.assert_allclose(
      compose_ae.reconstruction_loss(y, x), 5 / 6, rtol=1e-6
  )
  assert float(compose_ae.reconstruction_loss(x, x)) == 0.0


def test_rotational_symmetry_loss_closed_form():
  # Orthogonal features of norm s: logits s^2 on the diagonal, 0 elsewhere,
  # so CE = log(1 + (B - 1) exp(-s^2)) for every row.
  b, s = 4, 2.0
  source = s * np.eye(b, 6, dtype=np.float32)
  expected = np.log(1 + (b - 1) * np.exp(-s * s))
  np.testing.assert_allclose(
      compose_ae.rotational_symmetry_loss(source, source), expected, rtol=1e-5
  )
  # Swapping two rows: rows 0 and 1 score s^2 on a wrong source and 0 on
  # their own, CE = log(exp(s^2) + B - 1) there.
  swapped = source[[1, 0, 2, 3]]
  wrong = np.log(np.exp(s * s) + b - 1)
  np.testing.assert_allclose(
      compose_ae.rotational_symmetry_loss(swapped, source),
      (2 * wrong + 2 * expected) / 4,
      rtol=1e-5,
  )


def test_conjugate_rotation_undoes_the_text_rotation():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5))
  delta = rng.normal(size=(3, 5)) * 3
  re, im = compose_ae.complex_rotation(z, delta)
  np.testing.assert_allclose(re + 1j * im, z * np.exp(1j * delta), rtol=1e-6)
  cre, cim = compose_ae.complex_rotation(np.ones_like(z), delta, conjugate=True)
  undone = (re + 1j * im) * (cre + 1j * cim)
  np.testing.assert_allclose(undone, z, atol=1e-6)  # rotation undone exactly
  # ... so the symmetry term of a composition that returns exactly to the
  # source is the loss of perfectly matching features, which tends to 0 with
  # the normalization scale.
  source = 30.0 * z / np.linalg.norm(z, axis=1, keepdims=True)
  back = 30.0 * undone.real / np.linalg.norm(undone.real, axis=1, keepdims=True)
  assert float(compose_ae.rotational_symmetry_loss(back, source)) < 1e-6


def test_adaptive_max_pool_matches_pytorch():
  rng = np.random.default_rng(1)
  for length, size in ((32, 16), (37, 16), (24, 20)):
    x = rng.normal(size=(2, length, 3)).astype(np.float32)
    expected = (
        torch.nn.AdaptiveMaxPool1d(size)(torch.from_numpy(x.transpose(0, 2, 1)))
        .numpy()
        .transpose(0, 2, 1)
    )
    np.testing.assert_array_equal(
        compose_ae.adaptive_max_pool_1d(x, size), expected
    )


def test_retrieval_model_feeds_the_target_and_sums_the_terms():
  # Native convolutions: the fastest to compile for these tiny maps.
  config = tiny_config(**{
      "model.name": "compose_ae",
      "model.embed_dim": 8,
      "batch_size": 4,
      "model.conv_implementation": "lax",
  })
  model = models.build_model(config.model, 12)
  batch = random_batch(0, 4, image_size=16)
  variables = jax.jit(
      lambda rng: model.init(
          {"params": rng, "dropout": rng},
          models.normalize_images(batch["query_image"]),
          batch["tokens"],
          batch["lengths"],
          models.normalize_images(batch["target_image"]),
          train=False,
      )
  )(jax.random.key(0))
  loss_fn = train_step_lib.make_loss_fn(model, config)
  images = lambda key: models.normalize_images(batch[key])

  def by_hand(variables, rng):
    """The weighted symmetry term from the model's own pieces, called in the
    order __call__ calls them (so dropout masks and BatchNorm batches agree):
    0.01 x CE(N(compose_conj(target, text)), N(source))."""

    def f(m):
      text = m.text_encoder(batch["tokens"], batch["lengths"], train=True)
      source = m.pool_and_project(m.image_encoder(images("query_image"), True))
      target = m.pool_and_project(m.image_encoder(images("target_image"), True))
      m.composer_module.compose(source, text, train=True)
      back = m.composer_module.compose(target, text, conjugate=True, train=True)
      return 0.01 * compose_ae.rotational_symmetry_loss(
          m.normalization(back), m.normalization(source)
      )

    return model.apply(
        variables, method=f, rngs={"dropout": rng}, mutable=["batch_stats"]
    )[0]

  @jax.jit
  def run(variables, rng):
    inputs = train_step_lib.model_inputs(model, batch, perturb_text=False)
    loss, (_, terms) = loss_fn(
        variables["params"], inputs, variables["batch_stats"], rng
    )
    return loss, terms, by_hand(variables, rng)

  loss, terms, expected_symmetry = run(variables, jax.random.key(1))
  names = {
      "ce",
      "similarity_matching",
      "composer_module/image_reconstruction",
      "composer_module/text_reconstruction",
      "composer_module/rotational_symmetry",
  }
  assert set(terms) == names
  np.testing.assert_allclose(loss, sum(terms.values()), rtol=1e-6)
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values())
  np.testing.assert_allclose(
      terms["composer_module/rotational_symmetry"], expected_symmetry, rtol=1e-5
  )


def test_symmetry_term_is_the_conjugate_composition_of_the_target():
  """Composer level, dropout off: the sown term equals the weight times the
  CE of the conjugate-composed target against the source image feature."""
  composer = compose_ae.ComposeAE(embed_dim=8, rotational_symmetry_weight=0.5)
  rng = np.random.default_rng(2)
  image, text, target = (
      rng.normal(size=(5, 8)).astype(np.float32) for _ in range(3)
  )
  normalize = lambda x: 4.0 * x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  variables = jax.jit(lambda key: composer.init(key, image, text, train=False))(
      jax.random.key(0)
  )

  def sown(module, variables):
    # train=True with a dropout rng, but BatchNorm in train mode and dropout
    # both enter: compare against the same module method under the same rng.
    _, updates = module.apply(
        variables,
        image,
        text,
        train=True,
        target=target,
        normalize=normalize,
        mutable=["batch_stats", "losses"],
        rngs={"dropout": jax.random.key(5)},
    )
    return updates["losses"]

  def manual(variables):
    def f(m):
      m.compose(image, text, train=True)  # same rng consumption order
      back = m.compose(target, text, conjugate=True, train=True)
      return 0.5 * compose_ae.rotational_symmetry_loss(
          normalize(back), normalize(image)
      )

    return composer.apply(
        variables,
        method=f,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(5)},
    )[0]

  losses = jax.jit(lambda v: sown(composer, v))(variables)
  np.testing.assert_allclose(
      losses["rotational_symmetry"][0], jax.jit(manual)(variables), rtol=1e-5
  )
  assert set(losses) == {
      "image_reconstruction",
      "text_reconstruction",
      "rotational_symmetry",
  }
  # Weight 0 switches the term off; RealSpaceConcatAE never has it.
  off = compose_ae.ComposeAE(embed_dim=8, rotational_symmetry_weight=0.0)
  assert "rotational_symmetry" not in jax.jit(lambda v: sown(off, v))(variables)


def test_optimizer_scales_backbone_and_freezes_groups():
  config = tiny_config(**{
      "model.image_encoder.lr_multiplier": 0.1,
      "optimizer.momentum": 0.0,
      "optimizer.weight_decay": 0.0,
  })
  params = {
      "image_encoder": {"w": jnp.ones(2)},
      "image_projection": {"w": jnp.ones(2)},
      "text_encoder": {"features": jnp.ones(2), "projection": jnp.ones(2)},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  tx = train_step_lib.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = config.optimizer.learning_rate
  np.testing.assert_allclose(updates["image_encoder"]["w"], -0.1 * lr)
  np.testing.assert_allclose(updates["image_projection"]["w"], -lr)
  config.model.text_encoder.name = "precomputed"
  tx = train_step_lib.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["text_encoder"]["features"], 0.0)
  np.testing.assert_allclose(updates["text_encoder"]["projection"], -lr)
  # Defaults leave the optimizer as it was (no extra state).
  default = tiny_config()
  assert models.parameter_labels(default.model) is None
  plain = train_step_lib.make_optimizer(default)
  assert len(plain.init(params)) == len(
      optax.chain(
          optax.add_decayed_weights(1e-6), optax.sgd(1.0, momentum=0.9)
      ).init(params)
  )
