"""`css_synth`: a CSS-style dataset generated from a seed (no download).

The CSS dataset (Vo et al., "Composing Text and Image for Image Retrieval -
An Empirical Odyssey", CVPR 2019) shows scenes of simple objects on a 3x3 grid
and asks for modifications in words. `css_synth` regenerates data of that
design procedurally, deterministically from `seed`, with CSS's structure:
root scenes, each rendered in many variants made by chained modifications
(`irtf_jax.data.css.generate`). The scene grammar, the modifications' wording
and the held-out compositions are `irtf_jax.data.css.scenes`'s; images are
drawn by CSS's 2D renderer (`irtf_jax.data.css.render`); the split and its
protocol (TIRG's) are `irtf_jax.data.css.split.CSSSplit`, shared with `css3d`.

Novel compositions. The (shape, color) pairs of `NOVEL_SHAPE_COLORS` never
occur in a training scene, hence in no training query or text. Every test
query modifies an object with such a pair. Test recall thus measures
generalization to new attribute compositions rather than memorization.

Options (`load`; each option set is prepared once, under a builder config
whose name encodes every option):
  num_train_scenes, num_test_scenes: root scenes (families) per split;
  mods_per_scene: variants of each modified scene;
  tree_depth: modified scenes chained in each family;
  seed, image_size: the generator's seed; the images' side in pixels.
The defaults (250 / 100 families, 30 variants, depth 3) give 22,750 training
images and 22,500 training queries, 9,100 test images and 2,793 test queries.
They are chosen so that images alone cannot answer a query: ranking the test
gallery by cosine similarity of mean-centred raw pixels to the query image
(source excluded) gives R@1 3.6%, R@5 17.6%, R@10 31.5% over every default
test query (tests/test_data_css_synth.py recomputes R@1; about 1 / 31, the chance
of picking the target among a source's 30 variants and its parent). Each
modified scene's variants are what keeps this low: 20 variants give R@1 5.5%.
"""

from __future__ import annotations

from typing import Any, Mapping

import tensorflow_datasets as tfds

from irtf_jax import data
from irtf_jax.data import options as options_lib
from irtf_jax.data import storage

# Public names of the dataset, defined in the shared CSS modules.
from irtf_jax.data.css.generate import generate_split
from irtf_jax.data.css.render import render_scene
from irtf_jax.data.css.scenes import NOVEL_SHAPE_COLORS
from irtf_jax.data.css.scenes import SceneObject
from irtf_jax.data.css.scenes import scene_caption
from irtf_jax.data.css.scenes import scene_objects
from irtf_jax.data.css.split import CSSSplit
from irtf_jax.data.css.split import Mod
from irtf_jax.data.css.split import css_examples
from irtf_jax.data.css.split import css_features
from irtf_jax.data.css.split import read_css_split

__all__ = [
    "CSSSplit",
    "CssSynth",
    "CssSynthConfig",
    "DEFAULTS",
    "Mod",
    "NOVEL_SHAPE_COLORS",
    "OPTIONS",
    "SceneObject",
    "check_options",
    "config_name",
    "generate_split",
    "load",
    "render_scene",
    "scene_caption",
    "scene_objects",
]

# Every option is an integer: its default (the module doc gives the sizes and
# why) and the smallest value it allows.
OPTIONS = {
    "num_train_scenes": options_lib.integer(250, 1),
    "num_test_scenes": options_lib.integer(100, 1),
    "mods_per_scene": options_lib.integer(30, 1),
    "tree_depth": options_lib.integer(3, 1),
    "seed": options_lib.integer(0, 0),
    "image_size": options_lib.integer(64, 16),
}
DEFAULTS = {name: option.default for name, option in OPTIONS.items()}


def config_name(
    *,
    num_train_scenes,
    num_test_scenes,
    mods_per_scene,
    tree_depth,
    seed,
    image_size,
) -> str:
  """The builder config name of an option set: every option, in order."""
  return (
      f"seed{seed}_train{num_train_scenes}_test{num_test_scenes}_"
      f"mods{mods_per_scene}_depth{tree_depth}_px{image_size}"
  )


def check_options(options: Mapping[str, Any]) -> dict[str, int]:
  """The options of `load`, checked (see `options.resolve`), defaults filled."""
  return options_lib.resolve("css_synth", OPTIONS, options)


class CssSynthConfig(tfds.core.BuilderConfig):
  """One option set of `css_synth` (its name encodes every option)."""

  def __init__(self, **options: int):
    super().__init__(name=config_name(**options))
    self.options = dict(options)


class CssSynth(tfds.core.GeneratorBasedBuilder):
  """CSS-style scene families and modifications generated from a seed."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": (
          "CSS's structure: families of chained modifications around "
          "root scenes; option tree_depth."
      ),
  }
  BUILDER_CONFIGS = [CssSynthConfig(**DEFAULTS)]

  def _info(self):
    return self.dataset_info_from_configs(
        description=(
            "CSS-style scene families and modifications generated from a seed."
        ),
        features=css_features(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        split: self._generate_examples(split) for split in ("train", "test")
    }

  def _generate_examples(self, split):
    o = self.builder_config.options
    scenes, mods = generate_split(
        o["seed"],
        split,
        o[f"num_{split}_scenes"],
        o["mods_per_scene"],
        o["tree_depth"],
    )
    objects = [scene_objects(s) for s in scenes]
    images = (
        storage.encode_png(render_scene(objs, o["image_size"]))
        for objs in objects
    )
    yield from css_examples(
        images, [scene_caption(s) for s in scenes], objects, mods
    )


@data.register("css_synth", check_options=check_options)
def load(
    split: str,
    *,
    data_dir: str | None,
    manual_dir: str | None,
    options: Mapping[str, Any],
) -> CSSSplit:
  """Loads split "train" or "test" of `css_synth`, generating it once.

  Args:
    split: "train" or "test".
    data_dir: where the prepared array_record files are kept.
    manual_dir: unused (nothing to download).
    options: resolved by `check_options`: num_train_scenes (default 250),
      num_test_scenes (100), mods_per_scene (30), tree_depth (3), seed (0),
      image_size (64); see the module doc. A split of n families holds up to
      n * (1 + mods_per_scene * tree_depth) images.
  """
  del manual_dir
  config = CssSynthConfig(**options)
  if config.name in CssSynth.builder_configs:  # TFDS wants predefined by name.
    config = config.name
  sources = storage.prepare(CssSynth, data_dir=data_dir, config=config)
  return read_css_split(
      sources[split],
      name="css_synth",
      split=split,
      render_size=options["image_size"],
  )
