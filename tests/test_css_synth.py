"""Tests of the generated CSS-style dataset `css_synth`."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from irtf_jax import data
from irtf_jax.data import css_synth

RED = (244, 35, 35)
WHITE = (255, 255, 255)
SMALL = dict(num_train_scenes=40, num_test_scenes=40, mods_per_scene=2)
# The documented grid: row / column name -> centre as a fraction of the side.
ROW_FRACTION = {"top": 0.2, "middle": 0.5, "bottom": 0.8}
COLUMN_FRACTION = {"left": 0.2, "center": 0.5, "right": 0.8}
CELL_OF_POS = {(ROW_FRACTION[r], COLUMN_FRACTION[c]): f"{r}-{c}"
               for r in ROW_FRACTION for c in COLUMN_FRACTION}
SIZE_WORDS = {"small", "large"}
COLOR_WORDS = {"gray", "red", "blue", "green", "brown", "purple", "cyan",
               "yellow"}
SHAPE_WORDS = {"rectangle", "circle", "triangle"}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("css_synth"))
  return {split: data.load("css_synth", split, data_dir=data_dir, seed=3,
                           **SMALL)
          for split in ("train", "test")}


def _obj(shape, color, size, pos):
  return {"shape": shape, "color": color, "size": size, "pos": pos}


# ------------------------------------------------------------------ renderer


def test_small_red_rectangle_top_left_covers_its_8x8_box():
  image = css_synth.render_scene([_obj("rectangle", "red", "small",
                                       (0.2, 0.2))])
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  # Centre 0.2 * 64 = 12.8, half-size 4: rows and columns int(8.8)..int(16.8).
  expected = np.full((64, 64, 3), 255, np.uint8)
  expected[8:16, 8:16] = RED
  np.testing.assert_array_equal(image, expected)


def test_large_rectangle_is_16_px_wide():
  image = css_synth.render_scene([_obj("rectangle", "blue", "large",
                                       (0.5, 0.8))])
  covered = np.argwhere(np.any(image != 255, axis=-1))
  # y = 32, x = 51.2, s = 8: rows 24..39, columns int(43.2)..int(59.2) - 1.
  assert covered[:, 0].min() == 24 and covered[:, 0].max() == 39
  assert covered[:, 1].min() == 43 and covered[:, 1].max() == 58
  assert len(covered) == 16 * 16
  np.testing.assert_array_equal(image[30, 50], (42, 75, 215))


def test_small_circle_is_css_diamond():
  image = css_synth.render_scene([_obj("circle", "green", "small",
                                       (0.5, 0.5))])
  painted = np.any(image != 255, axis=-1)
  # y = x = 32, s = 4; row r spans [32 + |r-32| - 4, 32 - |r-32| + 4).
  widths = painted.sum(axis=1)
  np.testing.assert_array_equal(widths[28:37], [0, 2, 4, 6, 8, 6, 4, 2, 0])
  assert widths.sum() == 32
  np.testing.assert_array_equal(np.flatnonzero(painted[32]),
                                np.arange(28, 36))
  np.testing.assert_array_equal(image[32, 30], (29, 205, 20))


def test_small_triangle_widens_downwards():
  image = css_synth.render_scene([_obj("triangle", "yellow", "small",
                                       (0.5, 0.5))])
  painted = np.any(image != 255, axis=-1)
  # Row r in [28, 36): columns [int(32 - (r-28)/2), int(32 + (r-28)/2)).
  np.testing.assert_array_equal(painted.sum(axis=1)[28:36],
                                [0, 1, 2, 3, 4, 5, 6, 7])
  assert painted.sum() == 28
  np.testing.assert_array_equal(np.flatnonzero(painted[35]),
                                np.arange(28, 35))


def test_later_objects_draw_over_earlier_ones_and_clip_at_the_border():
  image = css_synth.render_scene([
      _obj("rectangle", "red", "large", (0.5, 0.5)),
      _obj("rectangle", "gray", "small", (0.5, 0.5)),
      _obj("rectangle", "cyan", "large", (0.0, 0.0))])
  np.testing.assert_array_equal(image[32, 32], (87, 87, 87))
  np.testing.assert_array_equal(image[25, 25], RED)
  assert np.all(image[:8, :8] == (41, 208, 208)) and np.all(image[8, 8] == 255)


def test_render_rejects_unknown_attributes():
  with pytest.raises(ValueError, match="shape 'star'"):
    css_synth.render_scene([_obj("star", "red", "small", (0.5, 0.5))])
  with pytest.raises(ValueError, match="unknown 'pink'"):
    css_synth.render_scene([_obj("circle", "pink", "small", (0.5, 0.5))])


# ------------------------------------------------------------ scene content


def _objects_as_set(objects):
  return frozenset((CELL_OF_POS[tuple(o["pos"])], o["size"], o["color"],
                    o["shape"]) for o in objects)


def _parse_reference(words):
  """Reference words -> predicate on (cell, size, color, shape)."""
  *qualifiers, head = words
  wanted = {}
  for word in qualifiers:
    if "-" in word:
      wanted[0] = word
    elif word in SIZE_WORDS:
      wanted[1] = word
    elif word in COLOR_WORDS:
      wanted[2] = word
    else:
      raise AssertionError(f"unexpected word {word!r}")
  if head != "object":
    assert head in SHAPE_WORDS
    wanted[3] = head
  return lambda obj: all(obj[i] == v for i, v in wanted.items())


def _apply(text, objects):
  """Independent reading of a modification text: the expected target."""
  words = text.split()
  if words[0] == "add":
    size, color, shape, to, cell = words[1:]
    assert to == "to" and cell not in {o[0] for o in objects}
    return objects | {(cell, size, color, shape)}
  reference = words[1:] if words[0] == "remove" else words[1:-1]
  matches = [o for o in objects if _parse_reference(reference)(o)]
  assert len(matches) == 1, (text, objects)  # Refers to exactly one object.
  (old,) = matches
  if words[0] == "remove":
    return objects - {old}
  assert words[0] == "make"
  value = words[-1]
  slot = 1 if value in SIZE_WORDS else 2 if value in COLOR_WORDS else 3
  assert value in SIZE_WORDS | COLOR_WORDS | SHAPE_WORDS and old[slot] != value
  new = list(old)
  new[slot] = value
  return (objects - {old}) | {tuple(new)}


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_query_target_is_its_text_applied_to_its_source(splits, split):
  s = splits[split]
  assert len(s.queries) == 2 * SMALL[f"num_{split}_scenes"]
  for q in s.queries:
    source = _objects_as_set(s.objects[q.source_index])
    target = _objects_as_set(s.objects[q.target_index])
    assert _apply(q.text, source) == target
    assert q.target_index != q.source_index
    assert q.target_caption == s.captions[q.target_index]
    assert q.target_caption != s.captions[q.source_index]


@pytest.mark.parametrize("split", ["train", "test"])
def test_queries_are_every_pair_of_every_mod(splits, split):
  s = splits[split]
  expected = [(f, mod.text, t) for mod in s.mods
              for f, t in zip(mod.sources, mod.targets)]
  assert [(q.source_index, q.text, q.target_index)
          for q in s.queries] == expected
  assert len({mod.text for mod in s.mods}) == len(s.mods)
  assert sorted(s.vocabulary_texts) == sorted(mod.text for mod in s.mods)
  np.testing.assert_array_equal(s.gallery, np.arange(len(s.captions)))


def _novel_pairs_in_text(text):
  words = text.split()
  return {(b, a) for a, b in zip(words, words[1:])
          if a in COLOR_WORDS and b in SHAPE_WORDS}


def test_novel_compositions_never_occur_in_training(splits):
  novel = css_synth.NOVEL_SHAPE_COLORS
  train, test = splits["train"], splits["test"]
  for q in train.queries:
    for index in (q.source_index, q.target_index):
      for o in train.objects[index]:
        assert (o["shape"], o["color"]) not in novel, (q, o)
    assert not _novel_pairs_in_text(q.text) & novel
  seen_in_training = {(o["shape"], o["color"]) for objs in train.objects
                      for o in objs}
  for q in test.queries:
    source = _objects_as_set(test.objects[q.source_index])
    target = _objects_as_set(test.objects[q.target_index])
    changed = source ^ target
    assert any((o[3], o[2]) in novel for o in changed), q
    assert any((o[3], o[2]) not in seen_in_training for o in changed), q


def test_same_looking_scenes_share_a_caption_and_only_they(splits):
  caption_of_pixels = {}
  pixels_of_caption = {}
  for s in splits.values():
    for i, caption in enumerate(s.captions):
      pixels = s.image(i).tobytes()
      assert caption_of_pixels.setdefault(pixels, caption) == caption
      assert pixels_of_caption.setdefault(caption, pixels) == pixels
  # Same objects listed in another order: the same picture and caption.
  scene = [css_synth.SceneObject("bottom-right", "small", "red", "circle"),
           css_synth.SceneObject("top-left", "large", "blue", "triangle")]
  assert (css_synth.scene_caption(tuple(scene))
          == css_synth.scene_caption(tuple(scene[::-1])))
  np.testing.assert_array_equal(
      css_synth.render_scene(css_synth.scene_objects(tuple(scene))),
      css_synth.render_scene(css_synth.scene_objects(tuple(scene[::-1]))))


def test_cached_images_equal_the_stored_pngs(splits):
  s = splits["test"]
  assert s.image_shape == (64, 64, 3)
  for i in (0, len(s) // 2, len(s) - 1):
    stored_png = s._decode(i)  # pylint: disable=protected-access
    np.testing.assert_array_equal(s.image(i), stored_png)
    np.testing.assert_array_equal(s.image(i),
                                  css_synth.render_scene(s.objects[i]))


# ------------------------------------------------------ determinism, options


def test_same_seed_same_dataset_other_seed_other_dataset(splits, tmp_path):
  again = data.load("css_synth", "test", data_dir=str(tmp_path), seed=3,
                    **SMALL)
  first = splits["test"]
  assert again.captions == first.captions
  assert again.queries == first.queries
  np.testing.assert_array_equal(again.images(np.arange(len(again))),
                                first.images(np.arange(len(first))))
  other = data.load("css_synth", "test", data_dir=str(tmp_path), seed=4,
                    **SMALL)
  assert other.captions != first.captions
  assert [q.text for q in other.queries] != [q.text for q in first.queries]
  # Both option sets live side by side in one data_dir.
  assert data.load("css_synth", "test", data_dir=str(tmp_path), seed=3,
                   **SMALL).captions == first.captions


def test_image_size_option_scales_the_renders(tmp_path):
  s = data.load("css_synth", "train", data_dir=str(tmp_path),
                num_train_scenes=3, num_test_scenes=3, image_size=32)
  assert s.images(np.arange(len(s))).shape == (len(s), 32, 32, 3)
  stored_png = s._decode(0)  # pylint: disable=protected-access
  np.testing.assert_array_equal(stored_png, s.image(0))


@pytest.mark.parametrize("options, message", [
    (dict(num_train_scenes=0), "option num_train_scenes: must be an integer "
     ">= 1, got 0"),
    (dict(image_size=8), "option image_size: must be an integer >= 16"),
    (dict(seed=1.5), "option seed: must be an integer >= 0, got 1.5"),
    (dict(num_scenes=3), r"unknown option\(s\) \['num_scenes'\]"),
])
def test_bad_options_are_named(tmp_path, options, message):
  with pytest.raises(ValueError, match=message):
    data.load("css_synth", "train", data_dir=str(tmp_path), **options)


# ------------------------------------------------------------------ sampler


def test_sampler_pairs_consecutive_queries_on_one_source(splits):
  s = splits["train"]
  pairs = {(f, mod.text, t) for mod in s.mods
           for f, t in zip(mod.sources, mod.targets)}
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


def test_generate_split_is_pure():
  a = css_synth.generate_split(11, "train", 30, 3)
  b = css_synth.generate_split(11, "train", 30, 3)
  c = css_synth.generate_split(11, "test", 30, 3)
  assert a == b and a != c
  assert sum(len(m.sources) for m in a[1]) == 90
  sources = collections.Counter(f for m in a[1] for f in m.sources)
  assert set(sources.values()) == {3}
  assert len(list(itertools.chain(*[m.sources for m in c[1]]))) == 90
