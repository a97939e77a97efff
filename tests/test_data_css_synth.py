"""Tests of the generated CSS-style dataset `css_synth`."""

from __future__ import annotations

import collections
import functools

import numpy as np
import pytest

from irtf_jax import data
from irtf_jax import evaluate
from irtf_jax.data import css_synth
from irtf_jax.data.css import generate
from irtf_jax.data.css import render
from irtf_jax.data.css import scenes
from tests import css_helpers

SMALL = dict(
    num_train_scenes=12, num_test_scenes=12, mods_per_scene=4, tree_depth=3
)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("css_synth"))
  return {
      split: data.load("css_synth", split, data_dir=data_dir, seed=3, **SMALL)
      for split in ("train", "test")
  }


# ------------------------------------------------------------ scene content


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_query_target_is_its_text_applied_to_its_source(splits, split):
  s = splits[split]
  assert s.queries
  for q in s.queries:
    source = css_helpers.objects_as_set(s.objects[q.source_index])
    target = css_helpers.objects_as_set(s.objects[q.target_index])
    assert css_helpers.apply_text(q.text, source) == target
    assert q.target_index != q.source_index
    assert q.target_caption == s.captions[q.target_index]
    assert q.target_caption != s.captions[q.source_index]


def test_the_builder_writes_the_generated_split(splits):
  """Images, captions and pairs are `generate_split`'s, drawn by
  `render_scene`: what the generator makes is what a user loads."""
  for split, s in splits.items():
    gallery, mods = generate.generate_split(
        3,
        split,
        SMALL[f"num_{split}_scenes"],
        SMALL["mods_per_scene"],
        SMALL["tree_depth"],
    )
    assert s.captions == [scenes.scene_caption(g) for g in gallery]
    assert s.mods == mods
    np.testing.assert_array_equal(
        s.images(np.arange(len(s))),
        [render.render_scene(scenes.scene_objects(g)) for g in gallery],
    )


@pytest.mark.parametrize("split", ["train", "test"])
def test_queries_are_every_pair_of_every_mod(splits, split):
  s = splits[split]
  expected = [
      (f, mod.text, t)
      for mod in s.mods
      for f, t in zip(mod.sources, mod.targets)
  ]
  assert [
      (q.source_index, q.text, q.target_index) for q in s.queries
  ] == expected
  assert len({mod.text for mod in s.mods}) == len(s.mods)
  assert sorted(s.vocabulary_texts) == sorted(mod.text for mod in s.mods)
  np.testing.assert_array_equal(s.gallery, np.arange(len(s.captions)))
  if split == "train":  # Every edge of every family.
    assert len(s.queries) == (
        SMALL["num_train_scenes"]
        * SMALL["mods_per_scene"]
        * SMALL["tree_depth"]
    )


def test_novel_compositions_never_occur_in_training(splits):
  novel = scenes.NOVEL_SHAPE_COLORS
  train, test = splits["train"], splits["test"]
  for objects in train.objects:
    for o in objects:
      assert (o["shape"], o["color"]) not in novel, o
  for q in train.queries:
    assert not css_helpers.novel_pairs_in_text(q.text) & novel
  for q in test.queries:
    source = css_helpers.objects_as_set(test.objects[q.source_index])
    target = css_helpers.objects_as_set(test.objects[q.target_index])
    assert any((o[3], o[2]) in novel for o in source ^ target), q


def test_same_looking_scenes_share_a_caption_and_only_they(splits):
  caption_of_pixels = {}
  pixels_of_caption = {}
  for s in splits.values():
    for i, caption in enumerate(s.captions):
      pixels = s.image(i).tobytes()
      assert caption_of_pixels.setdefault(pixels, caption) == caption
      assert pixels_of_caption.setdefault(caption, pixels) == pixels
  # Same objects listed in another order: the same picture and caption.
  scene = (
      scenes.SceneObject("bottom-right", "small", "red", "circle"),
      scenes.SceneObject("top-left", "large", "blue", "triangle"),
  )
  assert scenes.scene_caption(scene) == scenes.scene_caption(scene[::-1])
  np.testing.assert_array_equal(
      render.render_scene(scenes.scene_objects(scene)),
      render.render_scene(scenes.scene_objects(scene[::-1])),
  )


def test_cached_images_equal_the_stored_pngs(splits):
  s = splits["test"]
  assert s.image_shape == (64, 64, 3)
  for i in (0, len(s) // 2, len(s) - 1):
    stored_png = s._decode(i)  # pylint: disable=protected-access
    np.testing.assert_array_equal(s.image(i), stored_png)
    np.testing.assert_array_equal(s.image(i), render.render_scene(s.objects[i]))


# ------------------------------------------------------ determinism, options


def test_same_seed_same_dataset_other_seed_other_dataset(splits, tmp_path):
  again = data.load(
      "css_synth", "test", data_dir=str(tmp_path), seed=3, **SMALL
  )
  first = splits["test"]
  assert again.captions == first.captions
  assert again.queries == first.queries
  np.testing.assert_array_equal(
      again.images(np.arange(len(again))), first.images(np.arange(len(first)))
  )
  other = data.load(
      "css_synth", "test", data_dir=str(tmp_path), seed=4, **SMALL
  )
  assert other.captions != first.captions
  assert [q.text for q in other.queries] != [q.text for q in first.queries]
  # Both option sets live side by side in one data_dir.
  assert (
      data.load(
          "css_synth", "test", data_dir=str(tmp_path), seed=3, **SMALL
      ).captions
      == first.captions
  )


def test_config_name_encodes_every_option():
  names = {css_synth.config_name(**css_synth.DEFAULTS)}
  for key, value in css_synth.DEFAULTS.items():
    names.add(css_synth.config_name(**{**css_synth.DEFAULTS, key: value + 1}))
  assert len(names) == 1 + len(css_synth.DEFAULTS)


def test_image_size_option_scales_the_renders(tmp_path):
  s = data.load(
      "css_synth",
      "train",
      data_dir=str(tmp_path),
      num_train_scenes=2,
      num_test_scenes=2,
      mods_per_scene=2,
      tree_depth=1,
      image_size=32,
  )
  assert len(s) == 2 * (1 + 2)
  assert s.images(np.arange(len(s))).shape == (len(s), 32, 32, 3)
  stored_png = s._decode(0)  # pylint: disable=protected-access
  np.testing.assert_array_equal(stored_png, s.image(0))


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(num_train_scenes=0),
            (
                "^config.data.options.num_train_scenes: got 0; "
                "css_synth needs an integer >= 1$"
            ),
        ),
        (
            dict(tree_depth=0),
            "tree_depth: got 0; css_synth needs an integer >= 1",
        ),
        (
            dict(mods_per_scene=True),
            "mods_per_scene: got True; css_synth needs an integer >= 1",
        ),
        (
            dict(image_size=8),
            "image_size: got 8; css_synth needs an integer >= 16",
        ),
        (dict(seed=1.5), "seed: got 1.5; css_synth needs an integer >= 0"),
        (
            dict(num_scenes=3),
            (
                "^config.data.options.num_scenes: css_synth has no "
                "option 'num_scenes'; its options are num_train_scenes, "
            ),
        ),
    ],
)
def test_bad_options_are_named(tmp_path, options, message):
  with pytest.raises(ValueError, match=message):
    data.load("css_synth", "train", data_dir=str(tmp_path), **options)


# ------------------------------------------------------------------ sampler


def test_sampler_pairs_consecutive_queries_on_one_source(splits):
  s = splits["train"]
  pairs = {
      (f, mod.text, t)
      for mod in s.mods
      for f, t in zip(mod.sources, mod.targets)
  }
  batch = s.sample_training_queries(seed=0, step=5, batch_size=31)
  assert len(batch) == 31
  for q in batch:
    assert (q.source_index, q.text, q.target_index) in pairs
    assert q.target_caption == s.captions[q.target_index]
  for first, second in zip(batch[0:-1:2], batch[1::2]):
    assert first.source_index == second.source_index
    assert first.text != second.text
  # Pure in (seed, step, batch_size); other steps give other batches.
  assert batch == s.sample_training_queries(seed=0, step=5, batch_size=31)
  assert batch != s.sample_training_queries(seed=0, step=6, batch_size=31)
  assert batch != s.sample_training_queries(seed=1, step=5, batch_size=31)


def test_sampler_second_query_is_uniform_over_other_mods(splits):
  s = splits["train"]
  mods_of_source = collections.defaultdict(set)
  for mod in s.mods:
    for f in mod.sources:
      mods_of_source[f].add(mod.text)
  counts = collections.Counter()
  for step in range(200):
    batch = s.sample_training_queries(seed=7, step=step, batch_size=2)
    first, second = batch
    assert second.text in mods_of_source[first.source_index] - {first.text}
    counts[first.source_index] += 1
  # Many different sources are drawn (not one fixed pair).
  assert len(counts) > 20


# ------------------------------------- train-split recall on test-sized data


def test_test_sized_train_recall_ranks_whole_families(splits):
  """config.eval.train_gallery="test_size": the first whole generated
  families of the train split, as many images as the test gallery, and as
  many queries as the test evaluation ranks."""
  train, test = splits["train"], splits["test"]
  # 7 train queries; how many the test evaluation ranks (0: all) varies.
  recall_split = functools.partial(
      evaluate.train_recall_split, train, test, max_train_queries=7
  )
  view, num_queries = recall_split(
      train_gallery="test_size", max_test_queries=0
  )
  assert num_queries == len(test.queries)
  generated = generate.generate_families(
      3,
      "train",
      SMALL["num_train_scenes"],
      SMALL["mods_per_scene"],
      SMALL["tree_depth"],
  )
  sizes = np.cumsum([len(family) for family in generated])
  taken = int(np.searchsorted(sizes, len(test.gallery)))  # first >= it
  np.testing.assert_array_equal(view.gallery, np.arange(sizes[taken]))
  assert sizes[taken] >= len(test.gallery)
  assert taken == 0 or sizes[taken - 1] < len(test.gallery)
  inside = set(range(sizes[taken]))
  assert view.queries == [q for q in train.queries if q.source_index in inside]
  assert view.queries and all(q.target_index in inside for q in view.queries)
  # The view ranks against its own gallery, its source excluded.
  np.testing.assert_array_equal(
      view.excluded_columns(), [q.source_index for q in view.queries]
  )
  _, limited = recall_split(train_gallery="test_size", max_test_queries=5)
  assert limited == 5
  assert recall_split(train_gallery="all", max_test_queries=5) == (train, 7)
  with pytest.raises(ValueError, match="config.eval.train_gallery: unknown"):
    recall_split(train_gallery="half", max_test_queries=5)


# ------------------------------------------------- raw pixels cannot answer


def _raw_pixel_features(gallery, indices, image_size):
  """Rendered images as float vectors, mean-centred, unit L2 norm."""
  x = np.stack([
      render.render_scene(scenes.scene_objects(gallery[i]), image_size)
      for i in indices
  ])
  x = x.reshape(len(indices), -1).astype(np.float32)
  x -= x.mean(axis=1, keepdims=True)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def raw_pixel_recall(
    gallery, captions, sources, targets, ks, image_size, chunk=2048
):
  """Recall@K of ranking the gallery by raw-pixel cosine to the source.

  Written apart from the project's evaluator: image j scores
  s_j = <x_source, x_j>; the source is excluded; a query is a hit at K when
  one of the K best-scored images has the target's caption. Captions are
  unique here, so that is the target itself: a hit when fewer than K other
  images score strictly above it (ties count for the baseline, so the recall
  is if anything overestimated).
  """
  assert len(set(captions)) == len(captions)
  sources, targets = np.asarray(sources), np.asarray(targets)
  distinct, row = np.unique(sources, return_inverse=True)
  queries = _raw_pixel_features(gallery, distinct, image_size)
  target_scores = np.einsum(
      "qd,qd->q",
      queries[row],
      _raw_pixel_features(gallery, targets, image_size),
  )
  above = np.zeros(len(sources), np.int64)
  for start in range(0, len(gallery), chunk):
    columns = np.arange(start, min(start + chunk, len(gallery)))
    scores = (queries @ _raw_pixel_features(gallery, columns, image_size).T)[
        row
    ]
    beats = scores > target_scores[:, None]
    beats &= columns[None, :] != sources[:, None]
    beats &= columns[None, :] != targets[:, None]  # Rounding: not above itself.
    above += beats.sum(axis=1)
  return {k: float(np.mean(above < k)) for k in ks}


def test_raw_pixels_cannot_answer_the_default_test_queries():
  """Every default test query, images only: R@1 at most 10% (DESIGN.md)."""
  o = css_synth.DEFAULTS
  gallery, mods = generate.generate_split(
      o["seed"],
      "test",
      o["num_test_scenes"],
      o["mods_per_scene"],
      o["tree_depth"],
  )
  sources = [f for m in mods for f in m.sources]
  targets = [t for m in mods for t in m.targets]
  assert len(sources) > 2000  # A few thousand queries.
  recall = raw_pixel_recall(
      gallery,
      [scenes.scene_caption(g) for g in gallery],
      sources,
      targets,
      (1, 5, 10),
      o["image_size"],
  )
  assert recall[1] <= 0.10, recall
