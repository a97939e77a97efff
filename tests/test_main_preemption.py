"""The command line stopped every way clusters and notebooks stop it, then
rerun: it ends with exactly the evaluations of an uninterrupted run.

One workdir goes through SIGTERM in a step, kill -9 in the middle of a
checkpoint save, kill -9 in the middle of a metrics line, SIGTERM during a
save, and a full disk, each time rerun with the same command; a second
workdir runs uninterrupted. The interruptions are placed by a driver that
wraps `irtf_jax.main` with hooks, so each lands exactly where intended.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from irtf_jax import checkpointing
from tests.helpers import run_main

DRIVER = textwrap.dedent("""
    import errno, os, signal, sys
    import jax
    from absl import app
    from absl import flags
    from irtf_jax import main, metric_writers, parallel
    import orbax.checkpoint._src.path.async_path as async_path

    hook, at = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0]] + sys.argv[3:]

    def fire(sig=None):
      if sig is None:
        sig = signal.SIGKILL if hook.startswith("kill") else signal.SIGTERM
      os.kill(os.getpid(), sig)

    if hook in ("term_in_step", "kill_in_step"):
      compile_step = parallel.DataParallel.compile_step
      def compile_and_watch(self, step):
        run = compile_step(self, step)
        def watched(state, batch, rng):
          result = run(state, batch, rng)
          if int(jax.device_get(result[0].step)) == at:
            fire()  # arrives while the step's work is done but not saved
          return result
        return watched
      parallel.DataParallel.compile_step = compile_and_watch
    elif hook in ("kill_in_save", "term_in_save"):
      rename = async_path.rename
      async def rename_and_fire(src, dst):
        if os.path.basename(str(dst)) == str(at):
          fire()  # every file is written, the step is not committed yet
        return await rename(src, dst)
      async_path.rename = rename_and_fire
    elif hook in ("torn_metrics", "full_disk"):
      write = metric_writers.MetricWriter.write
      def write_or_fail(self, step, values):
        if step == at and "train/loss" in values:
          if hook == "full_disk":  # the writer's own open() finds no space
            def no_space(*args, **kwargs):
              raise OSError(errno.ENOSPC, "No space left on device")
            metric_writers.open = no_space
            return write(self, step, values)
          with open(self.path, "a") as f:
            f.write('{"step": %d, "train/lo' % step)
          fire(signal.SIGKILL)
        return write(self, step, values)
      metric_writers.MetricWriter.write = write_or_fail
    flags.mark_flags_as_required(["config"])
    app.run(main.main, flags_parser=main.parse_flags)
""")

OVERRIDES = {
    "data.options.num_train_scenes": 20,
    "data.options.num_test_scenes": 20,
    "data.options.mods_per_scene": 4,
    "data.options.tree_depth": 2,
    "data.options.image_size": 32,
    "num_train_steps": 8,
    "checkpoint_every": 2,
    "eval_every": 4,
    "log_every": 1,
    "keep_checkpoints": 2,
    "batch_size": 8,
    "eval.batch_size": 32,
    "eval.max_test_queries": 48,
    "eval.max_train_queries": 48,
    "model.text_encoder.max_length": 10,
    "eval.ks": "(2,5)",  # without 1: whm follows the smallest K
}


def _run(tmp_path, workdir, hook="none", at=-1):
  args = [
      hook,
      str(at),
      "--config=configs/css_synth.py:smoke",
      f"--workdir={workdir}",
      f"--config.data.data_dir={tmp_path / 'tfds'}",
  ]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  done = run_main(args, program=(str(tmp_path / "driver.py"),))
  return done.returncode, done.stderr


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.readlines()
  assert all(line.endswith("\n") for line in lines)  # no torn line
  records = [json.loads(line) for line in lines]
  keys = [(r["step"], tuple(sorted(r))) for r in records]
  assert len(keys) == len(set(keys)), "a record is duplicated"
  assert [r["step"] for r in records] == sorted(r["step"] for r in records)
  return records


def _evaluations(records):
  evaluations = [
      {
          k: v
          for k, v in r.items()
          if k == "step" or k.startswith(("test/", "train/recall", "whm"))
      }
      for r in records
      if "test/recall@2" in r
  ]
  for r in evaluations:
    assert r["whm"] == r["whm@2"] and "test/recall@1" not in r
  return evaluations


@pytest.mark.slow
def test_interrupted_every_way_then_rerun_equals_uninterrupted(tmp_path):
  (tmp_path / "driver.py").write_text(DRIVER)
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  code, err = _run(tmp_path, reference)
  assert code == 0, err[-3000:]

  preempted = checkpointing.PREEMPTED_EXIT_CODE
  stages = [  # (hook, step, expected exit code, what stderr says)
      ("term_in_step", 3, preempted, "SIGTERM received: stopped after step 3"),
      ("kill_in_save", 4, -9, ""),
      ("torn_metrics", 5, -9, ""),
      ("term_in_save", 6, preempted, "stopped after step 6"),
      ("full_disk", 7, 1, "metrics.jsonl: no space left on device"),
      ("none", -1, 0, ""),
  ]
  for hook, step, expected, message in stages:
    code, err = _run(tmp_path, resumed, hook, step)
    assert code == expected, f"{hook}: exit {code}\n{err[-3000:]}"
    assert message in err, f"{hook}: {err[-3000:]}"
    if expected == preempted:
      assert "run the same command to continue" in err
      assert str(step) in os.listdir(resumed / "checkpoints")
    if hook == "kill_in_save":  # the uncommitted step is not a checkpoint
      assert str(step) not in os.listdir(resumed / "checkpoints")

  want = _evaluations(_records(reference))
  assert [r["step"] for r in want] == [4, 8]
  assert _evaluations(_records(resumed)) == want
