"""CSS-style splits generated from a seed: scenes and their modifications."""

from __future__ import annotations

import numpy as np

from irtf_jax.data.css import scenes as scenes_lib
from irtf_jax.data.css.scenes import Scene
from irtf_jax.data.css.split import Mod

# Objects of a source scene.
NUM_OBJECTS = (2, 5)


def generate_split(seed: int, split: str, num_scenes: int,
                   mods_per_scene: int) -> tuple[list[Scene], list[Mod]]:
  """Generates the scenes (gallery order) and mods of one split.

  Training: no object of any source or target has a (shape, color) of
  `NOVEL_SHAPE_COLORS` (sources are drawn without them and no modification
  adds or changes to one). Test: every modification changes such an object.
  A pure function of its arguments.
  """
  novel = split == "test"
  rng = np.random.default_rng(
      np.random.SeedSequence([seed, ("train", "test").index(split)]))
  scenes: list[Scene] = []
  index_of: dict[Scene, int] = {}
  pairs: dict[str, list[tuple[int, int]]] = {}
  texts_of_source: dict[int, set[str]] = {}
  targets_of_source: dict[int, set[int]] = {}

  def gallery_index(scene: Scene) -> int:
    if scene not in index_of:
      index_of[scene] = len(scenes)
      scenes.append(scene)
    return index_of[scene]

  for _ in range(num_scenes):
    scene = scenes_lib.sample_scene(rng, NUM_OBJECTS, allow_novel=novel)
    source = gallery_index(scene)
    texts = texts_of_source.setdefault(source, set())
    targets = targets_of_source.setdefault(source, {source})
    added = 0
    for _ in range(100 * mods_per_scene):
      if added == mods_per_scene:
        break
      mod = scenes_lib.sample_modification(rng, scene)
      if mod is None or mod.text in texts:
        continue
      if novel != mod.is_novel:
        continue
      if mod.target in index_of and index_of[mod.target] in targets:
        continue
      target = gallery_index(mod.target)
      texts.add(mod.text)
      targets.add(target)
      pairs.setdefault(mod.text, []).append((source, target))
      added += 1
  mods = [Mod(text, tuple(f for f, _ in p), tuple(t for _, t in p))
          for text, p in pairs.items()]
  return scenes, mods
