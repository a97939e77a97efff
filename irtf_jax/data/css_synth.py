"""`css_synth`: a CSS-style dataset generated from a seed (no download).

The CSS dataset (Vo et al., "Composing Text and Image for Image Retrieval -
An Empirical Odyssey", CVPR 2019) shows scenes of simple objects on a 3x3 grid
and asks for modifications in words. `css_synth` regenerates data of that
design procedurally, deterministically from `seed`, rendered the way CSS's
2D renderer draws its scenes.

The scene grammar, the modifications' wording and the novel compositions are
those of `irtf_jax.data.css.scenes`; images are drawn by CSS's 2D renderer
(`irtf_jax.data.css.render`); the split and its protocol are
`irtf_jax.data.css.split.CSSSplit`, shared with `css3d`.

Novel compositions. The (shape, color) pairs of `NOVEL_SHAPE_COLORS` never
occur in a training query: no object of a training source or target scene has
one, hence no training text names one either. Every test query modifies an
object with such a pair. Test recall thus measures generalization to new
attribute compositions rather than memorization.

Splits and protocol (TIRG's for CSS). Each split is generated independently:
`num_*_scenes` source scenes with `mods_per_scene` modifications each (distinct
texts, distinct targets); the gallery is every distinct scene among sources and
targets.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from irtf_jax import data
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

__all__ = ["CSSSplit", "CssSynth", "CssSynthConfig", "Mod",
           "NOVEL_SHAPE_COLORS", "SceneObject", "config_name",
           "generate_split", "load", "render_scene", "scene_caption",
           "scene_objects"]

_DEFAULTS = dict(num_train_scenes=8000, num_test_scenes=8000,
                 mods_per_scene=2, seed=0, image_size=64)


def config_name(*, num_train_scenes, num_test_scenes, mods_per_scene, seed,
                image_size) -> str:
  return (f"seed{seed}_train{num_train_scenes}_test{num_test_scenes}_"
          f"mods{mods_per_scene}_px{image_size}")


def _check_options(options: Mapping[str, Any]) -> dict[str, int]:
  unknown = sorted(set(options) - set(_DEFAULTS))
  if unknown:
    raise ValueError(f"css_synth: unknown option(s) {unknown}; allowed: "
                     f"{sorted(_DEFAULTS)}")
  resolved = {**_DEFAULTS, **options}
  minimum = dict(num_train_scenes=1, num_test_scenes=1, mods_per_scene=1,
                 seed=0, image_size=16)
  for key, value in resolved.items():
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < minimum[key]):
      raise ValueError(f"css_synth option {key}: must be an integer >= "
                       f"{minimum[key]}, got {value!r}")
    resolved[key] = int(value)
  return resolved


class CssSynthConfig(tfds.core.BuilderConfig):
  """One option set of `css_synth` (its name encodes every option)."""

  def __init__(self, *, num_train_scenes: int, num_test_scenes: int,
               mods_per_scene: int, seed: int, image_size: int):
    super().__init__(name=config_name(
        num_train_scenes=num_train_scenes, num_test_scenes=num_test_scenes,
        mods_per_scene=mods_per_scene, seed=seed, image_size=image_size))
    self.num_train_scenes = num_train_scenes
    self.num_test_scenes = num_test_scenes
    self.mods_per_scene = mods_per_scene
    self.seed = seed
    self.image_size = image_size


class CssSynth(tfds.core.GeneratorBasedBuilder):
  """CSS-style scenes and modifications generated from a seed."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [CssSynthConfig(**_DEFAULTS)]

  def _info(self):
    return self.dataset_info_from_configs(
        description="CSS-style scenes and modifications generated from a "
        "seed.", features=css_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split)
            for split in ("train", "test")}

  def _generate_examples(self, split):
    c = self.builder_config
    scenes, mods = generate_split(
        c.seed, split,
        c.num_train_scenes if split == "train" else c.num_test_scenes,
        c.mods_per_scene)
    objects = [scene_objects(s) for s in scenes]
    images = (storage.encode_png(render_scene(o, c.image_size))
              for o in objects)
    yield from css_examples(images, [scene_caption(s) for s in scenes],
                            objects, mods)


@data.register("css_synth")
def load(split: str, *, data_dir: str | None = None,
         manual_dir: str | None = None, **options) -> CSSSplit:
  """Loads split "train" or "test" of `css_synth`, generating it once.

  Args:
    split: "train" or "test".
    data_dir: where the prepared array_record files are kept.
    manual_dir: unused (nothing to download).
    **options: num_train_scenes, num_test_scenes (source scenes per split,
      default 8000 each: 16,000 queries with 2 mods per scene, CSS's scale),
      mods_per_scene (default 2), seed (default 0), image_size (default 64).
      Each option set is prepared under its own builder config.
  """
  del manual_dir
  options = _check_options(options)
  config = CssSynthConfig(**options)
  if config.name in CssSynth.builder_configs:  # TFDS wants predefined by name.
    config = config.name
  sources = storage.prepare(CssSynth, data_dir=data_dir, config=config)
  return read_css_split(sources[split], name="css_synth", split=split,
                        render_size=options["image_size"])
