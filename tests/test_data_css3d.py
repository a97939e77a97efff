"""Tests of the published-CSS loader `css3d` on a small file of its format."""

from __future__ import annotations

import io
import logging
import os
import pickle

import numpy as np
import pytest

from irtf_jax import data
from irtf_jax.data import css3d
from irtf_jax.data import css_synth
from irtf_jax.data import fixtures
from irtf_jax.data import safe_pickle


def _obj(shape, color, size, y, x, as_array=False):
  pos = np.array([y, x]) if as_array else (y, x)
  return {"shape": shape, "color": color, "size": size, "pos": pos}


def css_dict():
  """A small dict in the CSS `.npy` format: duplicate labels, several mods."""
  train_objects = [
      [_obj("circle", "red", "small", 0.2, 0.2)],
      [_obj("circle", "red", "large", 0.2, 0.2)],
      [_obj("circle", "blue", "small", 0.2, 0.2, as_array=True)],
      [_obj("circle", "red", "large", 0.2, 0.2)],  # Looks like image 1.
      [],
      [_obj("triangle", "gray", "small", 0.8, 0.5)],
  ]
  test_objects = [
      [_obj("rectangle", "green", "large", 0.5, 0.5)],
      [_obj("rectangle", "green", "small", 0.5, 0.5)],
      [_obj("rectangle", "green", "large", 0.5, 0.5)],  # Looks like image 0.
      [],
      [
          _obj("rectangle", "cyan", "large", 0.5, 0.5),
          _obj("circle", "yellow", "small", 0.2, 0.8),
      ],
  ]
  return {
      "train": {
          "objects_img": train_objects,
          "labels": np.array([0, 1, 2, 1, 3, 4]),
          "mods": [
              {"from": [0, 2], "to": [1, 1], "to_str": "make red circle large"},
              {"from": [0], "to": [2], "to_str": "make red circle blue"},
              {"from": [0, 1, 5], "to": [4, 4, 4], "to_str": "remove object"},
              {
                  "from": np.array([2]),
                  "to": np.array([0]),
                  "to_str": "make blue circle red",
              },
          ],
      },
      "test": {
          "objects_img": test_objects,
          "labels": [10, 11, 10, 12, 13],
          "mods": [
              {
                  "from": [0, 2],
                  "to": [1, 1],
                  "to_str": "make large green rectangle small",
              },
              {"from": [1], "to": [0], "to_str": "make green rectangle large"},
              {"from": [0, 1, 4], "to": [3, 3, 3], "to_str": "remove object"},
          ],
      },
  }


def image_pixels(split, index):
  """A distinct picture per file (equal labels need not mean equal pixels)."""
  rng = np.random.default_rng([("train", "test").index(split), index])
  return rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


def write_css(root, css=None, *, with_images=True):
  """`fixtures.write_css3d` of `css_dict()` (or `css`) with `image_pixels`."""
  return fixtures.write_css3d(
      root,
      css_dict() if css is None else css,
      with_images=with_images,
      image_pixels=image_pixels,
  )


def tirg_triples(entry):
  """TIRG's test queries, computed here from the raw dict."""
  labels = entry["labels"]
  return [
      (str(labels[f]), mod["to_str"], str(labels[t]))
      for mod in entry["mods"]
      for f, t in zip(mod["from"], mod["to"])
  ]


@pytest.fixture(scope="module")
def css_root(tmp_path_factory):
  return write_css(tmp_path_factory.mktemp("css"))


@pytest.fixture(scope="module")
def splits(css_root, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("prepared"))
  return {
      split: data.load("css3d", split, data_dir=data_dir, manual_dir=css_root)
      for split in ("train", "test")
  }


@pytest.mark.parametrize("split", ["train", "test"])
def test_queries_are_tirg_pairs_of_every_mod(splits, split):
  entry = css_dict()[split]
  s = splits[split]
  assert len(s.queries) == sum(len(m["from"]) for m in entry["mods"])
  assert [
      (s.captions[q.source_index], q.text, q.target_caption) for q in s.queries
  ] == tirg_triples(entry)
  assert [q.source_index for q in s.queries] == [
      int(f) for m in entry["mods"] for f in m["from"]
  ]
  assert [q.target_index for q in s.queries] == [
      int(t) for m in entry["mods"] for t in m["to"]
  ]
  assert s.vocabulary_texts == [m["to_str"] for m in entry["mods"]]


@pytest.mark.parametrize("split", ["train", "test"])
def test_gallery_is_every_image_with_its_label_caption(splits, split):
  entry = css_dict()[split]
  s = splits[split]
  assert s.captions == [str(label) for label in entry["labels"]]
  np.testing.assert_array_equal(s.gallery, np.arange(len(entry["labels"])))
  for i in range(len(s)):
    np.testing.assert_array_equal(s.image(i), image_pixels(split, i))
  assert s.objects == [
      [{**o, "pos": [float(o["pos"][0]), float(o["pos"][1])]} for o in objs]
      for objs in entry["objects_img"]
  ]


def test_hits_are_decided_by_caption(splits):
  s = splits["test"]
  labels = css_dict()["test"]["labels"]
  for q in s.queries:
    hits = [i for i, c in enumerate(s.captions) if c == q.target_caption]
    assert hits == [
        i for i, label in enumerate(labels) if label == labels[q.target_index]
    ]
  # Query 2 (image 1, "make green rectangle large") wants label 10, which
  # images 0 and 2 both carry: either one is a hit.
  q = s.queries[2]
  assert (q.source_index, q.text) == (1, "make green rectangle large")
  assert [i for i, c in enumerate(s.captions) if c == q.target_caption] == [
      0,
      2,
  ]


def test_sampler_pairs_two_mods_of_one_source(splits):
  s = splits["train"]
  entry = css_dict()["train"]
  valid = {
      (int(f), m["to_str"], int(t))
      for m in entry["mods"]
      for f, t in zip(m["from"], m["to"])
  }
  first_sources = set()
  for step in range(60):
    batch = s.sample_training_queries(seed=2, step=step, batch_size=4)
    assert batch == s.sample_training_queries(seed=2, step=step, batch_size=4)
    for q in batch:
      assert (q.source_index, q.text, q.target_index) in valid
    for first, second in (batch[:2], batch[2:]):
      assert first.source_index == second.source_index
      assert first.text != second.text
      first_sources.add(first.source_index)
  # Images 1 and 5 are the source of one mod only: never sampled. Images 0
  # and 2 (three and two mods) are.
  assert first_sources == {0, 2}


def test_2d_renderer_draws_objects(css_root, tmp_path):
  s = data.load(
      "css3d",
      "train",
      data_dir=str(tmp_path),
      manual_dir=css_root,
      renderer="2d",
  )
  for i, objects in enumerate(css_dict()["train"]["objects_img"]):
    np.testing.assert_array_equal(s.image(i), css_synth.render_scene(objects))
  np.testing.assert_array_equal(s.image(4), np.full((64, 64, 3), 255))
  # Small red circle (CSS's diamond) at y = x = 12.8: column 12 is red in
  # rows 9..16; row 8 starts at column int(13.6) and ends before 12.
  np.testing.assert_array_equal(
      s.image(0)[9:17, 12], np.tile((244, 35, 35), (8, 1))
  )
  np.testing.assert_array_equal(s.image(0)[8, 12], (255, 255, 255))


def test_without_labels_every_image_is_its_own_caption(tmp_path):
  css = css_dict()
  del css["test"]["labels"]
  root = write_css(tmp_path / "css", css)
  s = data.load(
      "css3d", "test", data_dir=str(tmp_path / "prepared"), manual_dir=root
  )
  assert s.captions == ["0", "1", "2", "3", "4"]
  assert s.queries[1].target_caption == "1"


def test_truncated_png_fails_with_its_path_or_is_skipped(tmp_path, caplog):
  root = write_css(tmp_path / "css")
  broken = css3d.image_path(root, "test", 1)
  with open(broken, "rb") as f:
    head = f.read(40)
  with open(broken, "wb") as f:
    f.write(head)
  with pytest.raises(ValueError) as error:
    data.load("css3d", "test", data_dir=str(tmp_path / "a"), manual_dir=root)
  assert str(error.value).startswith(f"{broken}: unreadable or truncated")
  assert "skip_unreadable_images=True" in str(error.value)
  with caplog.at_level(logging.WARNING):
    s = data.load(
        "css3d",
        "test",
        data_dir=str(tmp_path / "b"),
        manual_dir=root,
        skip_unreadable_images=True,
    )
  assert f"skipping {broken}: unreadable or truncated" in caplog.text
  # Image 1 is gone; the pairs using it are dropped, the others renumbered.
  entry = css_dict()["test"]
  kept = [i for i in range(5) if i != 1]
  assert s.captions == [str(entry["labels"][i]) for i in kept]
  labels = entry["labels"]
  expected = [
      (str(labels[f]), m["to_str"], str(labels[t]))
      for m in entry["mods"]
      for f, t in zip(m["from"], m["to"])
      if 1 not in (f, t)
  ]
  assert [
      (s.captions[q.source_index], q.text, q.target_caption) for q in s.queries
  ] == expected
  assert [(q.source_index, q.target_index) for q in s.queries] == [
      (0, 2),
      (3, 2),
  ]
  for new, old in enumerate(kept):
    np.testing.assert_array_equal(s.image(new), image_pixels("test", old))


def test_missing_png_names_its_path(tmp_path):
  root = write_css(tmp_path / "css")
  missing = css3d.image_path(root, "train", 3)
  os.remove(missing)
  with pytest.raises(
      ValueError,
      match=f"^{missing}: missing image; pass skip_unreadable_images=True",
  ):
    data.load("css3d", "train", data_dir=str(tmp_path / "p"), manual_dir=root)


def test_missing_manual_dir_npy_or_images_print_instructions(tmp_path):
  instructions = "Download the CSS dataset released with TIRG"
  with pytest.raises(FileNotFoundError) as error:
    data.load(
        "css3d",
        "test",
        data_dir=str(tmp_path / "p"),
        manual_dir=str(tmp_path / "nowhere"),
    )
  assert f"manual_dir {tmp_path / 'nowhere'} does not exist" in str(error.value)
  assert instructions in str(error.value)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as error:
    data.load(
        "css3d", "test", data_dir=str(tmp_path / "p"), manual_dir=str(empty)
    )
  assert f"{empty / css3d.NPY_NAME} does not exist" in str(error.value)
  assert instructions in str(error.value)
  root = write_css(tmp_path / "no_images", with_images=False)
  with pytest.raises(
      FileNotFoundError, match="image folder .*no_images/images does not exist"
  ):
    data.load("css3d", "test", data_dir=str(tmp_path / "p"), manual_dir=root)
  with pytest.raises(FileNotFoundError) as error:
    data.load("css3d", "test", data_dir=str(tmp_path / "p"), manual_dir=None)
  assert "manual_dir" in str(error.value)
  assert instructions in str(error.value)


class _Exploit:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
  marker = tmp_path / "marker"
  root = tmp_path / "css"
  root.mkdir()
  payload = css_dict()
  payload["train"]["labels"] = _Exploit(marker)
  np.save(
      root / css3d.NPY_NAME, np.array(payload, dtype=object), allow_pickle=True
  )
  (root / "images").mkdir()
  with pytest.raises(
      safe_pickle.UnsafePickleError,
      match=r"css_toy_dataset_novel2_small\.dup\.npy: refused "
      r"to load: the pickle asks for posix\.system",
  ):
    data.load(
        "css3d", "train", data_dir=str(tmp_path / "p"), manual_dir=str(root)
    )
  assert not marker.exists()
  # The same file through NumPy's own loader does run the command: the
  # fixture is a real exploit.
  np.load(root / css3d.NPY_NAME, allow_pickle=True)
  assert marker.exists()


def test_safe_loader_reads_what_numpy_writes(tmp_path):
  path = tmp_path / "x.npy"
  np.save(path, css_dict(), allow_pickle=True)
  loaded = safe_pickle.load_npy_object(path)
  assert loaded["test"]["mods"] == css_dict()["test"]["mods"]
  np.testing.assert_array_equal(loaded["train"]["labels"], [0, 1, 2, 1, 3, 4])
  np.save(path, np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(
      safe_pickle.load_npy_object(path), np.arange(6.0).reshape(2, 3)
  )
  (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
  with pytest.raises(ValueError, match="bad.npy: not a .npy file"):
    safe_pickle.load_npy_object(tmp_path / "bad.npy")
  with pytest.raises(safe_pickle.UnsafePickleError, match="builtins.eval"):
    safe_pickle.safe_loads(b"cbuiltins\neval\n(S'1'\ntR.", source="p")


def test_safe_loader_reads_python2_era_pickles(tmp_path):
  """Protocol 2 with NumPy 1 module names, as the published file was written."""
  css = css_dict()
  css["train"]["tags"] = {"a", "b"}  # A set: "__builtin__ set" in protocol 2.
  css["train"]["scale"] = np.float32(0.5)  # NumPy scalar reconstructor.
  array = np.empty((), dtype=object)
  array[()] = css
  payload = pickle.dumps(array, protocol=2)
  assert b"c__builtin__\nset" in payload
  payload = payload.replace(
      b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
  )
  assert b"cnumpy.core.multiarray\n_reconstruct" in payload
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": "|O", "fortran_order": False, "shape": ()}
  )
  path = tmp_path / "py2.npy"
  path.write_bytes(header.getvalue() + payload)
  loaded = safe_pickle.load_npy_object(path)
  assert loaded["train"]["tags"] == {"a", "b"}
  assert loaded["train"]["scale"] == np.float32(0.5)
  assert loaded["train"]["scale"].dtype == np.float32
  assert loaded["test"]["mods"] == css["test"]["mods"]
  np.testing.assert_array_equal(
      loaded["train"]["objects_img"][2][0]["pos"], [0.2, 0.2]
  )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["test"]["mods"][1].update({"to": [0, 2]}),
            r"test mods\[1\]: 'from' has 1 entries but 'to' has 2",
        ),
        (
            lambda c: c["test"]["mods"][2].update({"to": [3, 3, 9]}),
            r"test mods\[2\] 'to': index 9 is not an image index in \[0, 5\)",
        ),
        (
            lambda c: c["train"]["mods"][0].pop("to_str"),
            r"train mods\[0\]: missing 'to_str'",
        ),
        (
            lambda c: c["test"].update({"labels": [1, 2]}),
            "test labels: 2 labels for 5 images",
        ),
        (
            lambda c: c["train"]["objects_img"][5][0].pop("pos"),
            r"train objects_img\[5\]\[0\]: object lacks key 'pos'",
        ),
        (lambda c: c.pop("test"), r"no 'test' entry \(found \['train'\]\)"),
        (
            lambda c: c["test"]["objects_img"][4][1].update({"pos": "left"}),
            r"test objects_img\[4\]\[1\]: pos must hold \(y, x\), got 'left'",
        ),
    ],
)
def test_malformed_file_errors_name_the_field(tmp_path, mutate, message):
  css = css_dict()
  mutate(css)
  root = write_css(tmp_path / "css", css, with_images=False)
  with pytest.raises(ValueError, match=f"{css3d.NPY_NAME}: {message}"):
    data.load(
        "css3d",
        "test",
        data_dir=str(tmp_path / "p"),
        manual_dir=root,
        renderer="2d",
    )


def test_bad_options_are_named(tmp_path):
  with pytest.raises(
      ValueError,
      match=(
          "^config.data.options.renderer: got "
          "'3d'; css3d needs one of 'png', '2d'$"
      ),
  ):
    data.load("css3d", "test", data_dir=str(tmp_path), renderer="3d")
  with pytest.raises(
      ValueError,
      match=(
          "^config.data.options.skip_unreadable_"
          "images: got 'yes'; css3d needs True or False$"
      ),
  ):
    data.load(
        "css3d", "test", data_dir=str(tmp_path), skip_unreadable_images="yes"
    )
