"""Command-line pieces the benchmarks here share.

- `comma_list`: a comma-separated flag, each item checked against the
  allowed ones;
- `step_parser`: the parser of a benchmark of train steps: its docstring's
  first line, --image-size, --batch-size and --json-out;
- `add_side_flag`, `run_side`, `flags` and `answer_side`: one side of a comparison (a
  framework) run in a fresh process of the same script, started with the
  hidden flag --side, which prints its result as one line of JSON for the
  parent to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Mapping, Sequence

import report  # benchmarks/report.py, beside this module

from irtf_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def comma_list(parser, flag: str, value: str, allowed: Sequence[str]):
  """The items of a comma-separated flag; `parser.error` on an unknown one."""
  items = [item for item in value.split(",") if item]
  for item in items:
    if item not in allowed:
      parser.error(f"{flag}: unknown {item!r}; allowed: {', '.join(allowed)}")
  return items


def step_parser(doc: str, *, image_size: int) -> argparse.ArgumentParser:
  """A parser described by `doc`'s first line, with --json-out
  (`report.add_json_out_flag`), --image-size (default `image_size`) and
  --batch-size (default 32, the batch TIRG and the GA paper train with on
  every dataset but CSS)."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--image-size", type=int, default=image_size)
  parser.add_argument("--batch-size", type=int, default=32)
  report.add_json_out_flag(parser)
  return parser


def add_side_flag(parser: argparse.ArgumentParser) -> None:
  """The hidden flag --side=NAME: this process is a child running side NAME."""
  parser.add_argument("--side", default="", help=argparse.SUPPRESS)


def flags(args, names: Sequence[str]) -> list[str]:
  """The parsed options `names` (argparse dests) as flags again, for a child:
  `--name=value`, a list comma-joined, a true switch bare, a false one left
  out."""
  result = []
  for name in names:
    value, flag = getattr(args, name), "--" + name.replace("_", "-")
    if isinstance(value, bool):
      result += [flag] if value else []
    elif isinstance(value, (list, tuple)):
      result.append(f"{flag}={','.join(value)}")
    else:
      result.append(f"{flag}={value}")
  return result


def run_side(
    script: str,
    side: str,
    flags: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> dict:
  """Runs `script --side=side flags` in a fresh process; returns its answer.

  The child runs from the repository root with it on PYTHONPATH, in this
  process's environment updated with `env`; it fails loudly (check=True).
  Each side runs as its users run it: the "jax" side with the huge pages
  `python -m irtf_jax.main` starts itself with (`irtf_jax.host_memory`),
  the others with the C library's defaults (PyTorch's step measured slower
  on huge pages). The answer records the child's GLIBC_TUNABLES.
  """
  child_env = {**os.environ, **(env or {})}
  if side == "jax":
    child_env = host_memory.huge_page_environment(child_env) or child_env
  child_env["PYTHONPATH"] = REPO + os.pathsep + child_env.get("PYTHONPATH", "")
  out = subprocess.run(
      [sys.executable, os.path.abspath(script), f"--side={side}", *flags],
      env=child_env,
      check=True,
      stdout=subprocess.PIPE,
      text=True,
      cwd=REPO,
  )
  answer = json.loads(out.stdout.strip().splitlines()[-1])
  answer["glibc_tunables"] = child_env.get("GLIBC_TUNABLES", "")
  return answer


def answer_side(args, sides: Mapping[str, Callable[..., dict]]) -> bool:
  """In a child of `run_side`: prints `sides[args.side](args)` as one line of
  JSON and returns True; in the parent (no --side) returns False."""
  if not args.side:
    return False
  print(json.dumps(sides[args.side](args)))
  return True
