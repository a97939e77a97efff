"""Eager PyTorch reference of the benchmarked train step.

The same model, loss and regularizers as the JAX step, written the way the
official PyTorch code of the Gradient Augmentation paper (a TIRG fork) is:
NCHW tensors, eager autograd, and `torch.autograd.grad(..., create_graph=True)`
for the adversarial penalty (double backprop).

Model: ResNet-18 in torchvision's layout (written out here: torchvision is not
a dependency), an embedding + one-layer LSTM text encoder (last valid output,
dropout 0.1, linear), TIRG-LastConv on the last convolutional map, mean pool,
a shared linear projection, and TIRG's learned-scale L2 normalization.

Loss: L = CE(softmax over q_i . t_j, label i) + eta * mean((q - t)^2), plus

  adversarial GA:  P = (eps / 2) * d ** (1 - 1/q) * mean_i || B * dL/dx_i ||_q
                   with q = 1 on the normalized query pixels x (so the dimension
                   factor is 1);
  isotropic GA:    g <- g + gamma * xi / n for every parameter of n elements,
                   xi ~ N(0, I) (the gradient of gamma * mean(xi * theta));
  FGSM:            (L(x) + L(x + eps * sign(dL/dx))) / 2.

Optimizer: SGD, momentum 0.9, weight decay 1e-6, lr 1e-2.

Device: CUDA when PyTorch sees a GPU (`default_device`), else the CPU; batches
move to it inside `Trainer.step`, as the official loop's `.cuda()` calls do.
Precision: float32, or bfloat16 autocast (`torch.autocast`) for the forward
passes, the counterpart of the JAX model's bfloat16 compute dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_device() -> torch.device:
  """CUDA when PyTorch sees a GPU, else the CPU."""
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_torch(batch: dict, device: torch.device | str = "cpu") -> dict:
  """The benchmark's numpy batch (NHWC uint8 images) -> torch tensors."""
  return {
      k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
      for k, v in batch.items()
  }


def normalize_images(images: torch.Tensor) -> torch.Tensor:
  """uint8 (B, H, W, 3) -> standardized float (B, 3, H, W)."""
  x = images.permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
  return (x - mean) / std


class BasicBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(y + residual)


class ResNet18Trunk(nn.Module):
  """torchvision's resnet18 up to layer4 (the last convolutional map)."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    layers, cin = [], 64
    for stage, width in enumerate((64, 128, 256, 512)):
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        layers.append(BasicBlock(cin, width, stride))
        cin = width
    self.layers = nn.Sequential(*layers)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    return self.layers(x)


class TextEncoder(nn.Module):

  def __init__(self, vocab_size: int, dim: int = 512):
    super().__init__()
    self.embedding = nn.Embedding(vocab_size, dim)
    self.lstm = nn.LSTM(dim, dim, batch_first=True)
    self.dropout = nn.Dropout(0.1)
    self.output = nn.Linear(dim, dim)

  def forward(self, tokens, lengths):
    outputs, _ = self.lstm(self.embedding(tokens.long()))
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = outputs[rows, lengths.long() - 1]
    return self.output(self.dropout(last))


class TirgLastConv(nn.Module):

  def __init__(self, channels: int = 512, text_dim: int = 512):
    super().__init__()
    width = channels + text_dim

    def branch():
      return nn.Sequential(
          nn.BatchNorm2d(width),
          nn.Conv2d(width, width, 3, 1, 1),
          nn.ReLU(),
          nn.Conv2d(width, channels, 3, 1, 1),
      )

    self.gate = branch()
    self.res = branch()
    self.a = nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))

  def forward(self, image_map, text):
    b, _, h, w = image_map.shape
    tiled = text[:, :, None, None].expand(b, text.shape[1], h, w)
    z = torch.cat([image_map, tiled], dim=1)
    return self.a[0] * torch.sigmoid(self.gate(z)) * image_map + self.a[
        1
    ] * self.res(z)


class RetrievalModel(nn.Module):

  def __init__(self, vocab_size: int, embed_dim: int = 512):
    super().__init__()
    self.image_encoder = ResNet18Trunk()
    self.image_projection = nn.Linear(512, embed_dim)
    self.text_encoder = TextEncoder(vocab_size, embed_dim)
    self.composer = TirgLastConv(512, embed_dim)
    self.scale = nn.Parameter(torch.tensor(4.0))

  def normalize(self, x):
    return self.scale * x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-12)

  def pool_and_project(self, image_map):
    return self.image_projection(image_map.mean(dim=(2, 3)))

  def embed_query(self, query_images, tokens, lengths):
    text = self.text_encoder(tokens, lengths)
    return self.normalize(
        self.pool_and_project(
            self.composer(self.image_encoder(query_images), text)
        )
    )

  def embed_target(self, target_images):
    return self.normalize(
        self.pool_and_project(self.image_encoder(target_images))
    )

  def forward(self, query_images, tokens, lengths, target_images):
    return (
        self.embed_query(query_images, tokens, lengths),
        self.embed_target(target_images),
    )


class Trainer:
  """One model, its optimizer, and the variant's regularizers."""

  def __init__(
      self,
      vocab_size: int,
      *,
      eta: float = 1e-3,
      isotropic_gamma: float = 0.0,
      adversarial_epsilon: float = 0.0,
      fgsm_epsilon: float = 0.0,
      learning_rate: float = 1e-2,
      device: torch.device | str | None = None,
      precision: str = "float32",
  ):
    if precision not in ("float32", "bfloat16"):
      raise ValueError(f"precision={precision!r}: float32 or bfloat16")
    self.device = torch.device(device) if device else default_device()
    self.autocast = precision == "bfloat16"
    self.model = RetrievalModel(vocab_size).to(self.device)
    self.model.train()
    self.optimizer = torch.optim.SGD(
        self.model.parameters(),
        lr=learning_rate,
        momentum=0.9,
        weight_decay=1e-6,
    )
    self.eta = eta
    self.isotropic_gamma = isotropic_gamma
    self.adversarial_epsilon = adversarial_epsilon
    self.fgsm_epsilon = fgsm_epsilon

  def loss(self, query_images, batch, target_images):
    with torch.autocast(
        self.device.type, dtype=torch.bfloat16, enabled=self.autocast
    ):
      query, target = self.model(
          query_images, batch["tokens"], batch["lengths"], target_images
      )
    query, target = query.float(), target.float()
    logits = query @ target.t()
    labels = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits, labels)
    if self.eta > 0:
      loss = loss + self.eta * ((query - target) ** 2).mean()
    return loss

  def step(self, batch: dict) -> float:
    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
    query_images = normalize_images(batch["query_image"])
    target_images = normalize_images(batch["target_image"])
    self.optimizer.zero_grad(set_to_none=True)
    if self.adversarial_epsilon > 0 or self.fgsm_epsilon > 0:
      query_images.requires_grad_(True)
    loss = self.loss(query_images, batch, target_images)
    if self.adversarial_epsilon > 0:
      (input_grad,) = torch.autograd.grad(loss, query_images, create_graph=True)
      b = input_grad.shape[0]
      penalty = (self.adversarial_epsilon / 2) * (b * input_grad).abs().flatten(
          1
      ).sum(1).mean()
      loss = loss + penalty
    elif self.fgsm_epsilon > 0:
      (input_grad,) = torch.autograd.grad(loss, query_images, retain_graph=True)
      perturbed = (
          query_images + self.fgsm_epsilon * input_grad.sign()
      ).detach()
      loss = (loss + self.loss(perturbed, batch, target_images)) / 2
    loss.backward()
    if self.isotropic_gamma > 0:
      with torch.no_grad():
        for p in self.model.parameters():
          p.grad.add_(
              torch.randn_like(p), alpha=self.isotropic_gamma / p.numel()
          )
    self.optimizer.step()
    return float(loss)
