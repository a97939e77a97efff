"""The composer registry: every composer trains a few steps on random inputs
and ranks a gallery; formulas of the baselines checked against NumPy."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from irtf_jax import metrics
from irtf_jax import models
from irtf_jax.models import tirg_baselines
from irtf_jax.models.layers import FeatureNormalization

ALL_NAMES = {
    "image_only",
    "text_only",
    "concat",
    "tirg",
    "tirg_lastconv",
    "show_and_tell",
    "parameter_hashing",
    "attribute_as_operator",
    "relationship",
    "film",
    "compose_ae",
    "real_space_concat_ae",
}
D, B, T, VOCAB = 8, 6, 5, 11


def test_registry_holds_all_twelve():
  assert set(models.COMPOSERS) == ALL_NAMES


def _inputs(composer_class, seed):
  rng = np.random.default_rng(seed)
  image = (
      rng.normal(size=(B, 2, 2, D))
      if composer_class.operates_on == "map"
      else rng.normal(size=(B, D))
  ).astype(np.float32)
  lengths = rng.integers(1, T + 1, B).astype(np.int32)
  tokens = rng.integers(2, VOCAB, (B, T)).astype(np.int32)
  tokens[np.arange(T)[None] >= lengths[:, None]] = 0
  target = rng.normal(size=(B, D)).astype(np.float32)
  return (
      image,
      rng.normal(size=(B, D)).astype(np.float32),
      tokens,
      lengths,
      target,
  )


def _extras(composer_class, tokens, lengths, target, normalize):
  extras = {}
  if getattr(composer_class, "uses_tokens", False):
    extras.update(tokens=tokens, lengths=lengths)
  if getattr(composer_class, "uses_target", False):
    extras.update(target=target, normalize=normalize)
  return extras


@pytest.mark.parametrize("name", sorted(ALL_NAMES))
def test_composer_trains_and_ranks(name):
  composer_class = models.COMPOSERS[name]
  options = (
      {"vocab_size": VOCAB, "word_embed_dim": 4}
      if getattr(composer_class, "uses_tokens", False)
      else {}
  )
  composer = composer_class(embed_dim=D, conv_implementation="lax", **options)
  norm = FeatureNormalization(4.0, learn_scale=False)
  normalize = lambda x: norm.apply({}, x)

  def query(variables, image, text, tokens, lengths, target, train, rng):
    out, updates = composer.apply(
        variables,
        image,
        text,
        train=train,
        **_extras(composer_class, tokens, lengths, target, normalize),
        mutable=["batch_stats", "losses"],
        rngs={"dropout": rng},
    )
    if out.ndim == 4:
      out = jnp.mean(out, axis=(1, 2))
    return normalize(out), updates

  image, text, tokens, lengths, target = _inputs(composer_class, 0)
  variables = jax.jit(
      lambda image, text, tokens, lengths: composer.init(
          {"params": jax.random.key(0), "dropout": jax.random.key(1)},
          image,
          text,
          train=False,
          **_extras(composer_class, tokens, lengths, None, normalize),
      )
  )(image, text, tokens, lengths)
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  tx = optax.sgd(0.01)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, inputs, rng):
    def loss_fn(params):
      q, updates = query(
          {"params": params, "batch_stats": stats}, *inputs, True, rng
      )
      logits = q @ normalize(inputs[4]).T
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, jnp.arange(B)
      ).mean()
      extra = sum(jax.tree.leaves(updates.get("losses", {})), 0.0)
      return loss + extra, (updates.get("batch_stats", stats), extra)

    # The evaluation-mode query of the incoming parameters, in the same
    # compiled function (one compilation per composer).
    q_eval, _ = query(
        {"params": params, "batch_stats": stats}, *inputs[:4], None, False, rng
    )
    (loss, (stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return (
        optax.apply_updates(params, updates),
        stats,
        opt_state,
        loss,
        extra,
        q_eval,
    )

  inputs = _inputs(composer_class, 1)
  losses = []
  for _ in range(4):  # 3 steps; the 4th call's q is the trained model's
    params, stats, opt_state, loss, extra, q = step(
        params, stats, opt_state, inputs, jax.random.key(7)
    )  # same dropout
    losses.append(float(loss))
  losses = losses[:3]
  assert np.all(np.isfinite(losses)), losses
  if name not in ("image_only", "text_only"):  # parameter-free
    assert losses[-1] < losses[0], losses
  if name in ("compose_ae", "real_space_concat_ae"):
    assert float(extra) > 0  # the sown reconstruction (and symmetry) terms
  gallery = normalize(inputs[4])
  recall = metrics.recall_at_k(
      np.asarray(q @ gallery.T), np.arange(B), np.arange(B), ks=(1, 5)
  )
  assert set(recall) == {1, 5}
  assert 0.0 <= recall[1] <= recall[5] <= 1.0


def _params(module, *args, **kwargs):
  return jax.jit(
      lambda args: module.init(
          {"params": jax.random.key(3), "dropout": jax.random.key(4)},
          *args,
          **kwargs,
      )
  )(args)


def test_parameter_hashing_is_a_hashed_text_predicted_matrix():
  image, text, *_ = _inputs(tirg_baselines.ParameterHashing, 2)
  module = tirg_baselines.ParameterHashing(embed_dim=D, num_hashed_weights=7)
  variables = _params(module, image, text, train=False)
  p = variables["params"]
  bias_value = np.linspace(-1, 1, D).astype(np.float32)
  p = flax.core.copy(p, {"bias": bias_value})
  got = module.apply({"params": p}, image, text, train=False)
  bucket, sign = tirg_baselines._hash_tables(D, D, 7)
  candidates = text @ np.asarray(p["candidates"]["kernel"]) + np.asarray(
      p["candidates"]["bias"]
  )
  expected = (
      np.stack([(sign * candidates[b][bucket]) @ image[b] for b in range(B)])
      + bias_value
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_attribute_as_operator_mixes_learned_matrices():
  image, text, *_ = _inputs(tirg_baselines.AttributeAsOperator, 3)
  module = tirg_baselines.AttributeAsOperator(embed_dim=D, num_operators=3)
  p = _params(module, image, text, train=False)["params"]
  operators = np.asarray(p["operators"])
  np.testing.assert_allclose(
      operators, np.eye(D)[None].repeat(3, 0), atol=0.1
  )  # identity initialization
  logits = text @ np.asarray(p["choice"]["kernel"]) + np.asarray(
      p["choice"]["bias"]
  )
  weights = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = np.stack(
      [np.tensordot(weights[b], operators, 1) @ image[b] for b in range(B)]
  )
  np.testing.assert_allclose(
      module.apply({"params": p}, image, text, train=False),
      expected,
      rtol=1e-5,
      atol=1e-5,
  )


def test_relationship_sums_g_over_all_region_pairs():
  image, text, *_ = _inputs(tirg_baselines.Relationship, 4)
  module = tirg_baselines.Relationship(embed_dim=D, hidden_dim=5)
  p = jax.tree.map(
      np.asarray, _params(module, image, text, train=False)["params"]
  )
  got = module.apply({"params": p}, image, text, train=False)
  dense = lambda x, name: x @ p[name]["kernel"] + p[name].get("bias", 0.0)
  relu = lambda x: np.maximum(x, 0)
  coords = [(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)]  # 2x2 grid
  for b in range(B):
    regions = [
        np.concatenate([image[b, i // 2, i % 2], coords[i]]) for i in range(4)
    ]
    total = 0.0
    for ri in regions:
      for rj in regions:  # g on the concatenation [r_i, r_j, t]
        w1 = np.concatenate([
            p["g1_left"]["kernel"],
            p["g1_right"]["kernel"],
            p["g1_text"]["kernel"],
        ])
        h = relu(np.concatenate([ri, rj, text[b]]) @ w1 + p["g1_left"]["bias"])
        total = total + relu(dense(h, "g2"))
    expected = dense(relu(dense(total, "f1")), "f2")
    np.testing.assert_allclose(got[b], expected, rtol=1e-4, atol=1e-4)


def test_film_modulates_normalized_features():
  image, text, *_ = _inputs(tirg_baselines.FiLM, 5)
  module = tirg_baselines.FiLM(embed_dim=D, conv_implementation="lax")
  variables = jax.tree.map(
      np.asarray, _params(module, image, text, train=False)
  )
  p = variables["params"]
  got, _ = jax.jit(
      lambda v: module.apply(
          v, image, text, train=True, mutable=["batch_stats"]
      )
  )(variables)
  conv1x1 = np.maximum(
      np.einsum("bhwc,co->bhwo", image, p["conv1"]["kernel"][0, 0])
      + p["conv1"]["bias"],
      0,
  )
  padded = np.pad(conv1x1, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv3 = (
      sum(
          np.einsum(
              "bhwc,co->bhwo",
              padded[:, a : a + 2, c : c + 2],
              p["conv2"]["kernel"][a, c],
          )
          for a in range(3)
          for c in range(3)
      )
      + p["conv2"]["bias"]
  )
  mean, var = conv3.mean((0, 1, 2)), conv3.var((0, 1, 2))
  normed = (conv3 - mean) / np.sqrt(var + 1e-5)
  film = text @ p["film"]["kernel"] + p["film"]["bias"]
  gamma, beta = film[:, None, None, :D], film[:, None, None, D:]
  expected = conv1x1 + np.maximum(gamma * normed + beta, 0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_show_and_tell_ignores_padding_and_reads_the_image_first():
  image, text, tokens, lengths, _ = _inputs(tirg_baselines.ShowAndTell, 6)
  module = tirg_baselines.ShowAndTell(
      embed_dim=D, vocab_size=VOCAB, word_embed_dim=4
  )
  p = _params(module, image, text, train=False, tokens=tokens, lengths=lengths)
  run = jax.jit(
      lambda img, tok: module.apply(
          p, img, text, train=False, tokens=tok, lengths=lengths
      )
  )
  out = run(image, tokens)
  noisy = np.where(tokens == 0, 9, tokens).astype(np.int32)
  np.testing.assert_allclose(run(image, noisy), out, rtol=1e-6, atol=1e-6)
  assert np.all(
      np.abs(np.asarray(run(image + 1.0, tokens) - out)).max(1) > 1e-4
  )


def test_tirg_lastconv_equals_its_formula_on_the_tiled_map():
  """TIRG-LastConv feeds its first convolutions the text channels as one
  vector per image; against the formula written out on the tiled and
  concatenated map (training-mode BatchNorm, 3x3 convolutions, gate and
  residual), output and gradients agree to float32 rounding."""
  composer = models.COMPOSERS["tirg_lastconv"](embed_dim=D)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(B, 3, 3, D)).astype(np.float32))
  text = jnp.asarray(rng.normal(size=(B, D)).astype(np.float32))
  variables = composer.init(jax.random.key(0), image, text, train=True)
  params = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)),
      variables["params"],
  )
  rest = {k: v for k, v in variables.items() if k != "params"}

  def composed(params, image, text):
    out, _ = composer.apply(
        {"params": params, **rest},
        image,
        text,
        train=True,
        mutable=["batch_stats"],
    )
    return out

  def formula(params, image, text):
    z = jnp.concatenate(
        [image, jnp.broadcast_to(text[:, None, None, :], image.shape)], -1
    )

    def conv(p, x):
      y = jax.lax.conv_general_dilated(
          x,
          p["kernel"],
          (1, 1),
          ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision="highest",
      )
      return y + p["bias"]

    def branch(prefix):
      bn = params[f"{prefix}_bn"]
      mean = z.mean((0, 1, 2))
      var = ((z - mean) ** 2).mean((0, 1, 2))
      y = (z - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
      y = jax.nn.relu(conv(params[f"{prefix}_conv1"], y))
      return conv(params[f"{prefix}_conv2"], y)

    a = params["weights"]["a"]
    return a[0] * jax.nn.sigmoid(branch("gate")) * image + a[1] * branch("res")

  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(
        composed(params, image, text),
        formula(params, image, text),
        rtol=1e-4,
        atol=1e-4,
    )
    weights = jnp.asarray(rng.normal(size=image.shape).astype(np.float32))
    got = jax.grad(
        lambda *a: jnp.sum(composed(*a) * weights), argnums=(0, 1, 2)
    )(params, image, text)
    want = jax.grad(
        lambda *a: jnp.sum(formula(*a) * weights), argnums=(0, 1, 2)
    )(params, image, text)
  # float32 rounding (2^-24 relative) over sums of a few hundred terms
  # (9 taps x 2D channels, twice, and BatchNorm's), well within 1e-4.
  for (path, g), w in zip(
      jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)
  ):
    scale = float(jnp.max(jnp.abs(w))) + 1e-6
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * scale, err_msg=path)
