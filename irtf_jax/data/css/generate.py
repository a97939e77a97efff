"""CSS-style splits generated from a seed: families of chained modifications.

Families. A split holds `num_scenes` families, one per root scene (2 to 5
objects, `ROOT_OBJECTS`). A family grows by chained modifications, as CSS
renders each of its scenes in many edited variants: the root gets
`mods_per_scene` modifications, each a new scene one edit away; one of those
variants, drawn at random, gets `mods_per_scene` modifications of its own,
and so on down a chain of `tree_depth` modified scenes. A family is thus a
tree of 1 + mods_per_scene * tree_depth scenes (fewer where a scene offers too
few new modifications) around a spine of chained edits, and each of its
scenes holds the root's objects except the at most tree_depth ones its chain
of edits changed. No scene occurs twice in a split. The gallery is every
scene of every family, family after family, each in generation order.

Why this shape: only the text can pick the target. A modified scene has
mods_per_scene gallery images one edit away (its variants), besides its
parent and its siblings; an image-only retriever cannot tell which of them a
query asks for (with unrelated source scenes instead, a source's only near
neighbours are its own targets, and raw pixels find them).

Queries. A tree edge (scene, text, variant) is a (from, to) pair of the mod
with that text; one text may apply in many families ("remove red object"),
as in CSS's mods. Training: no scene of the split holds a (shape, color) of
`NOVEL_SHAPE_COLORS` (roots are drawn without them, modifications that touch
one are drawn again), hence no training text names one, and every edge is a
query. Test: roots and modifications may hold any pair; the queries are the
edges whose modification touches a held-out pair, and the other variants
stay in the gallery, as distractors one edit away from the queries' sources.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from irtf_jax.data.css import scenes as scenes_lib
from irtf_jax.data.css.scenes import Scene
from irtf_jax.data.css.split import Mod

# Objects of a root scene: a uniform count in [2, 5].
ROOT_OBJECTS = (2, 5)
# Draws per wanted modification before a scene is left with fewer variants.
_ATTEMPTS = 50


@dataclasses.dataclass(frozen=True)
class Variant:
  """One scene of a family.

  Attributes:
    scene: the scene.
    parent: index in the family of the scene it modifies (-1: the root).
    text: the modification that makes `scene` of its parent ("": the root).
    is_query: whether (parent, text, scene) is a query pair of the split.
    depth: number of chained modifications from the root.
  """

  scene: Scene
  parent: int = -1
  text: str = ""
  is_query: bool = False
  depth: int = 0


def grow_family(
    rng: np.random.Generator,
    root: Scene,
    *,
    mods_per_scene: int,
    tree_depth: int,
    novel: bool,
    taken: set[Scene],
) -> list[Variant]:
  """The family of `root` (see module doc), root first.

  Args:
    rng: the split's generator (consumed).
    root: the root scene.
    mods_per_scene: variants of each modified scene.
    tree_depth: length of the chain of modified scenes.
    novel: test split (queries touch held-out pairs) or training (no scene
      touches one).
    taken: scenes already in the split; new variants are added to it.
  """
  family = [Variant(root)]
  spine = 0
  for depth in range(1, tree_depth + 1):
    first = len(family)
    for _ in range(_ATTEMPTS * mods_per_scene):
      if len(family) - first == mods_per_scene:
        break
      mod = scenes_lib.sample_modification(rng, family[spine].scene)
      if mod is None or mod.target in taken or (mod.is_novel and not novel):
        continue
      taken.add(mod.target)
      family.append(
          Variant(mod.target, spine, mod.text, mod.is_novel or not novel, depth)
      )
    if len(family) == first:
      break  # The chain ends where a scene offers no new modification.
    spine = int(rng.integers(first, len(family)))
  return family


def generate_families(
    seed: int, split: str, num_scenes: int, mods_per_scene: int, tree_depth: int
) -> list[list[Variant]]:
  """The families of one split; a pure function of its arguments."""
  novel = split == "test"
  rng = np.random.default_rng(
      np.random.SeedSequence([seed, ("train", "test").index(split)])
  )
  taken: set[Scene] = set()
  families = []
  for _ in range(num_scenes):
    root = scenes_lib.sample_scene(rng, ROOT_OBJECTS, allow_novel=novel)
    while root in taken:
      root = scenes_lib.sample_scene(rng, ROOT_OBJECTS, allow_novel=novel)
    taken.add(root)
    families.append(
        grow_family(
            rng,
            root,
            mods_per_scene=mods_per_scene,
            tree_depth=tree_depth,
            novel=novel,
            taken=taken,
        )
    )
  return families


def generate_split(
    seed: int, split: str, num_scenes: int, mods_per_scene: int, tree_depth: int
) -> tuple[list[Scene], list[Mod]]:
  """The scenes (gallery order) and mods of one split (see module doc).

  Mods are listed in the order their texts first occur, and their pairs in
  gallery order of their targets. A pure function of its arguments.
  """
  scenes: list[Scene] = []
  pairs: dict[str, list[tuple[int, int]]] = {}
  for family in generate_families(
      seed, split, num_scenes, mods_per_scene, tree_depth
  ):
    offset = len(scenes)
    for i, variant in enumerate(family):
      if variant.is_query:
        pairs.setdefault(variant.text, []).append(
            (offset + variant.parent, offset + i)
        )
    scenes.extend(variant.scene for variant in family)
  mods = [
      Mod(text, tuple(f for f, _ in p), tuple(t for _, t in p))
      for text, p in pairs.items()
  ]
  return scenes, mods
