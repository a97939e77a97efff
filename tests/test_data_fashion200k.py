"""Fashion200k loader: TIRG's protocol on a small fixture in the exact on-disk format."""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import pytest

from irtf_jax.data import fashion200k
from irtf_jax.data import fixtures
from irtf_jax.data import image_files
from tests import helpers

D = "women/dresses/casual_and_day_dresses"
S = "women/skirts/mini"
T = "women/tops/blouses"
LABELS = {
    "dress_train_detect_all.txt": [
        (f"{D}/1/1_0.jpeg", "black midi dress"),
        (f"{D}/1/1_1.jpeg", "black midi dress "),  # duplicate caption
        (f"{D}/2/2_0.jpeg", "blue midi dress"),
        (f"{D}/3/3_0.jpeg", "red midi dress"),
        (f"{D}/4/4_0.jpeg", "black maxi dress"),
        (f"{D}/5/5_0.jpeg", "long sleeve lace dress"),
        (f"{D}/6/6_0.jpeg", "midi black dress"),
        (f"{D}/7/7_0.jpeg", " black & white dress."),
    ],
    "skirt_train_detect_all.txt": [
        (f"{S}/8/8_0.jpeg", "pleated mini skirt"),
        (f"{S}/9/9_0.jpeg", "pleated midi skirt"),
        (f"{S}/10/10_0.jpeg", "skirt"),
        (f"{S}/11/11_0.jpeg", "dress"),
    ],
    "dress_test_detect_all.txt": [
        (f"{D}/t1/a.jpeg", "white lace dress"),
        (f"{D}/t2/b.jpeg", "white silk dress"),
        (f"{D}/t3/c.jpeg", "white lace dress"),
        (f"{D}/t4/d.jpeg", "pink satin gown?"),
    ],
    "top_test_detect_all.txt": [
        (f"{T}/t5/e.jpeg", "striped cotton top"),
        (f"{T}/t6/f.jpeg", "striped linen top*"),
        (f"{T}/t7/g.jpeg", "cotton striped top"),
    ],
}
TEST_QUERIES = [
    (f"{D}/t1/a.jpeg", f"{D}/t2/b.jpeg"),
    (f"{D}/t2/b.jpeg", f"{D}/t3/c.jpeg"),
    (f"{T}/t5/e.jpeg", f"{T}/t6/f.jpeg"),
    (f"{T}/t5/e.jpeg", f"{T}/t7/g.jpeg"),
    (f"{D}/t1/a.jpeg", f"{D}/t4/d.jpeg"),
]
# Worked out by hand from TIRG's rules: the first source word missing from the
# target, the first target word missing from the source, else the last word.
EXPECTED_TEST_TRIPLES = [
    ("white lace dress", "replace lace with silk", "white silk dress"),
    ("white silk dress", "replace silk with lace", "white lace dress"),
    (
        "striped cotton top",
        "replace cotton with linen",
        "striped linen topstarmark",
    ),
    ("striped cotton top", "replace top with top", "cotton striped top"),
    (
        "white lace dress",
        "replace white with pink",
        "pink satin gownquestionmark",
    ),
]
# Training captions that differ in exactly one word (by hand, both ways).
# "midi black dress" is "black midi dress" reordered: not a pair.
ONE_WORD_PAIRS = {
    ("black midi dress", "blue midi dress"),
    ("black midi dress", "red midi dress"),
    ("blue midi dress", "red midi dress"),
    ("black midi dress", "black maxi dress"),
    ("midi black dress", "blue midi dress"),
    ("midi black dress", "red midi dress"),
    ("midi black dress", "black maxi dress"),
    ("pleated mini skirt", "pleated midi skirt"),
    ("skirt", "dress"),
}
ONE_WORD_PAIRS |= {(b, a) for a, b in ONE_WORD_PAIRS}


def write_fixture(root, labels=None, test_queries=None):
  fixtures.write_fashion200k(
      str(root),
      labels or LABELS,
      TEST_QUERIES if test_queries is None else test_queries,
  )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return helpers.prepared_dataset(
      tmp_path_factory, "fashion200k", write_fixture
  )


def tirg_text(source_caption, target_caption):
  """TIRG's word rule, written independently: loops that keep the last word."""
  source, target = source_caption.split(), target_caption.split()
  for source_word in source:
    if source_word not in target:
      break
  for target_word in target:
    if target_word not in source:
      break
  return "replace " + source_word + " with " + target_word


def test_captions_cleaned_and_split_from_label_files(dataset):
  train, test = dataset["train"], dataset["test"]
  assert len(train.captions) == 12 and len(test.captions) == 7
  assert "black andmark white dressdotmark" in train.captions
  assert train.captions.count("black midi dress") == 2
  for split, names in (
      (train, ("dress_train", "skirt_train")),
      (test, ("dress_test", "top_test")),
  ):
    expected = [p for n in names for p, _ in LABELS[n + "_detect_all.txt"]]
    assert split.paths == expected  # label files in sorted order
  assert test.captions[3] == "pink satin gownquestionmark"


def test_test_queries_follow_tirg(dataset):
  test = dataset["test"]
  got = [
      (test.captions[q.source_index], q.text, q.target_caption)
      for q in test.queries
  ]
  assert got == EXPECTED_TEST_TRIPLES
  for q, (source, target) in zip(test.queries, TEST_QUERIES):
    assert test.paths[q.source_index] == source
    assert test.paths[q.target_index] == target
    assert q.text == tirg_text(test.captions[q.source_index], q.target_caption)
  np.testing.assert_array_equal(test.gallery, np.arange(7))
  np.testing.assert_array_equal(
      test.exclude_columns, [q.source_index for q in test.queries]
  )


def test_hits_are_by_caption(dataset):
  test = dataset["test"]
  hits = [
      [i for i in test.gallery if test.captions[i] == q.target_caption]
      for q in test.queries
  ]
  # "white lace dress" is the caption of a.jpeg and c.jpeg: both are hits
  assert hits[1] == [0, 2]
  assert hits[0] == [1] and hits[2] == [5] and hits[3] == [6]


def test_complete_text_uses_the_target_caption(dataset):
  test = dataset["load"]("test", complete_text=True)
  assert [q.text for q in test.queries] == [
      t for _, _, t in EXPECTED_TEST_TRIPLES
  ]


def differ_in_one_word(a, b):
  a, b = a.split(), b.split()
  if len(a) != len(b) or sorted(a) == sorted(b):
    return False
  return any(
      a[:i] + a[i + 1 :] == b[:j] + b[j + 1 :]
      for i in range(len(a))
      for j in range(len(b))
  )


def test_one_word_pairs_by_brute_force():
  captions = {c for pair in ONE_WORD_PAIRS for c in pair} | {
      "long sleeve lace dress",
      "black andmark white dressdotmark",
  }
  brute = {
      (a, b)
      for a in captions
      for b in captions
      if a != b and differ_in_one_word(a, b)
  }
  assert brute == ONE_WORD_PAIRS


def test_training_sampler_pairs_one_word_captions(dataset):
  train = dataset["train"]
  queries = [
      q
      for step in range(8)
      for q in train.sample_training_queries(seed=5, step=step, batch_size=32)
  ]
  seen = set()
  for q in queries:
    source = train.captions[q.source_index]
    assert q.target_caption == train.captions[q.target_index]
    assert (source, q.target_caption) in ONE_WORD_PAIRS
    assert q.text == tirg_text(source, q.target_caption)
    seen.add((source, q.target_caption))
  assert seen == ONE_WORD_PAIRS  # every pair is reachable, nothing else
  for first, second in zip(queries[0::2], queries[1::2]):
    assert first.source_index == second.source_index
    targets = {
        b for a, b in ONE_WORD_PAIRS if a == train.captions[first.source_index]
    }
    if len(targets) > 1:
      assert first.target_caption != second.target_caption
  assert train.sample_training_queries(5, 3, 32) == queries[96:128]
  assert train.sample_training_queries(6, 3, 32) != queries[96:128]


def test_train_recall_queries(dataset):
  train = dataset["train"]
  assert len(train.queries) == 12  # fewer images than 10,000
  np.testing.assert_array_equal(
      train.gallery, [q.target_index for q in train.queries]
  )
  np.testing.assert_array_equal(train.exclude_columns, -1)
  for q in train.queries:
    assert (train.captions[q.source_index], q.target_caption) in ONE_WORD_PAIRS
  assert dataset["load"]("train").queries == train.queries
  assert "replace with" in train.vocabulary_texts


def test_images(dataset):
  test = dataset["test"]
  images = test.images(np.array([0, 6, 0]))
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[0], images[2])
  assert test.images(np.zeros((0,), np.int64)).shape == (0, 16, 16, 3)
  # write_jpeg colours each new image (29 * k % 256, 100, 200); k counts the
  # images written before it (12 training images, then the test ones)
  for image, index in zip(images, (0, 6)):
    expected = np.array([(29 * (12 + index)) % 256, 100, 200])
    lower_right = image[10:, 10:].reshape(-1, 3).mean(0)  # not darkened
    assert np.abs(lower_right - expected).max() < 8


load_from = functools.partial(helpers.load_from, "fashion200k")
load_error = functools.partial(helpers.load_error, "fashion200k")


def edited_labels(name, index, line):
  labels = {k: list(v) for k, v in LABELS.items()}
  labels[name][index] = line
  return labels


def test_malformed_label_lines(tmp_path):
  root = tmp_path / "f"
  write_fixture(root)
  label = root / "labels" / "skirt_train_detect_all.txt"
  lines = label.read_text().splitlines()
  label.write_text(
      "\n".join(lines[:2] + ["women/x.jpeg\tblue skirt"] + lines[2:]) + "\n"
  )
  message = load_error(tmp_path, root)
  assert message == (
      f"{label}:3: expected 3 tab-separated fields (image path, detection "
      "score, caption), got 2; fix or remove the line"
  )
  label.write_text(
      "\n".join(lines[:3] + ["women/x.jpeg\thigh\tblue skirt"]) + "\n"
  )
  assert f"{label}:4: detection score 'high' is not a number" in load_error(
      tmp_path, root
  )
  label.write_bytes(
      "\n".join(lines[:1]).encode() + b"\nwomen/x.jpeg\t0.5\tcaf\xe9 skirt\n"
  )
  assert (
      f"{label}:2: not UTF-8 text (invalid continuation byte at byte 20); "
      "save the file as UTF-8"
  ) in load_error(tmp_path, root)


@pytest.mark.parametrize(
    "bad_path, reason",
    [
        ("../outside.jpeg", "escapes the dataset folder"),
        ("women/../../outside.jpeg", "escapes the dataset folder"),
        ("/etc/hostname", "is not a relative path inside the dataset folder"),
    ],
)
def test_label_paths_must_stay_inside(tmp_path, bad_path, reason):
  root = tmp_path / "f"
  write_fixture(root)
  label = root / "labels" / "dress_test_detect_all.txt"
  lines = label.read_text().splitlines()
  lines[1] = f"{bad_path}\t0.9\tred dress"
  label.write_text("\n".join(lines) + "\n")
  message = load_error(tmp_path, root)
  assert message.startswith(f"{label}:2: image path {bad_path!r} ")
  assert reason in message


def test_symlinked_image_out_of_the_dataset_is_refused(tmp_path):
  root = tmp_path / "f"
  write_fixture(root)
  fixtures.write_jpeg(str(tmp_path / "outside.jpeg"), (1, 2, 3))
  os.symlink(tmp_path / "outside.jpeg", root / D / "link.jpeg")
  label = root / "labels" / "dress_train_detect_all.txt"
  label.write_text(label.read_text() + f"{D}/link.jpeg\t0.5\tred dress\n")
  assert (
      f"{label}:9: image path '{D}/link.jpeg' escapes the dataset folder"
      in load_error(tmp_path, root)
  )


def test_bad_test_queries(tmp_path):
  root = tmp_path / "f"
  queries_file = root / "test_queries.txt"
  write_fixture(
      root,
      test_queries=TEST_QUERIES[:2]
      + [("../../etc/passwd", TEST_QUERIES[0][1])],
  )
  message = load_error(tmp_path, root)
  assert message.startswith(
      f"{queries_file}:3: image path '../../etc/passwd' escapes"
  )
  write_fixture(root, test_queries=[(f"{D}/1/1_0.jpeg", TEST_QUERIES[0][1])])
  message = load_error(tmp_path, root)
  assert message == (
      f"{queries_file}:1: {D}/1/1_0.jpeg is not an image of the test label "
      "files (labels/*_test_detect_all.txt)"
  )
  queries_file.write_text(f"{TEST_QUERIES[0][0]}\n")
  assert (
      f"{queries_file}:1: expected '<source path> <target path>', got 1"
      in load_error(tmp_path, root)
  )


def test_missing_files_print_instructions(tmp_path):
  with pytest.raises(
      FileNotFoundError,
      match=rf"fashion200k: missing dataset folder " rf"{tmp_path / 'none'}",
  ):
    load_from(tmp_path, tmp_path / "none")
  root = tmp_path / "f"
  write_fixture(root)
  os.remove(root / "test_queries.txt")
  message = load_error(tmp_path, root, FileNotFoundError)
  assert message.startswith(
      f"fashion200k: missing file {root / 'test_queries.txt'}. Pass the folder"
  )
  assert fashion200k.MANUAL_DOWNLOAD_INSTRUCTIONS in message
  for name in ("dress_test_detect_all.txt", "top_test_detect_all.txt"):
    os.remove(root / "labels" / name)
  assert (
      "fashion200k: missing label files "
      f"{root / 'labels' / '*_test_detect_all.txt'}"
  ) in load_error(tmp_path, root, FileNotFoundError)
  os.rename(root / "labels", root / "old_labels")
  assert (
      f"fashion200k: missing folder {root / 'labels'}. Pass the folder"
      in load_error(tmp_path, root, FileNotFoundError)
  )


def test_truncated_image_error_or_skip(tmp_path, caplog):
  root = tmp_path / "f"
  write_fixture(root)
  bad = os.path.join(root, D, "t2", "b.jpeg")
  fixtures.write_truncated_jpeg(bad)
  message = load_error(tmp_path, root, image_files.BadImageError)
  assert message.startswith(f"{bad}: unreadable or truncated image (")
  assert "pass on_bad_image='skip'" in message
  with caplog.at_level(logging.WARNING):
    test = load_from(tmp_path, root, on_bad_image="skip")
  assert f"{D}/t2/b.jpeg" not in test.paths and len(test.captions) == 6
  # the two queries that use b.jpeg are dropped, the rest are unchanged
  got = [
      (test.captions[q.source_index], q.text, q.target_caption)
      for q in test.queries
  ]
  assert got == EXPECTED_TEST_TRIPLES[2:]
  messages = [r.getMessage() for r in caplog.records]
  assert f"{bad}: unreadable or truncated image (" in "\n".join(messages)
  assert any(m.endswith("; skipped (on_bad_image='skip')") for m in messages)
  assert any("2 test queries dropped" in m for m in messages)
