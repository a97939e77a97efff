"""The order of PyTorch's `named_parameters()` for irtf-jax's models.

The official Gradient Augmentation code (a fork of TIRG / ComposeAE) adds its
isotropic noise inside a loop over `model.named_parameters()`, so the noise a
tensor gets depends on its position in that order
(`regularizers.isotropic_gradient_augmentation(scaling="official")`).
`official_parameter_positions(composer)` gives each parameter of an irtf-jax
model the position its counterpart has in the official PyTorch model.

PyTorch lists a module's own parameters first, then its submodules' in
registration order, depth first. The official models are subclasses of
TIRG's `ImgEncoderTextEncoderBase`, which registers (in this order)
`normalization_layer` (the learned scale), `img_model` (torchvision's ResNet,
whose `fc` is TIRG's projection) and `text_model` (embedding, LSTM, output
layer); a composer then registers its own parameters (TIRG's scalars `a`,
which the top module owns and so come first of all) and its layers. Each
composer class names its layers in registration order (`torch_order`) and
its parameters the top module owns (`torch_own_parameters`). Within a layer,
weights come before biases, and an LSTM's four tensors come in PyTorch's
order. Parameters no rule names (a pretrained BERT text encoder, say) follow
their group in sorted order.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax

Path = tuple[str, ...]

# Within a layer: PyTorch's order of a layer's tensors.
_LEAF_RANK = {
    "kernel": 0,
    "scale": 0,
    "embedding": 0,
    "a": 0,
    "kernel_ih": 0,
    "kernel_hh": 1,
    "bias_ih": 2,
    "bias_hh": 3,
    "bias": 1,
}
# torchvision's BasicBlock registration order.
_BLOCK_ORDER = tuple(
    "conv1 bn1 conv2 bn2 downsample_conv downsample_bn".split()
)
_TEXT_ENCODER_ORDER = ("embedding", "lstm", "output")


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _sort_key(path: Path):
  return path[:-1], _LEAF_RANK.get(path[-1], 9), path[-1]


def _resnet_key(path: Path):
  """torchvision's order: conv1, bn1, layer1.0 ... layer4.1 (block order)."""
  match = re.fullmatch(r"layer(\d+)_(\d+)", path[0])
  if match is None:
    return (
        0,
        ("conv1", "bn1").index(path[0]) if path[0] in ("conv1", "bn1") else 2,
        0,
        0,
        _sort_key(path),
    )
  inner = path[1] if len(path) > 2 else ""
  rank = (
      _BLOCK_ORDER.index(inner) if inner in _BLOCK_ORDER else len(_BLOCK_ORDER)
  )
  return (1, int(match[1]), int(match[2]), rank, _sort_key(path))


def _take(paths: list[Path], prefixes: Sequence[str]) -> list[Path]:
  """The paths under each prefix ("a/b"), prefix by prefix, removed from
  `paths`; within a prefix, sorted layer by layer."""
  taken = []
  for prefix in prefixes:
    parts = tuple(prefix.split("/"))
    group = [p for p in paths if p[: len(parts)] == parts]
    taken.extend(sorted(group, key=_sort_key))
    for p in group:
      paths.remove(p)
  return taken


def official_order(paths: Sequence[Path], composer: type) -> list[Path]:
  """`paths` (of a RetrievalModel's params) in the official PyTorch order."""
  groups: dict[str, list[Path]] = {}
  for path in paths:
    groups.setdefault(path[0], []).append(path[1:])
  composer_paths = groups.pop("composer_module", [])
  own = _take(composer_paths, getattr(composer, "torch_own_parameters", ()))
  layers = _take(composer_paths, getattr(composer, "torch_order", ()))
  text = groups.pop("text_encoder", [])
  text = _take(text, _TEXT_ENCODER_ORDER) + sorted(text, key=_sort_key)
  ordered = [("composer_module",) + p for p in own]
  ordered += [
      ("normalization",) + p
      for p in sorted(groups.pop("normalization", []), key=_sort_key)
  ]
  ordered += [
      ("image_encoder",) + p
      for p in sorted(groups.pop("image_encoder", []), key=_resnet_key)
  ]
  ordered += [
      ("image_projection",) + p
      for p in sorted(groups.pop("image_projection", []), key=_sort_key)
  ]
  ordered += [("text_encoder",) + p for p in text]
  ordered += [
      ("composer_module",) + p
      for p in layers + sorted(composer_paths, key=_sort_key)
  ]
  for name in sorted(groups):
    ordered += [(name,) + p for p in sorted(groups[name], key=_sort_key)]
  return ordered


def official_parameter_positions(composer: type) -> Callable[[Any], Any]:
  """`positions(params)`: a pytree like `params` holding each leaf's 1-based
  position in the official model's `named_parameters()` order.

  Args:
    composer: the composer class of the model (`models.COMPOSERS[name]`).
  """

  def positions(params: Any) -> Any:
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [tuple(_key(k) for k in path) for path, _ in with_paths]
    rank = {
        path: i + 1 for i, path in enumerate(official_order(paths, composer))
    }
    return jax.tree.unflatten(treedef, [rank[p] for p in paths])

  return positions
