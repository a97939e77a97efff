"""`data.check_options`: every dataset's loader options, checked without data."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from irtf_jax import data

IMAGE_FILE_DEFAULTS = dict(
    image_size=224,
    on_bad_image="error",
    complete_text=False,
    num_train_queries=10_000,
    train_query_seed=0,
)
# Written out, not read from the modules, so that a changed default fails here.
DEFAULTS = {
    "css_synth": dict(
        num_train_scenes=250,
        num_test_scenes=100,
        mods_per_scene=30,
        tree_depth=3,
        seed=0,
        image_size=64,
    ),
    "css3d": dict(renderer="png", skip_unreadable_images=False),
    "mit_states": IMAGE_FILE_DEFAULTS,
    "fashion200k": IMAGE_FILE_DEFAULTS,
}

# (dataset, option, bad value, the rest of the message after "got <value>; ")
WRONG_TYPE = [
    ("css_synth", "seed", "0", "css_synth needs an integer >= 0"),
    ("css_synth", "num_train_scenes", 2.0, "css_synth needs an integer >= 1"),
    ("css_synth", "tree_depth", True, "css_synth needs an integer >= 1"),
    ("css3d", "skip_unreadable_images", 1, "css3d needs True or False"),
    ("css3d", "renderer", None, "css3d needs one of 'png', '2d'"),
    (
        "mit_states",
        "image_size",
        224.0,
        "mit_states needs an integer >= 1 (224 is TIRG's)",
    ),
    ("mit_states", "complete_text", "yes", "mit_states needs True or False"),
    (
        "fashion200k",
        "on_bad_image",
        False,
        (
            "fashion200k needs one of 'error', 'skip' ('error' stops at the"
            " first bad image, 'skip' leaves bad images out)"
        ),
    ),
    (
        "fashion200k",
        "num_train_queries",
        "10",
        "fashion200k needs an integer >= 0",
    ),
]
OUT_OF_RANGE = [
    ("css_synth", "mods_per_scene", 0, "css_synth needs an integer >= 1"),
    ("css_synth", "image_size", 15, "css_synth needs an integer >= 16"),
    ("css3d", "renderer", "3d", "css3d needs one of 'png', '2d'"),
    (
        "mit_states",
        "on_bad_image",
        "ignore",
        (
            "mit_states needs one of 'error', 'skip' ('error' stops at the"
            " first bad image, 'skip' leaves bad images out)"
        ),
    ),
    (
        "mit_states",
        "image_size",
        0,
        "mit_states needs an integer >= 1 (224 is TIRG's)",
    ),
    (
        "fashion200k",
        "num_train_queries",
        -1,
        "fashion200k needs an integer >= 0",
    ),
    (
        "fashion200k",
        "train_query_seed",
        -3,
        "fashion200k needs an integer >= 0",
    ),
]


def check_error(name, options) -> str:
  """The message of `check_options`'s ValueError, checked to be one line."""
  with pytest.raises(ValueError) as info:
    data.check_options(name, options)
  message = str(info.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("name", data.DATASETS)
def test_defaults_are_filled_in(name):
  assert DEFAULTS.keys() == set(data.DATASETS)
  assert data.check_options(name, {}) == DEFAULTS[name]
  # resolved options are themselves valid, and resolve to themselves
  assert data.check_options(name, DEFAULTS[name]) == DEFAULTS[name]


# dataset -> (option, a NumPy value of it, the resolved Python value)
NUMPY_VALUES = {
    "css_synth": ("seed", np.int64(7), 7),
    "css3d": ("skip_unreadable_images", np.bool_(True), True),
    "mit_states": ("image_size", np.int32(64), 64),
    "fashion200k": ("num_train_queries", np.uint8(5), 5),
}


@pytest.mark.parametrize("name", data.DATASETS)
def test_given_values_win_and_become_python_scalars(name):
  option, value, expected = NUMPY_VALUES[name]
  given = ml_collections.ConfigDict({option: value})  # as config.data.options
  resolved = data.check_options(name, given)
  assert resolved == {**DEFAULTS[name], option: expected}
  assert type(resolved[option]) is type(expected)


@pytest.mark.parametrize("name", data.DATASETS)
def test_unknown_option_is_named_with_the_allowed_ones(name):
  message = check_error(name, {"colour": "red"})
  assert message == (
      f"config.data.options.colour: {name} has no option "
      "'colour'; its options are "
      f"{', '.join(DEFAULTS[name])} (remove the others, or set "
      "config.data.name to the dataset they belong to)"
  )


@pytest.mark.parametrize(
    "name, option, value, allowed", WRONG_TYPE + OUT_OF_RANGE
)
def test_bad_value_is_named_with_the_allowed_ones(name, option, value, allowed):
  assert check_error(name, {option: value}) == (
      f"config.data.options.{option}: got {value!r}; {allowed}"
  )


def test_unknown_dataset_is_named():
  assert check_error("mnist", {}) == (
      "config.data.name: unknown dataset 'mnist'; allowed: css_synth, css3d, "
      "mit_states, fashion200k"
  )


@pytest.mark.parametrize("name", ["mit_states", "fashion200k", "css3d"])
def test_css_synth_options_on_another_dataset(name, tmp_path):
  """configs/css_synth.py with --config.data.name changed: a ValueError, not
  a TypeError from inside the loader, and nothing is prepared."""
  options = {"num_train_scenes": 200, "num_test_scenes": 100}
  message = check_error(name, options)
  assert message.startswith(
      f"config.data.options.num_test_scenes: {name} has "
      "no option 'num_test_scenes' (nor "
      "'num_train_scenes'); its options are "
  )
  with pytest.raises(ValueError) as info:
    data.load(name, "train", data_dir=str(tmp_path), **options)
  assert str(info.value) == message
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "name, option, value, allowed", WRONG_TYPE[::2] + OUT_OF_RANGE[::2]
)
def test_load_fails_as_check_options_does_before_preparing(
    name, option, value, allowed, tmp_path
):
  """One checker: `load` raises the message of `check_options`, first."""
  with pytest.raises(ValueError) as info:
    data.load(name, "test", data_dir=str(tmp_path), **{option: value})
  assert str(info.value) == (
      f"config.data.options.{option}: got {value!r}; {allowed}"
  )
  assert not os.listdir(tmp_path)


def test_check_options_reads_and_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("IRTF_JAX_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for name in data.DATASETS:
    data.check_options(name, {})
  assert not os.listdir(tmp_path)
