"""What lets a run survive what clusters and notebooks do to it.

- `Checkpoints`: orbax checkpoints of the train state in `workdir/checkpoints`.
  orbax writes a step into a temporary folder and renames it when complete,
  so a process killed mid-save (kill -9, OOM killer, power) leaves the
  previous checkpoints as they were. Restoring tries the newest step first
  and falls back, with a warning naming both, to older ones when a step's
  files are damaged (truncated or missing); when checkpoints exist but none
  restores, it stops with an error instead of starting over on top of them.
- `WorkdirLock`: one run per workdir. The lock is an `flock` on
  `workdir/.lock`, which the kernel releases when its process dies however it
  dies, so a lock left by a killed run is taken over without any cleanup.
- `PreemptionWatch`: SIGTERM (what SLURM, Kubernetes and preemptible cloud
  VMs send before killing a job) and SIGINT (Ctrl-C, a notebook's interrupt)
  ask the loop to stop after its current step; it then saves a checkpoint,
  flushes its metrics and raises `Preempted`, which `main` turns into exit
  code `PREEMPTED_EXIT_CODE`. A second signal interrupts at once. With
  several processes, all agree on the step to stop at.
- A full disk (ENOSPC) while saving stops the run with `DiskFullError`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

# EX_TEMPFAIL (sysexits.h): "temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
_LOCK_FILE = ".lock"


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint; rerun to resume."""

  def __init__(self, step: int, workdir: str, signal_name: str):
    self.step = step
    super().__init__(
        f"{signal_name} received: stopped after step {step} with its "
        f"checkpoint saved in {workdir}/checkpoints; run the same command to "
        "continue."
    )


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir."""


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be restored."""


class DiskFullError(OSError):
  """A write failed for lack of space; the last complete checkpoint is intact."""


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or an error it was raised from) is ENOSPC."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    error = error.__cause__ or error.__context__
  return False


class WorkdirLock:
  """An exclusive lock on a workdir for the life of this process (or
  `release()`). Only the first process of a multi-host run takes it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, _LOCK_FILE)
    self._file = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handle = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise WorkdirBusyError(
          f"{os.path.dirname(self.path)} is in use by {holder} (lock "
          f"{self.path}); wait for that run, stop it, or pass another "
          "--workdir."
      ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    self._file = handle
    return self

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class Checkpoints:
  """The train state's checkpoints in `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        ),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def restore(self, template: Any) -> Any | None:
    """The newest checkpoint that restores (shaped like `template`), or None
    when there is none.

    Raises:
      CheckpointError: checkpoints exist but none restores.
    """
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      try:
        state = self._manager.restore(
            step, args=ocp.args.StandardRestore(template)
        )
      except Exception as e:  # pylint: disable=broad-exception-caught
        failures.append(f"step {step}: {type(e).__name__}: {e}")
        continue
      if failures:
        logging.warning(
            "%s: the newest checkpoint could not be restored (%s); resuming "
            "from step %d instead.",
            self.directory,
            "; ".join(failures),
            step,
        )
      return state
    if steps:
      raise CheckpointError(
          f"{self.directory}: no checkpoint can be restored ("
          f"{'; '.join(failures)[:2000]}). Restore the files, or move the "
          "folder away to start this run over."
      )
    return None

  def save(self, step: int, state: Any) -> None:
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state))
      self._manager.wait_until_finished()
    except Exception as e:
      if is_disk_full(e):
        previous = [s for s in self.steps() if s < step]
        raise DiskFullError(
            errno.ENOSPC,
            f"{self.directory}: no space left on device while saving step "
            f"{step}; the checkpoint of step "
            f"{previous[-1] if previous else '(none)'} is intact. Free space "
            "and run the same command to continue.",
        ) from e
      raise

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionWatch:
  """Turns SIGTERM / SIGINT into a request to stop after the current step.

  A context manager: installs the handlers on entry (in the main thread only;
  elsewhere signals are left alone) and restores the previous ones on exit.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:  # a second signal: stop now
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      raise SystemExit(128 + signum)
    self.received = signal.Signals(signum).name
    logging.warning(
        "%s received: stopping after this step (send it again "
        "to stop at once).",
        self.received,
    )

  def __enter__(self) -> "PreemptionWatch":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def stop_requested(self) -> bool:
    """Whether any process received a signal (a collective with several
    processes: every process must call it at the same steps)."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.int32(local))
    if np.any(flags) and self.received is None:
      self.received = "SIGTERM (another process)"
    return bool(np.any(flags))
