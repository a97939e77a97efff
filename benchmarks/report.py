"""The one way every benchmark here reports: indented JSON to stdout and,
with --json-out, to a file."""

from __future__ import annotations

import argparse
import json
import pathlib


def add_json_out_flag(parser: argparse.ArgumentParser) -> None:
  """--json-out=F, the file `emit` also writes (args.json_out)."""
  parser.add_argument(
      "--json-out", default="", help="also write the JSON result here"
  )


def write(result: dict, json_out: str) -> None:
  """The JSON result into the file --json-out names (nothing if empty)."""
  if json_out:
    pathlib.Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


def emit(result: dict, json_out: str = "") -> None:
  print(json.dumps(result, indent=2))
  write(result, json_out)
