"""Argument checks shared by the regularizers: one-line errors naming the fix."""

from __future__ import annotations

import math
from typing import Any

import jax


def is_traced(value: Any) -> bool:
  """Whether `value` is a tracer (a value known only when the code runs)."""
  return isinstance(value, jax.core.Tracer)


def check_scale(value: Any, name: str, caller: str, example: str) -> Any:
  """`value` as a float >= 0 (finite), or unchanged when traced or callable.

  A traced value (inside jit, vmap or grad) or a schedule cannot be checked
  here; everything else must be a finite number >= 0.

  Raises:
    ValueError: one line naming the argument, the value and the fix.
  """
  if is_traced(value) or callable(value):
    return value
  try:
    number = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{caller}: {name} must be a number, got {value!r}; pass a float "
        f"such as {example}."
    ) from e
  if not math.isfinite(number) or number < 0:
    raise ValueError(
        f"{caller}: {name} must be finite and >= 0, got {value!r}; pass a "
        f"float such as {example} (0 disables the term)."
    )
  return number


def is_zero(value: Any) -> bool:
  """True only for a concrete 0 (a traced or scheduled value may be anything)."""
  return not (is_traced(value) or callable(value)) and float(value) == 0.0
