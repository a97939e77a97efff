"""Isotropic GA's "official" scaling against a literal PyTorch port of the
official training loop, on the project's TIRG-LastConv model (small sizes).

The PyTorch model below mirrors the official code's TIRGLastConv in what
decides `named_parameters()` order (a TIRG `ImgEncoderTextEncoderBase`:
normalization layer, torchvision ResNet with its `fc`, LSTM text model; then
the scalars `a` and the `mod2d`, `mod2d_gate` branches). Both sides get the
same parameters and the same noise draw; the gradient each tensor receives
from the official loop must equal what the transform adds to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from irtf_jax import models
from irtf_jax import regularizers as ga
from irtf_jax.data.fixtures import random_batch
from tests.helpers import tiny_config

GAMMA = 0.01  # the official code's constant


class _BasicBlock(torch.nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(cout)
    self.relu = torch.nn.ReLU()
    self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = torch.nn.Sequential(
          torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
          torch.nn.BatchNorm2d(cout),
      )


class _ResNet10(torch.nn.Module):
  """torchvision's ResNet registration order, one block per stage."""

  def __init__(self, embed_dim):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(64)
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512)):
      setattr(
          self,
          f"layer{stage + 1}",
          torch.nn.Sequential(_BasicBlock(cin, width, 1 if stage == 0 else 2)),
      )
      cin = width
    self.fc = torch.nn.Sequential(torch.nn.Linear(512, embed_dim))


class _Normalization(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.norm_s = torch.nn.Parameter(torch.FloatTensor((4.0,)))


class _TextModel(torch.nn.Module):

  def __init__(self, vocab, word_dim, hidden_dim, embed_dim):
    super().__init__()
    self.embedding_layer = torch.nn.Embedding(vocab, word_dim)
    self.lstm = torch.nn.LSTM(word_dim, hidden_dim)
    self.fc_output = torch.nn.Sequential(
        torch.nn.Dropout(p=0.1), torch.nn.Linear(hidden_dim, embed_dim)
    )


def _branch(merged, channels):
  return torch.nn.Sequential(
      torch.nn.BatchNorm2d(merged),
      torch.nn.Conv2d(merged, merged, [3, 3], padding=1),
      torch.nn.ReLU(),
      torch.nn.Conv2d(merged, channels, [3, 3], padding=1),
  )


class _OfficialTirgLastConv(torch.nn.Module):

  def __init__(self, vocab, word_dim, hidden_dim, embed_dim):
    super().__init__()
    self.normalization_layer = _Normalization()
    self.soft_triplet_loss = torch.nn.Module()
    self.img_model = _ResNet10(embed_dim)
    self.text_model = _TextModel(vocab, word_dim, hidden_dim, embed_dim)
    self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
    self.mod2d = _branch(512 + embed_dim, 512)
    self.mod2d_gate = _branch(512 + embed_dim, 512)


_PREFIXES = (
    ("img_model.fc.0.", "image_projection/"),
    ("normalization_layer.norm_s", "normalization/scale"),
    ("img_model.", "image_encoder/"),
    ("text_model.embedding_layer.weight", "text_encoder/embedding/embedding"),
    ("text_model.lstm.", "text_encoder/lstm/"),
    ("text_model.fc_output.1.", "text_encoder/output/"),
    ("mod2d_gate.0.", "composer_module/gate_bn/"),
    ("mod2d_gate.1.", "composer_module/gate_conv1/"),
    ("mod2d_gate.3.", "composer_module/gate_conv2/"),
    ("mod2d.0.", "composer_module/res_bn/"),
    ("mod2d.1.", "composer_module/res_conv1/"),
    ("mod2d.3.", "composer_module/res_conv2/"),
    ("a", "composer_module/weights/a"),
)
_NAMES = {
    "weight_ih_l0": "kernel_ih",
    "weight_hh_l0": "kernel_hh",
    "bias_ih_l0": "bias_ih",
    "bias_hh_l0": "bias_hh",
}


def _jax_path(torch_name: str) -> str:
  """The irtf-jax parameter that a PyTorch parameter name corresponds to."""
  for prefix, replacement in _PREFIXES:
    if torch_name.startswith(prefix):
      rest = torch_name[len(prefix) :]
      break
  else:
    raise AssertionError(torch_name)
  path = replacement + rest
  path = path.replace("layer1.0", "layer1_0").replace("layer2.0", "layer2_0")
  path = path.replace("layer3.0", "layer3_0").replace("layer4.0", "layer4_0")
  path = (
      path.replace("downsample.0", "downsample_conv")
      .replace("downsample.1", "downsample_bn")
      .replace(".", "/")
  )
  *head, leaf = path.split("/")
  is_norm = any(
      h.startswith(("bn", "downsample_bn")) or h.endswith("_bn")
      for h in head[-1:]
  )
  leaf = _NAMES.get(leaf, leaf)
  if leaf == "weight":
    leaf = "scale" if is_norm else "kernel"
  return "/".join(head + [leaf])


def _to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # HWIO -> OIHW
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2 and "embedding" not in name:  # (in, out) -> (out, in)
    value = value.T
  elif value.ndim == 0:  # the scale: a 1-element tensor
    value = value.reshape(1)
  return np.ascontiguousarray(value)


def test_official_scaling_matches_the_official_pytorch_loop():
  config = tiny_config(**{"model.name": "tirg_lastconv"})
  model = models.build_model(config.model, vocab_size=12)
  batch = random_batch(0, 4)
  params = jax.jit(
      lambda: model.init(
          {"params": jax.random.key(0), "dropout": jax.random.key(1)},
          jnp.zeros((4, 32, 32, 3)),
          batch["tokens"],
          batch["lengths"],
          jnp.zeros((4, 32, 32, 3)),
          train=False,
      )
  )()["params"]
  flat = {
      "/".join(str(k.key) for k in path): np.asarray(v)
      for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }

  text = config.model.text_encoder
  reference = _OfficialTirgLastConv(
      12, text.word_embed_dim, text.hidden_dim, config.model.embed_dim
  )
  names = [name for name, _ in reference.named_parameters()]
  assert sorted(_jax_path(n) for n in names) == sorted(flat)  # one to one

  # The registration order the transform uses is PyTorch's.
  positions = models.official_parameter_positions(config.model)(params)
  flat_positions = {
      "/".join(str(k.key) for k in path): k_
      for path, k_ in jax.tree_util.tree_flatten_with_path(positions)[0]
  }
  assert [flat_positions[_jax_path(n)] for n in names] == list(
      range(1, len(names) + 1)
  )

  # The same parameters and the same draw on both sides.
  rng = np.random.default_rng(0)
  draws = {
      path: rng.normal(size=value.shape).astype(np.float32)
      for path, value in flat.items()
  }
  with torch.no_grad():
    for name, p in reference.named_parameters():
      value = _to_torch_layout(name, flat[_jax_path(name)])
      assert p.shape == value.shape, name
      p.copy_(torch.from_numpy(value))

  # The official loop (main.py, --random_grad), with randn_like(parms)
  # replaced by the shared draw.
  loss_value = torch.zeros(())
  regularization_loss = 0
  for name, parms in reference.named_parameters():
    xi = torch.from_numpy(_to_torch_layout(name, draws[_jax_path(name)]))
    regularization_loss += (xi * parms).mean()
    regularization_loss += parms.mean()
    loss_value = loss_value + GAMMA * regularization_loss
  loss_value.backward()

  leaf_paths = list(flat)  # jax.tree.leaves order
  calls = iter(leaf_paths)
  transform = ga.isotropic_gradient_augmentation(
      GAMMA,
      scaling="official",
      registration_order=models.official_parameter_positions(config.model),
      sampler=lambda key, shape, dtype: jnp.asarray(draws[next(calls)], dtype),
  )
  zeros = jax.tree.map(jnp.zeros_like, params)
  added, _ = transform.update(zeros, transform.init(zeros))
  added = dict(zip(leaf_paths, (np.asarray(x) for x in jax.tree.leaves(added))))

  count = len(names)
  for k, (name, p) in enumerate(reference.named_parameters(), start=1):
    got = _to_torch_layout(name, added[_jax_path(name)])
    want = p.grad.numpy()
    # Each element is GAMMA * (K - k + 1) / n * (xi + 1): float32 rounding of
    # a few operations, relative to the element's own magnitude.
    np.testing.assert_allclose(
        got,
        want,
        rtol=1e-5,
        atol=1e-7 * np.abs(want).max(),
        err_msg=f"{k}/{count} {name}",
    )
  assert count == 59  # ResNet-10: 41 + a + scale + 2 fc + 7 text + 12 branch
