"""resnet_from_torch against a PyTorch ResNet-18 with torchvision's names."""

from __future__ import annotations

import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch
from torch import nn

from irtf_jax import models
from irtf_jax.data.fixtures import random_batch
from irtf_jax.models import image_encoders
from irtf_jax.models import pretrained
from tests.helpers import load_repo_module
from tests.helpers import tiny_config

# torchvision's BasicBlock, written from its definition (torchvision is not a
# dependency) for the PyTorch reference of the benchmarks.
TorchBasicBlock = load_repo_module(
    "benchmarks/torch_reference.py", "torch_reference"
).BasicBlock


class TorchResNet18(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inp = 64
    for i, width in enumerate((64, 128, 256, 512)):
      stride = 1 if i == 0 else 2
      setattr(
          self,
          f"layer{i + 1}",
          nn.Sequential(
              TorchBasicBlock(inp, width, stride),
              TorchBasicBlock(width, width, 1),
          ),
      )
      inp = width
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(512, 1000)

  def pooled(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
    return torch.flatten(self.avgpool(x), 1)


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = TorchResNet18()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):  # non-trivial inference statistics
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


def _check_parity(torch_model, path):
  images = (
      np.random.default_rng(1).normal(size=(3, 64, 64, 3)).astype(np.float32)
  )
  with torch.no_grad():
    expected = torch_model.pooled(
        torch.from_numpy(images.transpose(0, 3, 1, 2))
    ).numpy()
  module, variables = image_encoders.resnet_from_torch(
      str(path), depth=18, conv_implementation="lax"
  )
  got = np.asarray(
      jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images)
  )
  assert got.shape == (3, 512)
  np.testing.assert_allclose(
      got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
  )


def test_pth_state_dict_parity(torch_model, tmp_path):
  path = tmp_path / "resnet18.pth"
  torch.save(torch_model.state_dict(), path)
  _check_parity(torch_model, path)


def test_safetensors_parity(torch_model, tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  path = tmp_path / "resnet18.safetensors"
  save_file(
      {k: v.contiguous() for k, v in torch_model.state_dict().items()},
      str(path),
  )
  _check_parity(torch_model, path)


def test_reader_rebuilds_strided_and_typed_tensors(tmp_path):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  state = {
      "t": base.t(),
      "slice": base[1:, 2:5],
      "half": base.half(),
      "long": torch.arange(5),
      "scalar": torch.tensor(3.5),
  }
  path = tmp_path / "odd.pt"
  torch.save(state, path)
  got = pretrained.read_torch_state_dict(str(path))
  for name, value in state.items():
    np.testing.assert_array_equal(got[name], value.numpy())
    assert got[name].dtype == value.numpy().dtype


def test_reader_refuses_code_in_pickles(tmp_path):
  path = tmp_path / "evil.pth"
  torch.save({"w": torch.ones(2)}, path)
  # Replace data.pkl by a pickle that would call os.system on load.
  with zipfile.ZipFile(path) as z:
    entries = {n: z.read(n) for n in z.namelist()}
  pkl = [n for n in entries if n.endswith("data.pkl")][0]
  entries[pkl] = pickle.dumps(Evil(), protocol=2)
  with zipfile.ZipFile(path, "w") as z:
    for n, b in entries.items():
      z.writestr(n, b)
  with pytest.raises(pickle.UnpicklingError, match="refuses to load global"):
    pretrained.read_torch_state_dict(str(path))


class Evil:

  def __reduce__(self):
    import os  # pylint: disable=g-import-not-at-top

    return (os.system, ("echo unsafe",))


def test_wrong_depth_and_missing_file(torch_model, tmp_path):
  path = tmp_path / "r18.pth"
  torch.save(torch_model.state_dict(), path)
  with pytest.raises(ValueError, match="deeper than the requested ResNet-10"):
    image_encoders.resnet_variables_from_torch(str(path), depth=10)
  with pytest.raises(ValueError, match="missing tensor .layer1.2.conv1.weight"):
    image_encoders.resnet_variables_from_torch(str(path), depth=34)
  with pytest.raises(FileNotFoundError, match="no such weights file"):
    image_encoders.resnet_variables_from_torch(str(tmp_path / "x.pth"))
  legacy = tmp_path / "legacy.pth"
  torch.save(
      torch_model.state_dict(), legacy, _use_new_zipfile_serialization=False
  )
  with pytest.raises(ValueError, match="not a zip-format torch checkpoint"):
    image_encoders.resnet_variables_from_torch(str(legacy))


def test_config_loads_pretrained_resnet_into_the_retrieval_model(tmp_path):
  torch.manual_seed(3)
  # A ResNet-10 state dict (one BasicBlock per stage) in torchvision's names.
  state = {"conv1.weight": torch.randn(64, 3, 7, 7)}
  for name in ("weight", "bias", "running_mean", "running_var"):
    state[f"bn1.{name}"] = torch.rand(64)
  inp = 64
  for stage, width in enumerate((64, 128, 256, 512)):
    t = f"layer{stage + 1}.0"
    state[f"{t}.conv1.weight"] = torch.randn(width, inp, 3, 3)
    state[f"{t}.conv2.weight"] = torch.randn(width, width, 3, 3)
    bns = ["bn1", "bn2"]
    if stage > 0:
      state[f"{t}.downsample.0.weight"] = torch.randn(width, inp, 1, 1)
      bns.append("downsample.1")
    for bn in bns:
      for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"{t}.{bn}.{name}"] = torch.rand(width)
    inp = width
  path = tmp_path / "resnet10.pth"
  torch.save(state, path)
  config = tiny_config(**{"model.image_encoder.pretrained": str(path)})
  model = models.build_model(config.model, 12)
  batch = random_batch(0, 2, image_size=16)
  init = lambda m: m.init(
      jax.random.key(0),
      batch["query_image"].astype(np.float32),
      batch["tokens"],
      batch["lengths"],
      batch["target_image"].astype(np.float32),
      train=False,
  )
  # Shapes only (traced, nothing compiled); load_pretrained fills them in.
  loaded = models.load_pretrained(
      jax.eval_shape(lambda: init(model)), config.model
  )
  encoder = loaded["params"]["image_encoder"]
  np.testing.assert_array_equal(
      encoder["layer2_0"]["downsample_conv"]["kernel"],
      state["layer2.0.downsample.0.weight"].numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      loaded["batch_stats"]["image_encoder"]["layer4_0"]["bn2"]["var"],
      state["layer4.0.bn2.running_var"].numpy(),
  )
  assert encoder["conv1"]["kernel"].shape == (7, 7, 3, 64)
  wrong = tiny_config(**{
      "model.image_encoder.pretrained": str(path),
      "model.image_encoder.depth": 18,
  })
  with pytest.raises(ValueError, match="missing tensor 'layer1.1.conv1"):
    models.load_pretrained(
        jax.eval_shape(lambda: init(models.build_model(wrong.model, 12))),
        wrong.model,
    )
