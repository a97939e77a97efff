"""The trainer end to end on a tiny css_synth: outputs, resume, bad input."""

import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from irtf_jax import train
from irtf_jax.data import pipeline
from irtf_jax.metric_writers import read_metrics
from tests.helpers import tiny_config

# A few steps on a tiny css_synth, every output written at least once.
CSS_RUN = {
    "data.name": "css_synth",
    "data.options.num_train_scenes": 20,  # 180 images, 160 queries
    "data.options.num_test_scenes": 20,
    "data.options.mods_per_scene": 4,
    "data.options.tree_depth": 2,
    "data.options.image_size": 32,
    "model.text_encoder.max_length": 10,
    "num_train_steps": 4,
    "log_every": 1,
    "checkpoint_every": 2,
    "eval_every": 4,
    "eval.batch_size": 32,
    "eval.max_test_queries": 64,
    "eval.max_train_queries": 64,
    "eval.train_gallery": "test_size",
    "eval.num_qualitative": 2,
}


def css_config(**overrides):
  """`tiny_config` with `CSS_RUN`, then `overrides` (dotted names)."""
  return tiny_config(**{**CSS_RUN, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def latest_params(workdir):
  manager = ocp.CheckpointManager(os.path.abspath(f"{workdir}/checkpoints"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  return step, restored["params"]


@pytest.mark.slow
def test_run_outputs_and_resume_equals_uninterrupted(
    tmp_path, data_dir, monkeypatch
):
  config = css_config(**{"data.data_dir": data_dir})
  straight = str(tmp_path / "straight")
  results = train.train_and_evaluate(config, straight)

  # Everything DESIGN.md lists is in the workdir.
  files = os.listdir(straight)
  assert "config.json" in files and "vocab.json" in files
  assert (
      json.load(open(f"{straight}/config.json"))["data"]["name"] == "css_synth"
  )
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert any(
      f.startswith("retrievals_step") and f.endswith(".png") for f in files
  )
  records = read_metrics(straight)
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
  final = records[-1]
  for key in (
      "test/recall@1",
      "test/recall@5",
      "test/recall@10",
      "test/recall@50",
      "train/recall@1",
      "whm",
  ):
    assert 0.0 <= final[key] <= 1.0, key
  assert final["whm"] == pytest.approx(
      2
      * final["train/recall@1"]
      * final["test/recall@1"]
      / (final["train/recall@1"] + final["test/recall@1"])
      if final["train/recall@1"] + final["test/recall@1"]
      else 0.0
  )
  # What train_and_evaluate returns is the last evaluation it wrote.
  assert {k: final[k] for k in results} == pytest.approx(results)

  # Interrupted after step 3 (checkpoint at 2), then the same call again.
  resumed = str(tmp_path / "resumed")
  original = pipeline.prefetched_batches

  def interrupted(make_batch, steps, **kwargs):
    for step, batch in original(make_batch, steps, **kwargs):
      if step == 3:
        raise KeyboardInterrupt
      yield step, batch

  monkeypatch.setattr(pipeline, "prefetched_batches", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, resumed)
  assert latest_params(resumed)[0] == 2
  monkeypatch.setattr(pipeline, "prefetched_batches", original)
  train.train_and_evaluate(config, resumed)

  def without_timing(rows):
    return [
        {k: v for k, v in r.items() if k != "train/steps_per_second"}
        for r in rows
    ]

  assert without_timing(read_metrics(resumed)) == without_timing(records)
  step_a, params_a = latest_params(straight)
  step_b, params_b = latest_params(resumed)
  assert step_a == step_b == 4
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)

  # A finished run given the same command again evaluates, it does not retrain.
  again = train.train_and_evaluate(config, straight)
  assert again["test/recall@1"] == final["test/recall@1"]
  assert read_metrics(straight) == records


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, data_dir
):
  config = css_config(**{
      "data.data_dir": data_dir,
      "optimizer.learning_rate": 1e30,
      "checkpoint_every": 1,
      "num_train_steps": 6,
  })
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
    train.train_and_evaluate(config, workdir)
  manager = ocp.CheckpointManager(os.path.abspath(f"{workdir}/checkpoints"))
  if manager.latest_step() is not None:
    _, params = latest_params(workdir)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
  assert all(math.isfinite(x) for x in losses)
