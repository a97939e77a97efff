"""Metrics out: one JSON object per line (`metrics.jsonl`) and TensorBoard.

TensorBoard events go through tensorboardX (CLU's writers import TensorFlow).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

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
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(logdir=workdir, flush_secs=30)

  def truncate_after(self, step: int) -> None:
    """Drops lines of steps > `step`: a resumed run rewrites them identically."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      kept = [line for line in f if json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        # TensorBoard tag names may not contain "@".
        self._tensorboard.add_scalar(name.replace("@", "_at_"), value,
                                     int(step))

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl`, in order."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f]
