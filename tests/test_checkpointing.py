"""checkpointing: the workdir lock, damaged checkpoints, a full disk, and
signals; metric_writers: torn lines."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from irtf_jax import checkpointing
from irtf_jax.metric_writers import MetricWriter
from irtf_jax.metric_writers import read_metrics


def _state(step: int) -> dict:
  return {
      "step": np.array(step, np.int32),
      "w": np.full((3, 4), float(step)),
      "b": np.arange(5.0) * step,
  }


def _saved(workdir, steps=(1, 2, 3), keep=3) -> checkpointing.Checkpoints:
  checkpoints = checkpointing.Checkpoints(str(workdir), keep)
  for step in steps:
    checkpoints.save(step, _state(step))
  return checkpoints


# ---------------------------------------------------------------------------
# One run per workdir.


def test_a_second_run_is_refused_with_the_holders_pid(tmp_path):
  holder = subprocess.Popen(
      [
          sys.executable,
          "-c",
          textwrap.dedent(f"""
          import sys, time
          from irtf_jax import checkpointing
          lock = checkpointing.WorkdirLock({str(tmp_path)!r}).acquire()
          print("locked", flush=True)
          time.sleep(120)
      """),
      ],
      stdout=subprocess.PIPE,
      text=True,
      env=dict(os.environ, PYTHONPATH=os.getcwd()),
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(
        checkpointing.WorkdirBusyError,
        match=f"in use by process {holder.pid} on .*--workdir",
    ):
      checkpointing.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()  # kill -9: the kernel releases the lock with the process
    holder.wait()
  # The stale lock (its file still names the dead holder) is taken over.
  assert f"process {holder.pid}" in (tmp_path / ".lock").read_text()
  lock = checkpointing.WorkdirLock(str(tmp_path)).acquire()
  assert f"process {os.getpid()}" in (tmp_path / ".lock").read_text()
  lock.release()


# ---------------------------------------------------------------------------
# Damaged checkpoints.


def _array_files(directory) -> list[str]:
  """The files holding a checkpoint's array data (orbax's "d" folders)."""
  return [
      os.path.join(root, f)
      for root, _, names in os.walk(directory)
      for f in names
      if os.path.basename(root) == "d"
  ]


def test_a_truncated_newest_checkpoint_falls_back_with_a_warning(
    tmp_path, caplog
):
  checkpoints = _saved(tmp_path)
  files = _array_files(os.path.join(checkpoints.directory, "3"))
  assert files
  for damaged in files:
    with open(damaged, "r+b") as f:
      f.truncate(os.path.getsize(damaged) // 2)
  with caplog.at_level(logging.WARNING):
    state = checkpoints.restore(_state(0))
  assert int(state["step"]) == 2
  np.testing.assert_array_equal(state["w"], _state(2)["w"])
  assert "step 3" in caplog.text and "from step 2" in caplog.text


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  checkpoints = _saved(tmp_path, steps=(1, 2))
  for step in (1, 2):
    for missing in _array_files(os.path.join(checkpoints.directory, str(step))):
      os.remove(missing)
  with pytest.raises(
      checkpointing.CheckpointError,
      match="no checkpoint can be restored.*move the folder",
  ):
    checkpoints.restore(_state(0))
  assert (
      checkpointing.Checkpoints(str(tmp_path / "new"), 2).restore(_state(0))
      is None
  )


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch
):
  checkpoints = _saved(tmp_path, steps=(1, 2))
  manager = checkpoints._manager  # pylint: disable=protected-access

  def full(step, args):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(manager, "save", full)
  with pytest.raises(
      checkpointing.DiskFullError,
      match="no space left.*step 3.*step 2 is intact",
  ):
    checkpoints.save(3, _state(3))
  monkeypatch.undo()
  assert int(checkpoints.restore(_state(0))["step"]) == 2


# ---------------------------------------------------------------------------
# metrics.jsonl after a kill, and on a full disk.


def test_resuming_drops_later_records_and_a_torn_line(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    writer.write(step, {"train/loss": 1.0 / step})
  with open(writer.path, "a") as f:
    f.write('{"step": 5, "train/lo')  # killed mid-write
  writer.truncate_after(2)
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
  writer.write(3, {"test/recall@1": 0.5})
  assert writer.find(3, "test/recall@1") == {"test/recall@1": 0.5}
  assert writer.find(2, "test/recall@1") is None
  writer.close()
  with open(writer.path) as f:
    assert all(json.loads(line) for line in f)


def test_a_full_disk_while_writing_metrics_names_the_file(
    tmp_path, monkeypatch
):
  writer = MetricWriter(str(tmp_path), enabled=True)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr("builtins.open", full)
  with pytest.raises(
      checkpointing.DiskFullError, match="metrics.jsonl: no space left"
  ):
    writer.write(1, {"train/loss": 1.0})
  monkeypatch.undo()
  writer.close()


# ---------------------------------------------------------------------------
# Signals.


def test_first_signal_requests_a_stop_second_interrupts():
  # What was installed before (Python's default_int_handler, or SIG_IGN when
  # the test process was started in the background by a shell).
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionWatch() as watch:
    assert not watch.stop_requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.stop_requested() and watch.received == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  # The previous handlers are back.
  assert (
      signal.getsignal(signal.SIGINT),
      signal.getsignal(signal.SIGTERM),
  ) == before
