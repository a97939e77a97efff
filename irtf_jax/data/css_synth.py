"""`css_synth`: a CSS-style dataset generated from a seed (no download).

The CSS dataset (Vo et al., "Composing Text and Image for Image Retrieval -
An Empirical Odyssey", CVPR 2019) shows scenes of simple objects on a 3x3 grid
and asks for modifications in words. `css_synth` regenerates data of that
design procedurally, deterministically from `seed`, rendered the way CSS's
2D renderer draws its scenes.

Scenes. Each object has a grid cell (rows top / middle / bottom x columns
left / center / right, at most one object per cell), a shape (rectangle,
circle, triangle), one of eight colors and a size (small, large). Objects are
dicts in the format of the CSS `.npy`'s `objects_img` entries:
`{"shape", "color", "size", "pos": (y, x)}` with `pos` the object's centre as
fractions of the image height and width (`GRID_FRACTIONS` per row / column).
A source scene holds 2 to 5 objects (`MIN_OBJECTS`, `MAX_OBJECTS`), a
target 1 to 6. The exact grid fractions of the published CSS are not part of
its released renderer; 0.2 / 0.5 / 0.8 keep every object inside the image
and apart from its neighbours.

Rendering (`render_scene`), as CSS's 2D renderer: a white canvas, each object
filled in its color (CSS's RGB values, `COLOR_RGB`) around its centre
(y, x) = pos * image_size with half-size s = 4 px (small) or 8 px (large) at
64x64 (scaled by image_size / 64 otherwise), rows and columns truncated with
`int` as CSS does:
  rectangle: rows [int(y-s), int(y+s)), columns [int(x-s), int(x+s));
  circle (CSS draws a diamond): rows y0 in [int(y-s), int(y+s)], columns
    [int(x0), int(2x-x0)) with x0 = x + |y0-y| - s;
  triangle: rows y0 in [int(y-s), int(y+s)), columns [int(min(x0, x1)),
    int(max(x0, x1))) with x0 = x + (y0-y+s)/2, x1 = 2x - x0.
Cell centres are 0.3 of the image apart and a large object spans 0.25, so
objects in different cells never overlap: two scenes look the same exactly
when they hold the same objects, and they then share one caption, the
canonical description of the scene (cells in reading order: "top-left small
red rectangle, middle-center large blue circle").

Modifications, in CSS's wording (a referring expression names a random
subset of an object's attributes that picks out exactly that object of the
source scene: "[cell] [size] [color] shape|object"):
  add:    "add small red rectangle to top-center" (an empty cell);
  remove: "remove red object" (the scene keeps at least one object);
  make:   "make middle-left small gray object large" (a new size, color or
          shape for the referred object).

Novel compositions. The (shape, color) pairs of `NOVEL_SHAPE_COLORS` (two
colors per shape, a quarter of all pairs) never occur in a training query:
no object of a training source or target scene has one, hence no training
text names one either. Every test query modifies an object with such a
pair: the object added, removed or changed (before or after the change) has
a held-out (shape, color). Test recall thus measures generalization to new
attribute compositions rather than memorization.

Splits and protocol (TIRG's for CSS). Each split is generated independently:
`num_*_scenes` source scenes with `mods_per_scene` modifications each (distinct
texts, distinct targets); the gallery is every distinct scene among sources and
targets. A "mod" is one text with all its (from, to) image pairs, as in the
CSS file. `queries` are every (from, to) pair of every mod (test split: the
test protocol; train split: the queries of train-split recall, Ms of WHM);
`vocabulary_texts` are the split's mod texts (build the word vocabulary from
the train split's); `sample_training_queries` draws
a mod and one of its pairs, then a second, different mod of the same source
image, so consecutive queries share their source.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from irtf_jax import data
from irtf_jax.data import base
from irtf_jax.data import storage
from irtf_jax.data.base import Query

SHAPES = ("rectangle", "circle", "triangle")
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
# Cell names in reading order: "top-left", "top-center", ..., "bottom-right".
POSITIONS = tuple(f"{row}-{column}" for row in ROWS for column in COLUMNS)
# Centre of row / column i as a fraction of the image height / width.
GRID_FRACTIONS = (0.2, 0.5, 0.8)
POSITION_COORDS = {
    f"{row}-{column}": (GRID_FRACTIONS[i], GRID_FRACTIONS[j])
    for i, row in enumerate(ROWS) for j, column in enumerate(COLUMNS)}
# CSS's 2D renderer colors.
COLOR_RGB = {
    "gray": (87, 87, 87),
    "red": (244, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 205, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
# Half the side of an object, in pixels of a 64x64 image.
HALF_SIZES = {"small": 4.0, "large": 8.0}
# (shape, color) pairs held out of every training query (see module doc).
NOVEL_SHAPE_COLORS = frozenset({
    ("rectangle", "gray"), ("rectangle", "brown"),
    ("circle", "red"), ("circle", "purple"),
    ("triangle", "blue"), ("triangle", "cyan"),
})
MIN_OBJECTS, MAX_OBJECTS = 2, 5
_REFERRING_ATTRIBUTES = ("pos", "size", "color", "shape")


# ----------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=4096)
def _shape_cells(shape: str, half: float, y: float, x: float,
                 image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and column indices that `shape` covers (CSS's rules, see module)."""
  spans = []  # (row, first column, end column)
  if shape == "rectangle":
    for row in range(int(y - half), int(y + half)):
      spans.append((row, int(x - half), int(x + half)))
  elif shape == "circle":
    for row in range(int(y - half), int(y + half) + 1):
      x0 = x + (abs(row - y) - half)
      spans.append((row, int(x0), int(2 * x - x0)))
  elif shape == "triangle":
    for row in range(int(y - half), int(y + half)):
      x0 = x + (row - y + half) / 2
      x1 = 2 * x - x0
      spans.append((row, int(min(x0, x1)), int(max(x0, x1))))
  else:
    raise ValueError(f"object shape {shape!r} is not one of {SHAPES}")
  rows, columns = [], []
  for row, start, end in spans:
    if not 0 <= row < image_size:
      continue
    start, end = max(start, 0), min(end, image_size)
    rows.extend([row] * max(end - start, 0))
    columns.extend(range(start, end))
  return np.asarray(rows, np.int64), np.asarray(columns, np.int64)


def render_scene(objects: Sequence[Mapping[str, Any]],
                 image_size: int = 64) -> np.ndarray:
  """Draws a scene the way CSS's 2D renderer does.

  Args:
    objects: dicts with keys shape, color, size and pos = (y, x) fractions of
      the image (the CSS `.npy`'s `objects_img` format); later objects are
      drawn over earlier ones. Parts outside the canvas are clipped.
    image_size: side of the square image in pixels; object sizes scale with
      image_size / 64 (CSS renders 64x64).

  Returns:
    uint8 array (image_size, image_size, 3): a white canvas with the objects.
  """
  image = np.full((image_size, image_size, 3), 255, np.uint8)
  for obj in objects:
    try:
      color = COLOR_RGB[obj["color"]]
      half = HALF_SIZES[obj["size"]] * image_size / 64
    except KeyError as e:
      raise ValueError(f"object {dict(obj)!r}: unknown {e}; colors are "
                       f"{COLORS}, sizes {SIZES}") from None
    y = float(obj["pos"][0]) * image_size
    x = float(obj["pos"][1]) * image_size
    rows, columns = _shape_cells(obj["shape"], half, y, x, image_size)
    image[rows, columns] = color
  return image


# -------------------------------------------------------------- scene model


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
  """One object of a generated scene (`position` is a `POSITIONS` name)."""
  position: str
  size: str
  color: str
  shape: str

  def as_css_dict(self) -> dict[str, Any]:
    """The object in the CSS `objects_img` format."""
    return {"shape": self.shape, "color": self.color, "size": self.size,
            "pos": POSITION_COORDS[self.position]}

  def describe(self) -> str:
    return f"{self.position} {self.size} {self.color} {self.shape}"


Scene = tuple  # tuple[SceneObject, ...] in `POSITIONS` order.


def canonical_scene(objects) -> Scene:
  return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


def scene_caption(scene: Scene) -> str:
  """The canonical description of a scene: the label that decides a hit."""
  return ", ".join(o.describe() for o in canonical_scene(scene))


def scene_objects(scene: Scene) -> list[dict[str, Any]]:
  return [o.as_css_dict() for o in scene]


def _referring_expression(obj: SceneObject, attributes: Sequence[str]) -> str:
  words = [obj.position] if "pos" in attributes else []
  words += [getattr(obj, a) for a in ("size", "color") if a in attributes]
  words.append(obj.shape if "shape" in attributes else "object")
  return " ".join(words)


def _matching_attributes(obj: SceneObject, other: SceneObject) -> int:
  """Bit i is set where `other` shares `_REFERRING_ATTRIBUTES[i]` with `obj`."""
  return ((obj.position == other.position) | (obj.size == other.size) << 1
          | (obj.color == other.color) << 2 | (obj.shape == other.shape) << 3)


# Every non-empty subset of `_REFERRING_ATTRIBUTES`, as (attributes, bitmask).
_ATTRIBUTE_SUBSETS = tuple(
    (subset, sum(1 << _REFERRING_ATTRIBUTES.index(a) for a in subset))
    for n in range(1, 5)
    for subset in itertools.combinations(_REFERRING_ATTRIBUTES, n))


def _sample_reference(rng: np.random.Generator, scene: Scene,
                      obj: SceneObject) -> str:
  """A referring expression that picks out exactly `obj` in `scene`.

  Drawn uniformly among the attribute subsets that no other object of the
  scene shares entirely (the cell alone always qualifies).
  """
  others = [_matching_attributes(obj, o) for o in scene if o != obj]
  unique = [subset for subset, bits in _ATTRIBUTE_SUBSETS
            if all(m & bits != bits for m in others)]
  return _referring_expression(obj, unique[rng.integers(len(unique))])


@dataclasses.dataclass(frozen=True)
class _Modification:
  text: str
  target: Scene
  changed: tuple  # the objects added, removed or changed (before and after).


def _sample_modification(rng: np.random.Generator,
                         scene: Scene) -> _Modification | None:
  """One random add / remove / make modification of `scene` (None: n/a)."""
  kind = ("add", "remove", "make")[rng.integers(3)]
  if kind == "add":
    free = [p for p in POSITIONS if p not in {o.position for o in scene}]
    if not free:
      return None
    new = SceneObject(free[rng.integers(len(free))],
                      SIZES[rng.integers(len(SIZES))],
                      COLORS[rng.integers(len(COLORS))],
                      SHAPES[rng.integers(len(SHAPES))])
    return _Modification(
        f"add {new.size} {new.color} {new.shape} to {new.position}",
        canonical_scene(scene + (new,)), (new,))
  if kind == "remove" and len(scene) < 2:
    return None
  obj = scene[rng.integers(len(scene))]
  reference = _sample_reference(rng, scene, obj)
  rest = tuple(o for o in scene if o != obj)
  if kind == "remove":
    return _Modification(f"remove {reference}", rest, (obj,))
  attribute = ("size", "color", "shape")[rng.integers(3)]
  values = [v for v in {"size": SIZES, "color": COLORS, "shape": SHAPES}[
      attribute] if v != getattr(obj, attribute)]
  value = values[rng.integers(len(values))]
  new = dataclasses.replace(obj, **{attribute: value})
  return _Modification(f"make {reference} {value}",
                       canonical_scene(rest + (new,)), (obj, new))


def _is_novel(obj: SceneObject) -> bool:
  return (obj.shape, obj.color) in NOVEL_SHAPE_COLORS


def _sample_scene(rng: np.random.Generator, allow_novel: bool) -> Scene:
  count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  cells = rng.choice(len(POSITIONS), size=count, replace=False)
  combos = [(s, c) for s in SHAPES for c in COLORS
            if allow_novel or (s, c) not in NOVEL_SHAPE_COLORS]
  objects = []
  for cell in cells:
    shape, color = combos[rng.integers(len(combos))]
    objects.append(SceneObject(POSITIONS[cell], SIZES[rng.integers(2)],
                               color, shape))
  return canonical_scene(objects)


@dataclasses.dataclass(frozen=True)
class Mod:
  """One modification text with every (from, to) image pair it applies to."""
  text: str
  sources: tuple[int, ...]
  targets: tuple[int, ...]


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
    scene = _sample_scene(rng, allow_novel=novel)
    source = gallery_index(scene)
    texts = texts_of_source.setdefault(source, set())
    targets = targets_of_source.setdefault(source, {source})
    added = 0
    for _ in range(100 * mods_per_scene):
      if added == mods_per_scene:
        break
      mod = _sample_modification(rng, scene)
      if mod is None or mod.text in texts:
        continue
      if novel != any(map(_is_novel, mod.changed)):
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


# -------------------------------------------------------- split (both CSSs)


class CSSSplit(storage.RecordSplit):
  """A CSS split: gallery images with captions and scene objects, plus mods.

  Every image is held in memory (CSS images are tiny).

  Attributes (besides `Split`'s):
    objects: per gallery image, its objects in CSS `objects_img` format.
    mods: the split's `Mod`s (a text with all its (from, to) pairs).
  """

  def __init__(self, source, *, name: str, split: str, captions,
               objects, mods: Sequence[Mod], images: np.ndarray):
    super().__init__(source, name=name, split=split, captions=captions)
    self._images = np.asarray(images, np.uint8)
    self.objects = list(objects)
    self.mods = list(mods)
    self.queries = [
        Query(f, mod.text, self.captions[t], t)
        for mod in self.mods for f, t in zip(mod.sources, mod.targets)]
    # source -> [(mod id, pair index)]: TIRG's second-query table.
    self._pairs_of_source: dict[int, list[tuple[int, int]]] = {}
    for m, mod in enumerate(self.mods):
      for k, f in enumerate(mod.sources):
        self._pairs_of_source.setdefault(f, []).append((m, k))
    # First queries are drawn among pairs whose source has another mod.
    self._first_pairs = []
    for m, mod in enumerate(self.mods):
      eligible = [k for k, f in enumerate(mod.sources)
                  if any(m2 != m for m2, _ in self._pairs_of_source[f])]
      if eligible:
        self._first_pairs.append((m, np.asarray(eligible)))

  @property
  def vocabulary_texts(self) -> list[str]:
    return [mod.text for mod in self.mods]

  def images(self, indices: np.ndarray) -> np.ndarray:
    return self._images[np.asarray(indices, np.int64)]

  def _query(self, m: int, k: int) -> Query:
    mod = self.mods[m]
    target = mod.targets[k]
    return Query(mod.sources[k], mod.text, self.captions[target], target)

  def sample_training_queries(self, seed: int, step: int,
                              batch_size: int) -> list[Query]:
    """TIRG's CSS sampling, a pure function of (seed, step, batch_size).

    Queries 2i and 2i+1 share their source image: the first is a random mod
    (uniform) and one of its pairs (uniform), the second a uniformly drawn
    (mod, target) entry of the same source with a different mod. Sources
    with a single mod are never drawn first (TIRG would loop on them).
    """
    if not self._first_pairs:
      raise ValueError(f"{self.name}/{self.split}: no source image has two "
                       "different modifications; cannot sample TIRG's "
                       "query pairs")
    rng = base.step_rng(seed, step)
    batch = []
    while len(batch) < batch_size:
      m, eligible = self._first_pairs[rng.integers(len(self._first_pairs))]
      k = int(eligible[rng.integers(len(eligible))])
      batch.append(self._query(m, k))
      if len(batch) < batch_size:
        others = [(m2, k2) for m2, k2 in
                  self._pairs_of_source[self.mods[m].sources[k]] if m2 != m]
        batch.append(self._query(*others[rng.integers(len(others))]))
    return batch


def css_features():
  """TFDS features of a CSS gallery image: encoded image + JSON metadata.

  The metadata holds "index" (gallery position), "caption", "objects" (CSS
  `objects_img` format) and "mods": [[mod id, pair index in the mod, text,
  target index], ...] for every pair whose source is this image, from which
  the split's mods are rebuilt in their original order.
  """
  return tfds.features.FeaturesDict({
      "image": storage.encoded_image_feature(),
      "metadata": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


def css_examples(images, captions, objects, mods: Sequence[Mod]):
  """Yields (key, example) in gallery order for `css_features`."""
  outgoing: dict[int, list] = {}
  for m, mod in enumerate(mods):
    for k, (f, t) in enumerate(zip(mod.sources, mod.targets)):
      outgoing.setdefault(f, []).append([m, k, mod.text, t])
  for i, (image, caption, objs) in enumerate(zip(images, captions, objects)):
    metadata = {"index": i, "caption": caption, "objects": objs,
                "mods": outgoing.get(i, [])}
    yield i, {"image": image, "metadata": json.dumps(metadata)}


def _read_records(source, chunk: int = 1024):
  for start in range(0, len(source), chunk):
    yield from source.__getitems__(
        list(range(start, min(start + chunk, len(source)))))


def read_css_split(source, *, name: str, split: str,
                   render_size: int | None = None) -> CSSSplit:
  """Rebuilds a `CSSSplit` from a data source written by `css_examples`.

  Args:
    source: the split's TFDS data source.
    name, split: dataset and split names (for errors).
    render_size: when set, images are re-rendered from the stored objects with
      `render_scene` (pixel-identical to the stored PNGs of 2D renders and
      several times faster than decoding them); else the stored images are
      decoded.
  """
  captions, objects, images, entries = [], [], [], []
  for i, record in enumerate(_read_records(source)):
    metadata = json.loads(record["metadata"])
    if metadata["index"] != i:
      raise ValueError(f"{name}/{split}: prepared data is out of order "
                       f"(record {i} holds image {metadata['index']}); "
                       "delete the prepared folder in data_dir and reload")
    captions.append(metadata["caption"])
    objects.append(metadata["objects"])
    entries.extend((i, *entry) for entry in metadata["mods"])
    images.append(
        render_scene(metadata["objects"], render_size) if render_size else
        storage.decode_image(record["image"], source=f"{name}/{split}[{i}]"))
  pairs: dict[int, dict[int, tuple[int, int]]] = {}
  texts: dict[int, str] = {}
  for f, m, k, text, t in entries:
    pairs.setdefault(m, {})[k] = (f, t)
    texts[m] = text
  mods = [Mod(texts[m], tuple(pairs[m][k][0] for k in sorted(pairs[m])),
              tuple(pairs[m][k][1] for k in sorted(pairs[m])))
          for m in sorted(pairs)]
  return CSSSplit(source, name=name, split=split, captions=captions,
                  objects=objects, mods=mods, images=np.stack(images))


# ------------------------------------------------------------- TFDS builder

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
