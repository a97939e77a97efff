"""Checks of a dataset's loader options (`config.data.options`), without data.

Each dataset module declares its options once, as name -> `Option` (default
and accepted values), and its `check_options` resolves options through
`resolve`; `irtf_jax.data.load` resolves them with it before calling the
loader, so a bad option is reported the same way whether it is checked ahead
of a run (`irtf_jax.data.check_options`) or met by `load`, and before anything
is prepared or read.

Errors are one line naming the config field, the bad value and what is
allowed, e.g.
  config.data.options.image_size: got 0; mit_states needs an integer >= 1
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

FIELD = "config.data.options"


@dataclasses.dataclass(frozen=True)
class Option:
  """One loader option.

  Attributes:
    default: the value when the option is not given.
    allowed: the accepted values in words, for the error message.
    accepts: value -> whether it is accepted.
    convert: an accepted value -> its resolved form (e.g. np.int64 -> int).
  """

  default: Any
  allowed: str
  accepts: Callable[[Any], bool]
  convert: Callable[[Any], Any] = lambda value: value


def _is_integer(value: Any) -> bool:
  # bool is an int subclass, but True is never meant as a count or a size.
  return isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_)
  )


def integer(default: int, minimum: int, note: str = "") -> Option:
  """An integer option >= `minimum`; `note` follows the allowed values."""
  return Option(
      default,
      f"an integer >= {minimum}{note}",
      lambda value: _is_integer(value) and value >= minimum,
      int,
  )


def boolean(default: bool) -> Option:
  """A True/False option (an int 0 or 1 is refused: it hides typos)."""
  return Option(
      default,
      "True or False",
      lambda value: isinstance(value, (bool, np.bool_)),
      bool,
  )


def one_of(default: str, values: Sequence[str], note: str = "") -> Option:
  """A string option among `values`; `note` follows the allowed values."""
  values = tuple(values)
  return Option(
      default,
      f"one of {', '.join(map(repr, values))}{note}",
      lambda value: isinstance(value, str) and value in values,
  )


def resolve(
    dataset: str, spec: Mapping[str, Option], options: Mapping[str, Any]
) -> dict[str, Any]:
  """`options` checked against `spec`, with the defaults filled in.

  Args:
    dataset: the dataset's name, for the error message.
    spec: option name -> `Option`, in the order the result keeps.
    options: the options given (a dict or an `ml_collections.ConfigDict`).

  Returns:
    option name -> resolved value, for every option of `spec`.

  Raises:
    ValueError (one line, naming `config.data.options.<name>`) for an option
    `spec` does not have, or a value its `Option` does not accept.
  """
  unknown = sorted(set(options) - set(spec))
  if unknown:
    also = (
        f" (nor {', '.join(map(repr, unknown[1:]))})"
        if len(unknown) > 1
        else ""
    )
    raise ValueError(
        f"{FIELD}.{unknown[0]}: {dataset} has no option "
        f"{unknown[0]!r}{also}; its options are "
        f"{', '.join(spec)} (remove the others, or set "
        "config.data.name to the dataset they belong to)"
    )
  resolved = {}
  for name, option in spec.items():
    value = options[name] if name in options else option.default
    if not option.accepts(value):
      raise ValueError(
          f"{FIELD}.{name}: got {value!r}; {dataset} needs {option.allowed}"
      )
    resolved[name] = option.convert(value)
  return resolved
