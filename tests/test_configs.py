"""The configs of the three published benchmarks and their smoke runs.

Each smoke variant trains end to end through the command line on a copy of
its dataset in the published on-disk format that the trainer writes itself
(`config.data.fixture`); the same copy written here and passed as
`config.data.manual_dir` must give the trainer exactly the same data.
"""

from __future__ import annotations

import filecmp
import json
import math
import os

import numpy as np
import pytest

from irtf_jax import config_base
from irtf_jax import train
from irtf_jax import trainer
from irtf_jax.data import css3d
from irtf_jax.data import fashion200k
from irtf_jax.data import fixtures
from irtf_jax.data import mit_states
from tests.helpers import load_repo_module
from tests.helpers import run_main

# config file -> (dataset, its loader module)
CONFIGS = {
    "css.py": ("css3d", css3d),
    "mit.py": ("mit_states", mit_states),
    "fashion200k.py": ("fashion200k", fashion200k),
}


def get_config(file_name: str, arg: str = ""):
  return load_repo_module(f"configs/{file_name}", file_name[:-3]).get_config(
      arg
  )


def last_evaluation(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  evaluations = [line for line in lines if "test/recall@1" in line]
  assert evaluations, f"no evaluation in {workdir}/metrics.jsonl"
  return evaluations[-1]


def check_evaluation(evaluation: dict, dataset: str) -> None:
  views = [""] + (["adjective/", "noun/"] if dataset == "mit_states" else [])
  for view in views:
    recalls = [evaluation[f"test/{view}recall@{k}"] for k in (1, 5, 10)]
    assert all(0.0 <= r <= 1.0 for r in recalls), (view, recalls)
    assert recalls == sorted(recalls), (view, recalls)  # more K, more hits
  ms, mt = evaluation["train/recall@1"], evaluation["test/recall@1"]
  # The weighted harmonic mean at alpha = 1 is the plain harmonic mean.
  expected_whm = 2 * ms * mt / (ms + mt) if ms + mt else 0.0
  assert math.isclose(evaluation["whm"], expected_whm, abs_tol=1e-9)


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory):
  """file -> the workdir of its smoke run by the command line, run on first
  use."""
  runs = {}

  def run(file_name):
    if file_name not in runs:
      workdir = str(tmp_path_factory.mktemp(file_name[:-3]) / "work")
      config = get_config(file_name, "smoke")
      assert config.data.fixture and not config.data.manual_dir
      done = run_main(
          [f"--config=configs/{file_name}:smoke", f"--workdir={workdir}"]
      )
      assert done.returncode == 0, done.stderr[-3000:]
      runs[file_name] = workdir
    return runs[file_name]

  return run


@pytest.mark.slow
@pytest.mark.parametrize("file_name", list(CONFIGS))
def test_smoke_run_writes_its_fixture_and_evaluates(
    fixture_runs, file_name, tmp_path
):
  dataset, _ = CONFIGS[file_name]
  workdir = fixture_runs(file_name)
  evaluation = last_evaluation(workdir)
  assert evaluation["step"] == get_config(file_name, "smoke").num_train_steps
  check_evaluation(evaluation, dataset)
  # What the trainer wrote is the published layout, the same bytes as
  # write_fixture gives.
  written = fixtures.write_fixture(dataset, str(tmp_path / "again"))
  comparison = filecmp.dircmp(
      os.path.join(workdir, "fixture", "manual"), written
  )
  assert not (
      comparison.left_only or comparison.right_only or comparison.diff_files
  )
  assert os.path.isdir(os.path.join(workdir, "fixture", "prepared", dataset))


@pytest.mark.slow
@pytest.mark.parametrize("file_name", list(CONFIGS))
def test_manual_dir_gives_the_data_the_smoke_run_trained_on(
    fixture_runs, file_name, tmp_path
):
  # The trainer only differs in where it reads from: the splits must match.
  dataset, _ = CONFIGS[file_name]
  config = get_config(file_name, "smoke")
  config.data.fixture = False
  config.data.manual_dir = fixtures.write_fixture(
      dataset, str(tmp_path / "download")
  )
  config.data.data_dir = str(tmp_path / "prepared")
  splits = trainer.load_splits(config, str(tmp_path / "work"))
  assert os.path.isdir(tmp_path / "prepared" / dataset)
  assert not os.path.exists(tmp_path / "work" / "fixture")
  workdir = fixture_runs(file_name)
  trained_on = trainer.load_splits(get_config(file_name, "smoke"), workdir)
  for split, reference in zip(splits, trained_on):
    assert list(split.captions) == list(reference.captions)
    assert list(split.queries) == list(reference.queries)
    indices = np.arange(len(split.captions))
    np.testing.assert_array_equal(
        split.images(indices), reference.images(indices)
    )
    assert split.sample_training_queries(
        0, 3, 16
    ) == reference.sample_training_queries(0, 3, 16)


@pytest.mark.parametrize("file_name", list(CONFIGS))
def test_without_manual_dir_the_error_says_how_to_get_the_data(
    file_name, tmp_path
):
  dataset, module = CONFIGS[file_name]
  config = get_config(file_name)
  assert not config.data.fixture and not config.data.manual_dir
  config.data.data_dir = str(tmp_path / "prepared")  # nothing prepared there
  with pytest.raises(FileNotFoundError) as error:
    train.train_and_evaluate(config, str(tmp_path / "work"))
  message = str(error.value)
  assert message.startswith(f"{dataset}: ")
  assert "manual_dir" in message.splitlines()[0]
  assert module.MANUAL_DOWNLOAD_INSTRUCTIONS in message


@pytest.mark.parametrize(
    "file_name, dataset, batch_size, steps, image_size",
    [
        ("css.py", "css3d", 200, 160_000, None),
        ("mit.py", "mit_states", 32, 150_000, 224),
        ("fashion200k.py", "fashion200k", 32, 160_000, 224),
    ],
)
def test_full_configs_hold_the_papers_settings(
    file_name, dataset, batch_size, steps, image_size
):
  config = get_config(file_name)
  config_base.validate(config, num_devices=8)
  assert config.data.name == dataset
  assert config.data.options.get("image_size") == image_size
  assert config.model.name == "tirg_lastconv"
  assert config.model.image_encoder.depth == 18
  assert config.model.embed_dim == 512
  assert config.batch_size == batch_size
  assert config.num_train_steps == steps
  assert (
      config.optimizer.learning_rate,
      config.optimizer.momentum,
      config.optimizer.weight_decay,
  ) == (1e-2, 0.9, 1e-6)
  assert (
      config.optimizer.lr_decay_steps,
      config.optimizer.lr_decay_factor,
  ) == (50_000, 0.1)
  assert (
      config.ga.adversarial.epsilon,
      config.ga.adversarial.q,
      config.ga.adversarial.wrt,
  ) == (1e-6, 1.0, "query_image")
  assert config.ga.isotropic.gamma == 1e-2
  assert config.loss.eta == 1e-3
  # Evaluations and checkpoints fall on the last step.
  assert steps % config.eval_every == 0
  assert steps % config.checkpoint_every == 0
  smoke = get_config(file_name, "smoke")
  config_base.validate(smoke, num_devices=8)
  assert smoke.num_train_steps == smoke.eval_every  # one evaluation
  assert smoke.ga.adversarial.epsilon == 1e-6  # the GA code path runs


@pytest.mark.parametrize("file_name", list(CONFIGS))
def test_unknown_config_argument_is_named(file_name):
  with pytest.raises(
      ValueError,
      match=(
          f"configs/{file_name}: unknown argument 'tiny'; allowed: '', 'smoke'"
      ),
  ):
    get_config(file_name, "tiny")


@pytest.mark.parametrize("dataset", fixtures.FIXTURE_DATASETS)
def test_fixture_is_deterministic_and_big_enough(dataset, tmp_path):
  first = fixtures.write_fixture(dataset, str(tmp_path / "a"))
  second = fixtures.write_fixture(dataset, str(tmp_path / "b"))
  for folder, _, files in os.walk(first):
    for name in files:
      path = os.path.join(folder, name)
      twin = os.path.join(second, os.path.relpath(path, first))
      assert filecmp.cmp(path, twin, shallow=False), path
  from irtf_jax import data  # pylint: disable=g-import-not-at-top

  train_split = data.load(
      dataset, "train", data_dir=str(tmp_path / "p"), manual_dir=first
  )
  test_split = data.load(
      dataset, "test", data_dir=str(tmp_path / "p"), manual_dir=first
  )
  batch = train_split.sample_training_queries(seed=0, step=0, batch_size=16)
  # TIRG's pairing: two different modifications of one source image.
  for first_query, second_query in zip(batch[::2], batch[1::2]):
    assert first_query.source_index == second_query.source_index
    assert first_query.target_caption != second_query.target_caption
  assert len(test_split.queries) >= 16
  for query in test_split.queries:
    assert query.target_caption in test_split.captions
    assert query.target_caption != test_split.captions[query.source_index]


def test_fixture_of_unknown_dataset_names_the_field(tmp_path):
  with pytest.raises(
      ValueError,
      match=(
          "config.data.name: no fixture for "
          "'css_synth'.*set config.data.fixture=False"
      ),
  ):
    fixtures.write_fixture("css_synth", str(tmp_path))
