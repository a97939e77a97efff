"""MIT-States loader: TIRG's protocol on a small fixture in the exact on-disk format."""

from __future__ import annotations

import collections
import functools
import logging
import os
import pickle
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from irtf_jax.data import fixtures
from irtf_jax.data import image_files
from irtf_jax.data import mit_states
from tests import helpers

# (adjective, noun) folders and image counts. fish, tomato and wool are among
# TIRG's 49 test nouns; apple, car and bag are not. bag and wool have a single
# adjective (no query can start from them).
FOLDERS = {
    "ripe apple": 2,
    "rotten apple": 2,
    "sliced apple": 1,
    "old car": 2,
    "new car": 1,
    "raw fish": 2,
    "fried fish": 1,
    "dried fish": 2,
    "ripe tomato": 1,
    "rotten tomato": 2,
    "dyed wool": 1,
    # not classes: placeholders and a folder without a space
    "adj apple": 1,
    "adj fish": 2,
    "misc": 1,
}
# bag's images test the resize and crop: (file, width, height), 2:1 banded.
BANDED = (
    ("landscape.jpg", 96, 48),
    ("portrait.jpg", 48, 96),
    ("large.jpg", 1200, 600),
)
TEST_NOUNS_HERE = {"fish", "tomato", "wool"}


def class_folders():
  """Expected classes: split -> {caption: image count}, from FOLDERS alone."""
  classes = {"train": {"striped bag": len(BANDED)}, "test": {}}
  for folder, count in FOLDERS.items():
    words = folder.split(" ")
    if len(words) != 2 or words[0] == "adj":
      continue
    classes["test" if words[1] in TEST_NOUNS_HERE else "train"][folder] = count
  return classes


def write_fixture(root):
  written = fixtures.write_mit_states(str(root), FOLDERS)
  for name, width, height in BANDED:
    fixtures.write_banded_jpeg(
        os.path.join(root, "images", "striped bag", name), width, height
    )
  return written


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return helpers.prepared_dataset(tmp_path_factory, "mit_states", write_fixture)


load_from = functools.partial(helpers.load_from, "mit_states")
load_error = functools.partial(helpers.load_error, "mit_states")


def test_tirg_test_nouns_are_49_and_include_known_ones():
  assert len(mit_states.TEST_NOUNS) == 49
  assert TEST_NOUNS_HERE <= mit_states.TEST_NOUNS
  assert not {"apple", "car", "bag"} & mit_states.TEST_NOUNS


def test_split_by_noun_and_captions(dataset):
  for split in ("train", "test"):
    got = collections.Counter(dataset[split].captions)
    assert got == collections.Counter(class_folders()[split])
  # each image's caption is its folder's name, and paths stay per split
  for split in ("train", "test"):
    s = dataset[split]
    for path, caption in zip(s.paths, s.captions):
      assert path.split(os.sep)[1] == caption


def test_test_queries_follow_tirg(dataset):
  split = dataset["test"]
  expected = collections.Counter()
  classes = class_folders()["test"]
  for caption, count in classes.items():
    adj, noun = caption.split()
    for target in classes:
      target_adj, target_noun = target.split()
      if target_noun == noun and target_adj != adj:
        expected[(caption, target_adj, target)] += count
  got = collections.Counter(
      (split.captions[q.source_index], q.text, q.target_caption)
      for q in split.queries
  )
  assert sum(expected.values()) == 13  # fish 2*2+1*2+2*2, tomato 1+2
  assert got == expected
  for q in split.queries:
    assert split.captions[q.target_index] == q.target_caption
  np.testing.assert_array_equal(split.gallery, np.arange(len(split.captions)))
  np.testing.assert_array_equal(
      split.exclude_columns, [q.source_index for q in split.queries]
  )


def test_hits_are_the_images_of_the_target_folder(dataset):
  split = dataset["test"]
  for q in split.queries:
    hits = {i for i in split.gallery if split.captions[i] == q.target_caption}
    folder = {
        i
        for i, p in enumerate(split.paths)
        if p.split(os.sep)[1] == q.target_caption
    }
    assert (
        hits == folder
        and len(hits) == class_folders()["test"][q.target_caption]
    )


def test_caption_views(dataset):
  views = dataset["test"].caption_views
  assert views["adjective"]("dried fish") == "dried"
  assert views["noun"]("dried fish") == "fish"


def test_complete_text_uses_the_target_caption(dataset):
  split = dataset["load"]("test", complete_text=True)
  assert [q.text for q in split.queries] == [
      q.target_caption for q in dataset["test"].queries
  ]


def check_training_query_rules(split, queries):
  """Independent check of the sampling rules, from captions alone."""
  adjs_of = collections.defaultdict(set)
  for caption in split.captions:
    adjs_of[caption.split()[1]].add(caption.split()[0])
  for q in queries:
    source_adj, source_noun = split.captions[q.source_index].split()
    target_adj, target_noun = split.captions[q.target_index].split()
    assert target_noun == source_noun and target_adj != source_adj
    assert q.text == target_adj
    assert q.target_caption == split.captions[q.target_index]
    assert len(adjs_of[source_noun]) >= 2
  for first, second in zip(queries[0::2], queries[1::2]):
    assert first.source_index == second.source_index
    noun = split.captions[first.source_index].split()[1]
    if len(adjs_of[noun]) >= 3:
      assert first.text != second.text


def test_training_sampler_pairs_and_rules(dataset):
  split = dataset["train"]
  batches = [
      split.sample_training_queries(seed=3, step=s, batch_size=32)
      for s in range(4)
  ]
  for batch in batches:
    assert len(batch) == 32
    check_training_query_rules(split, batch)
  sources = {q.source_index for b in batches for q in b}
  captions = {split.captions[i] for i in sources}
  # every source with a second adjective shows up; bag (one adjective) never
  assert {c.split()[1] for c in captions} == {"apple", "car"}
  # apple has three adjectives: both other adjectives are drawn
  pairs = {
      (split.captions[a.source_index], a.text, b.text)
      for b0 in batches
      for a, b in zip(b0[0::2], b0[1::2])
  }
  assert ("ripe apple", "rotten", "sliced") in pairs or (
      "ripe apple",
      "sliced",
      "rotten",
  ) in pairs
  assert split.sample_training_queries(3, 1, 32) == batches[1]
  assert split.sample_training_queries(3, 2, 32) != batches[1]
  assert split.sample_training_queries(4, 1, 32) != batches[1]
  assert len(split.sample_training_queries(3, 1, 7)) == 7


def test_train_recall_queries(dataset):
  split = dataset["train"]
  assert len(split.queries) == len(split.captions)  # fewer than 10,000 images
  check_training_query_rules(split, split.queries)
  np.testing.assert_array_equal(
      split.gallery, [q.target_index for q in split.queries]
  )
  np.testing.assert_array_equal(split.exclude_columns, -1)
  assert dataset["load"]("train").queries == split.queries
  assert dataset["load"]("train", train_query_seed=1).queries != split.queries
  assert len(dataset["load"]("train", num_train_queries=5).queries) == 5
  assert set(split.vocabulary_texts) == set(class_folders()["train"])


def test_images_match_their_files(dataset):
  """Records line up with captions: 24x16 files at S=16 are cropped, not resized."""
  split = dataset["test"]
  images = split.images(np.arange(len(split.captions)))
  assert images.shape == (len(split.captions), 16, 16, 3)
  assert images.dtype == np.uint8
  for i, path in enumerate(split.paths):
    original = np.asarray(
        Image.open(os.path.join(dataset["root"], path)), np.float64
    )
    # shorter side already 16: the centre crop keeps columns 4..19
    assert np.abs(images[i] - original[:, 4:20]).mean() < 6


def test_split_survives_pickling_for_worker_processes(dataset):
  """config.data.workers > 0 sends the split to grain worker processes, which
  unpickle it and read images there (TFDS refuses to rebuild a builder from a
  copy of one of its listed configs)."""
  # The default storage (a config the builder lists) and a larger one (not
  # listed: a config of its own).
  for split in (
      dataset["train"],
      dataset["test"],
      dataset["load"]("test", image_size=300),
  ):
    copy = pickle.loads(pickle.dumps(split))
    indices = np.arange(len(split.captions))
    np.testing.assert_array_equal(copy.images(indices), split.images(indices))
    assert copy.captions == split.captions


def test_resize_shorter_side_then_center_crop(dataset):
  """2:1 banded images: the crop keeps exactly the red and blue halves."""
  split = dataset["train"]
  for name, width, height in BANDED:
    index = split.paths.index(os.path.join("images", "striped bag", name))
    image = split.image(index).astype(np.int64)
    if height > width:
      image = image.transpose(1, 0, 2)
    # columns 0..7 from red, 8..15 from blue; edges blur, so test the insides
    assert np.abs(image[:, 1:7] - fixtures.RED).max() < 50
    assert np.abs(image[:, 9:15] - fixtures.BLUE).max() < 50
    assert image[:, :, 1].max() < 80  # no green band inside the crop


def test_image_size_option(dataset):
  split = dataset["load"]("test", image_size=8)
  assert split.images(np.array([0, 1])).shape == (2, 8, 8, 3)


def test_missing_dataset_folder_prints_instructions(tmp_path):
  missing = tmp_path / "nowhere"
  assert re.search(
      rf"mit_states: missing dataset folder {missing}",
      load_error(tmp_path, missing, FileNotFoundError),
  )
  root = tmp_path / "no_images"
  root.mkdir()
  (root / "README").write_text("x")
  message = load_error(tmp_path, root, FileNotFoundError)
  assert message.startswith(
      f"mit_states: missing folder {root / 'images'}. Pass the folder"
  )
  assert mit_states.MANUAL_DOWNLOAD_INSTRUCTIONS in message


def small_root(tmp_path):
  root = tmp_path / "mit"
  fixtures.write_mit_states(
      str(root), {"raw fish": 1, "dried fish": 1, "old car": 1, "new car": 1}
  )
  return root


def test_truncated_image_error_or_skip(tmp_path, caplog):
  root = small_root(tmp_path)
  bad = os.path.join(root, "images", "raw fish", "broken.jpg")
  fixtures.write_truncated_jpeg(bad)
  message = load_error(tmp_path, root, image_files.BadImageError)
  assert message.startswith(f"{bad}: unreadable or truncated image (")
  assert message.endswith(
      "; stopping (on_bad_image='error'; pass "
      "on_bad_image='skip' to leave bad images out)"
  )
  with caplog.at_level(logging.WARNING):
    split = load_from(tmp_path, root, on_bad_image="skip")
  assert sorted(split.captions) == ["dried fish", "raw fish"]
  assert any(
      r.getMessage().startswith(f"{bad}: unreadable or truncated")
      and r.getMessage().endswith("; skipped (on_bad_image='skip')")
      for r in caplog.records
  )
  # a strict load never reuses the build that skipped the bad image
  with pytest.raises(image_files.BadImageError):
    load_from(tmp_path, root)


def test_symlinks_out_of_the_dataset_are_refused(tmp_path):
  outside = tmp_path / "outside"
  fixtures.write_jpeg(str(outside / "x.jpg"), (1, 2, 3))
  root = small_root(tmp_path)
  os.symlink(outside, root / "images" / "wet fish")
  assert load_error(tmp_path, root) == (
      f"{root / 'images'}: image path 'images/wet fish' escapes the dataset "
      f"folder {root} (through '..' or a symlink); refused"
  )
  os.remove(root / "images" / "wet fish")
  os.symlink(outside / "x.jpg", root / "images" / "raw fish" / "y.jpg")
  assert (
      f"{root / 'images' / 'raw fish'}: image path 'images/raw fish/y.jpg' "
      "escapes the dataset folder"
  ) in load_error(tmp_path, root)


def test_bad_folder_name_and_options(tmp_path):
  root = small_root(tmp_path)
  fixtures.write_jpeg(
      str(root / "images" / "very old car" / "a.jpg"), (1, 2, 3)
  )
  assert (
      f"{root / 'images' / 'very old car'}: a class folder must be named "
      "'<adjective> <noun>'"
  ) in load_error(tmp_path, root)
  os.rename(root / "images" / "very old car", root / "images" / "gold car")
  (root / "images" / "gold car" / "notes.txt").write_text("x")
  assert (
      f"{root / 'images' / 'gold car' / 'notes.txt'}: not a .jpg file"
  ) in load_error(tmp_path, root)
  assert "on_bad_image: got 'ignore'" in load_error(
      tmp_path, root, on_bad_image="ignore"
  )
  assert "image_size: got 0" in load_error(tmp_path, root, image_size=0)


def test_prepared_data_needs_no_dataset_folder(tmp_path):
  root = small_root(tmp_path)
  first = load_from(tmp_path, root, image_size=8)
  pixels = first.images(np.arange(2))
  shutil.rmtree(root)
  again = load_from(tmp_path, root, image_size=8)
  assert again.captions == first.captions and again.paths == first.paths
  np.testing.assert_array_equal(again.images(np.arange(2)), pixels)
  # crops larger than the stored 256 need a larger stored copy: a new build
  assert "mit_states: missing dataset" in load_error(
      tmp_path, root, FileNotFoundError, image_size=300
  )
