"""config_base.validate, reached through the command line as `main` parses
it: every value of every field either validates or fails with one line
naming the field, before anything is written, loaded or compiled."""

from __future__ import annotations

import contextlib
import io

import hypothesis
from hypothesis import strategies as st
import ml_collections
import pytest

from irtf_jax import config_base
from irtf_jax import main
from irtf_jax import trainer
from tests.helpers import run_main
from tests.helpers import tiny_config

CONFIG = "configs/css_synth.py:smoke"


def _fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _fields(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


FIELDS = _fields(main.parse_config(["prog", f"--config={CONFIG}"]))
# What a user mistypes: wrong types, signs, NaN, empty, unknown names, tuples.
VALUES = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([0.5, -0.5, 1e-6, 3.0, 1e9]),
    st.sampled_from([
        "",
        "nan",
        "inf",
        "-inf",
        "-1",
        "0",
        "abc",
        "True",
        "None",
        "(0,)",
        "()",
        "(1,",
        "(1, 5)",
        "1e400",
        "tirg",
        "mit_states",
        "pmap",
        "official",
        "'x'",
    ]),
    st.text(alphabet="abz019_-. ", max_size=5),
)


def _parse_and_validate(field: str, value) -> str | None:
  """None if the override validates, else the one message the user sees."""
  argv = ["prog", f"--config={CONFIG}", f"--config.{field}={value}"]
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      config = main.parse_config(argv)
  except SystemExit as e:
    assert e.code == 2
    return stderr.getvalue()
  try:
    config_base.validate(config, num_devices=8)
  except config_base.ConfigError as e:
    return f"error: {e}\n"
  return None


@hypothesis.settings(max_examples=400, deadline=None, derandomize=True)
@hypothesis.given(field=st.sampled_from(FIELDS), value=VALUES)
def test_any_value_of_any_field_validates_or_fails_in_one_line(field, value):
  message = _parse_and_validate(field, value)
  if message is None:
    return
  assert message.startswith("error: ") and message.count("\n") == 1, message
  # It names the field, or for the dataset's name the options it rejects.
  named = {field, "data.options" if field == "data.name" else field}
  assert any(f"config.{f}" in message for f in named), message


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "model.name",
            "resnet_magic",
            r"config.model.name: unknown 'resnet_magic'; allowed: .*tirg",
        ),
        (
            "loss.name",
            "hinge",
            r"config.loss.name: unknown 'hinge'; allowed: "
            r"batch_classification, soft_triplet",
        ),
        (
            "data.name",
            "imagenet",
            r"config.data.name: unknown 'imagenet'; allowed: css_synth",
        ),
        (
            "optimizer.learning_rate",
            float("nan"),
            r"config.optimizer.learning_rate: must be a finite number >= 0",
        ),
        (
            "ga.isotropic.gamma",
            -1.0,
            r"config.ga.isotropic.gamma: must be a finite number >= 0",
        ),
        (
            "ga.adversarial.q",
            3.0,
            r"config.ga.adversarial.q: unknown 3.0; allowed: 1.0, 2.0, inf",
        ),
        (
            "batch_size",
            12,
            r"config.batch_size: 12 is not divisible by the 8 devices",
        ),
        (
            "parallel.strategy",
            "fsdp",
            r"config.parallel.strategy: unknown 'fsdp'; allowed: jit, pmap",
        ),
        ("eval.ks", (0,), r"config.eval.ks: must be a non-empty tuple"),
        (
            "data.workers",
            -2,
            r"config.data.workers: must be an integer >= -1 \(-1: chosen",
        ),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
  config = tiny_config()
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  workdir = tmp_path / "bad"
  with pytest.raises(config_base.ConfigError, match=message):
    trainer.Trainer(config, str(workdir))
  assert not workdir.exists()  # nothing written, nothing loaded


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.options.mods_per_scene=0", "config.data.options.mods_per_scene"),
        ("data.name=mit_states", "config.data.options"),
        (
            "data.options.mods_per_scne=3",
            "--config.data.options.mods_per_scne: no such config field",
        ),
        ("batch_size=abc", "--config.batch_size=abc"),
        ("eval.ks=(0,)", "config.eval.ks"),
    ],
)
def test_the_command_line_prints_one_line_and_exits_2(
    tmp_path, override, message
):
  done = run_main(
      [
          f"--config={CONFIG}",
          f"--workdir={tmp_path / 'w'}",
          f"--config.{override}",
      ],
      timeout=300,
  )
  assert done.returncode == 2, done.stderr[-2000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
  assert message in lines[0]
  assert not (tmp_path / "w").exists()
