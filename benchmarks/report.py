"""The one way every benchmark here reports: indented JSON to stdout and,
with --json-out, to a file."""

from __future__ import annotations

import json
import pathlib


def emit(result: dict, json_out: str = "") -> None:
  text = json.dumps(result, indent=2)
  print(text)
  if json_out:
    pathlib.Path(json_out).write_text(text + "\n")
