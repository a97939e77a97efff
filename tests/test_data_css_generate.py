"""Tests of the CSS family generator (`irtf_jax.data.css.generate`)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from irtf_jax.data import css_synth
from irtf_jax.data.css import generate
from irtf_jax.data.css import scenes
from tests import css_helpers

SMALL = dict(num_scenes=12, mods_per_scene=5, tree_depth=3)


def _families(split, seed=5, **options):
  options = {**SMALL, **options}
  return generate.generate_families(
      seed,
      split,
      options["num_scenes"],
      options["mods_per_scene"],
      options["tree_depth"],
  )


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_variant_is_its_text_applied_to_its_parent(split):
  for family in _families(split):
    root = family[0]
    assert (root.parent, root.text, root.depth) == (-1, "", 0)
    for variant in family[1:]:
      parent = family[variant.parent]
      assert variant.parent < family.index(variant)
      assert variant.depth == parent.depth + 1
      assert css_helpers.apply_text(
          variant.text, css_helpers.scene_as_set(parent.scene)
      ) == css_helpers.scene_as_set(variant.scene)


@pytest.mark.parametrize("split", ["train", "test"])
def test_families_chain_their_modified_scenes(split):
  """A spine of tree_depth modified scenes, each with mods_per_scene variants;
  every scene keeps the root's objects except the cells its chain edited."""
  for family in _families(split):
    children = collections.Counter(v.parent for v in family[1:])
    spine = sorted(children, key=lambda p: family[p].depth)
    assert [family[p].depth for p in spine] == [0, 1, 2]
    assert set(children.values()) == {SMALL["mods_per_scene"]}
    for above, below in zip(spine, spine[1:]):  # A chain through variants.
      assert family[below].parent == above
    assert len(family) == 1 + SMALL["mods_per_scene"] * SMALL["tree_depth"]
    root = {o.position: o for o in family[0].scene}
    for variant in family:
      cells = {o.position: o for o in variant.scene}
      edited = {
          c for c in set(root) | set(cells) if root.get(c) != cells.get(c)
      }
      assert len(edited) <= variant.depth


def test_no_scene_occurs_twice_in_a_split():
  for split in ("train", "test"):
    all_scenes = [v.scene for f in _families(split) for v in f]
    assert len(set(all_scenes)) == len(all_scenes)


def test_queries_are_every_training_edge_and_the_novel_test_edges():
  for variant in (v for f in _families("train") for v in f[1:]):
    assert variant.is_query
    assert not any(o.is_novel for o in variant.scene)
  families = _families("test")
  test_variants = [v for f in families for v in f[1:]]
  for family in families:
    for variant in family[1:]:
      source = css_helpers.scene_as_set(family[variant.parent].scene)
      changed = source ^ css_helpers.scene_as_set(variant.scene)
      touches_novel = any(
          (o[3], o[2]) in scenes.NOVEL_SHAPE_COLORS for o in changed
      )
      assert variant.is_query == touches_novel
  # Both kinds occur: queries, and distractor variants in the gallery.
  assert 0 < sum(v.is_query for v in test_variants) < len(test_variants)


def test_generate_split_lists_the_query_edges_as_mods():
  families = _families("test")
  gallery, mods = generate.generate_split(5, "test", **SMALL)
  assert gallery == [v.scene for f in families for v in f]
  offsets = np.cumsum([0] + [len(f) for f in families])
  expected = sorted(
      (offsets[k] + v.parent, v.text, offsets[k] + i)
      for k, f in enumerate(families)
      for i, v in enumerate(f)
      if v.is_query
  )
  assert (
      sorted((f, m.text, t) for m in mods for f, t in zip(m.sources, m.targets))
      == expected
  )
  assert len({m.text for m in mods}) == len(mods)


def test_generate_split_is_pure():
  a = generate.generate_split(11, "train", 5, 3, 2)
  b = generate.generate_split(11, "train", 5, 3, 2)
  c = generate.generate_split(11, "test", 5, 3, 2)
  assert a == b and a != c
  assert sum(len(m.sources) for m in a[1]) == 5 * 3 * 2
  mods_per_source = collections.Counter(f for m in a[1] for f in m.sources)
  assert set(mods_per_source.values()) == {3}
  assert generate.generate_split(12, "train", 5, 3, 2) != a


def test_every_default_test_source_has_its_variants_one_edit_away():
  """The default test split: each modified scene (every query's source) has
  its mods_per_scene variants and its parent one edit away in the gallery."""
  o = css_synth.DEFAULTS
  families = generate.generate_families(
      o["seed"],
      "test",
      o["num_test_scenes"],
      o["mods_per_scene"],
      o["tree_depth"],
  )
  codes = css_helpers.cell_codes(
      [css_helpers.scene_as_set(v.scene) for f in families for v in f]
  )
  offset = 0
  for family in families:
    modified = sorted({v.parent for v in family[1:]})
    assert len(modified) == o["tree_depth"]
    for p in modified:
      near = css_helpers.one_edit_apart(codes, codes[offset + p])
      variants = [offset + i for i, v in enumerate(family) if v.parent == p]
      assert len(variants) == o["mods_per_scene"] and near[variants].all()
      if family[p].parent >= 0:
        assert near[offset + family[p].parent]
      assert near.sum() >= o["mods_per_scene"] + (family[p].parent >= 0)
    offset += len(family)
