"""Which input an adversarial regularizer perturbs, and its gradient.

A loss is differentiated w.r.t. one positional argument (`argnums`), or only
the leaves of it that a selector `wrt` picks: a Flax-style
`loss_fn(params, batch)` keeps token ids and labels in the same dict as the
images, and only the images are perturbed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

# A selector of the perturbed leaves: a callable on the argument's pytree, a
# key of a dict argument, or None (every leaf).
Selector = Callable[[Any], Any] | str | None


def batch_size(leaves: Sequence[Any], caller: str, what: str) -> int:
  """The leading-axis size the leaves share, checked."""
  if not leaves:
    raise ValueError(
        f"{caller}: {what} selects no array; point argnums/wrt "
        "at the batched input to perturb."
    )
  for leaf in leaves:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{caller}: {what} selects a leaf of dtype {dtype}; the perturbed "
          "input must be floating point (select it with wrt=, e.g. "
          "wrt=lambda batch: batch['image'], and leave token ids out)."
      )
    if jnp.ndim(leaf) < 1:
      raise ValueError(
          f"{caller}: {what} selects a scalar; every perturbed "
          "leaf needs a leading batch axis."
      )
  sizes = sorted({int(jnp.shape(leaf)[0]) for leaf in leaves})
  if len(sizes) != 1:
    raise ValueError(
        f"{caller}: the leaves {what} selects have different leading (batch) "
        f"sizes {sizes}; give every perturbed leaf the same batch axis."
    )
  return sizes[0]


class _Marker:
  """Stands in for leaf `index` while `wrt` is applied to the structure."""

  def __init__(self, index: int):
    self.index = index


def selected_positions(arg: Any, wrt: Selector, caller: str) -> list[int]:
  """Positions (in `jax.tree.leaves(arg)`) of the leaves `wrt` selects."""
  leaves, treedef = jax.tree.flatten(arg)
  if wrt is None:
    return list(range(len(leaves)))
  markers = jax.tree.unflatten(
      treedef, [_Marker(i) for i in range(len(leaves))]
  )
  try:
    selected = markers[wrt] if isinstance(wrt, str) else wrt(markers)
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(
        f"{caller}: wrt could not select from the perturbed argument "
        f"({type(e).__name__}: {e}); wrt must pick leaves of it by index or "
        "attribute access only, e.g. "
        "wrt=lambda batch: batch['query_image'] or wrt='query_image'."
    ) from e
  picked = jax.tree.leaves(selected)
  if not all(isinstance(p, _Marker) for p in picked):
    raise ValueError(
        f"{caller}: wrt must return leaves of its argument (index or attribute "
        "access only, no arithmetic), got "
        f"{[type(p).__name__ for p in picked if not isinstance(p, _Marker)]}."
    )
  positions = [p.index for p in picked]
  if len(set(positions)) != len(positions):
    raise ValueError(f"{caller}: wrt selects the same leaf twice.")
  return positions


def _check_argnums(argnums: int, args: tuple, caller: str) -> None:
  if not isinstance(argnums, int) or not 0 <= argnums < len(args):
    raise ValueError(
        f"{caller}: argnums={argnums!r} but the loss was called with "
        f"{len(args)} positional arguments; set argnums to the position of "
        "the argument holding the input to perturb (keyword arguments cannot "
        "be perturbed)."
    )


def input_gradient(loss_fn, args, kwargs, argnums, wrt, has_aux, caller):
  """One forward and one backward pass of loss_fn w.r.t. the selected leaves.

  Returns:
    (loss, aux or None, gradients of the selected leaves (a list), and
    `loss_of`: loss_fn's value as a function of new values of those leaves,
    the rest of the arguments fixed).
  """
  _check_argnums(argnums, args, caller)
  leaves, treedef = jax.tree.flatten(args[argnums])
  positions = selected_positions(args[argnums], wrt, caller)
  selected = [leaves[p] for p in positions]
  batch_size(
      selected,
      caller,
      f"argument {argnums}" + ("" if wrt is None else " through wrt"),
  )

  def loss_of(values):
    new_leaves = list(leaves)
    for position, value in zip(positions, values):
      new_leaves[position] = value
    new_arg = jax.tree.unflatten(treedef, new_leaves)
    return loss_fn(*args[:argnums], new_arg, *args[argnums + 1 :], **kwargs)

  value, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(selected)
  loss, aux = value if has_aux else (value, None)
  return loss, aux, grads, selected, loss_of
