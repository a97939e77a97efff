"""Metrics out: one JSON object per line (`metrics.jsonl`) and TensorBoard.

TensorBoard events go through tensorboardX (CLU's writers import TensorFlow).
A run killed mid-write can leave a torn last line; a resumed run drops it
with every line past its checkpoint (`truncate_after`), so the file never
holds a duplicated or partial record.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping

import numpy as np

from irtf_jax.checkpointing import DiskFullError
from irtf_jax.checkpointing import is_disk_full

# tensorboardX imports torch, if installed, only to accept torch tensors,
# which nothing here passes: 1.6 s of every start (of 3.8 s for irtf_jax.main)
# where torch is installed. A None entry makes that import fail fast; it is
# removed again so that torch stays importable.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None
try:
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
finally:
  if _HIDE_TORCH:
    del sys.modules["torch"]

METRICS_FILE = "metrics.jsonl"


def _plain(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 else value
  return float(value) if isinstance(value, (float, np.floating)) else value


class MetricWriter:
  """Writes `{"step": s, "train/loss": ...}` lines and TensorBoard scalars.

  Only process 0 of a multi-host run writes.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tensorboard = None
    if enabled:
      self._tensorboard = SummaryWriter(logdir=workdir, flush_secs=30)

  def truncate_after(self, step: int) -> None:
    """Drops lines of steps > `step` (a resumed run rewrites them
    identically) and a torn last line (a run killed mid-write)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    kept = [
        line
        for line in _complete_lines(self.path)
        if json.loads(line)["step"] <= step
    ]
    self._guarded(lambda: _rewrite(self.path, kept))

  def find(self, step: int, key: str) -> dict | None:
    """The last record of `step` holding `key` (e.g. a finished evaluation),
    without its "step"; None if there is none."""
    if not os.path.exists(self.path):
      return None
    found = [
        r
        for r in map(json.loads, _complete_lines(self.path))
        if r["step"] == step and key in r
    ]
    return (
        {k: v for k, v in found[-1].items() if k != "step"} if found else None
    )

  def _guarded(self, write) -> None:
    try:
      write()
    except OSError as e:
      if is_disk_full(e):
        raise DiskFullError(
            e.errno,
            f"{self.path}: no space left on device; the last "
            "checkpoint is intact. Free space and run the same command to "
            "continue.",
        ) from e
      raise

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    line = json.dumps(record, allow_nan=True) + "\n"

    def append():
      with open(self.path, "a") as f:
        f.write(line)

    self._guarded(append)
    for name, value in record.items():
      if (
          name != "step"
          and isinstance(value, (int, float))
          and math.isfinite(value)
      ):
        # TensorBoard tag names may not contain "@".
        self._tensorboard.add_scalar(
            name.replace("@", "_at_"), value, int(step)
        )

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _complete_lines(path: str) -> list[str]:
  """The lines of `path` that are whole records (newline-terminated JSON)."""
  with open(path) as f:
    lines = f.readlines()
  complete = []
  for line in lines:
    if not line.endswith("\n"):
      break  # torn: the writer died mid-line (only ever the last line)
    try:
      json.loads(line)
    except json.JSONDecodeError:
      break
    complete.append(line)
  return complete


def _rewrite(path: str, lines: list[str]) -> None:
  """Replaces `path`'s content atomically (a kill leaves old or new)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl`, in order."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f]
