"""evaluate: the features of each distinct image computed once, against
TIRG's way (every query's image encoded again), and Recall@K against a NumPy
ranking of TIRG's protocol."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from irtf_jax import evaluate
from irtf_jax import models
from irtf_jax import parallel
from irtf_jax.data import base
from irtf_jax.models import normalize_images
from irtf_jax.models.text_encoders import Vocabulary
from tests import helpers

IMAGE_SIZE = 32
GALLERY_SIZE = 19
NUM_IMAGES = GALLERY_SIZE + 2  # two images are only query sources
# Two rows per device of the suite's eight: two image batches, the second
# padded, and a device's queries may read either of its rows.
BATCH_SIZE = 16
CAPTIONS = tuple(
    ("red", "blue", "green", "big", "small")[i % 5] for i in range(NUM_IMAGES)
)
WORDS = ("make", "it", "red", "blue", "green", "big", "small", "please")


class PixelSplit(base.Split):
  """In-memory images; queries as the test builds them."""

  def __init__(self, pixels, queries, gallery):
    self.name, self.split = "pixels", "test"
    self.captions = CAPTIONS
    self.queries = queries
    self._pixels = pixels
    self._gallery = np.asarray(gallery, np.int64)

  @property
  def gallery(self) -> np.ndarray:
    return self._gallery

  def images(self, indices: np.ndarray) -> np.ndarray:
    return self._pixels[np.asarray(indices)]


def make_split(seed: int = 0) -> PixelSplit:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(
      0, 256, (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
  )
  # Unsorted; images 19 and 20 are only query sources.
  gallery = rng.permutation(GALLERY_SIZE)
  # Image 3 starts more queries than a device holds; 19 and 20 are outside
  # the gallery; the order interleaves sources.
  sources = [3, 0, 3, 19, 3, 7, 3, 2, 20, 5, 3, 0, 18, 3, 3, 9, 3, 16, 1]
  queries = [
      base.Query(
          source_index=s,
          text=" ".join(rng.choice(WORDS, size=rng.integers(2, 6))),
          target_caption=CAPTIONS[(s + 1 + k) % GALLERY_SIZE],
          target_index=(s + 1 + k) % GALLERY_SIZE,
      )
      for k, s in enumerate(sources)
  ]
  return PixelSplit(pixels, queries, gallery)


@pytest.fixture(
    scope="module", params=["tirg", "tirg_lastconv", "show_and_tell"]
)
def built(request):
  """A tiny model of each kind of composer (`tirg` composes the pooled
  feature, `tirg_lastconv` the map, `show_and_tell` also reads the tokens)
  and its extractor, compiled once."""
  config = helpers.tiny_config(**{"model.name": request.param})
  vocab = Vocabulary.build(WORDS)
  model = models.build_model(config.model, len(vocab))
  images = normalize_images(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
  tokens = np.ones((2, 3), np.int32)
  lengths = np.full((2,), 3, np.int32)
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.key(0), images, tokens, lengths, images, train=False
  )
  extractor = evaluate.FeatureExtractor(
      model, parallel.DataParallel("jit"), BATCH_SIZE, show_progress=False
  )
  return config, vocab, model, variables, extractor


def encoded_every_time(model, variables, split, vocab, max_length):
  """TIRG's test_retrieval.py: each query's image through the whole model."""
  queries = split.queries
  tokens, lengths = vocab.encode([q.text for q in queries], max_length)
  images = normalize_images(split.images([q.source_index for q in queries]))
  query_features = jax.jit(
      lambda v, x, t, n: model.apply(
          v, x, t, n, train=False, method=model.embed_query
      )
  )(variables, images, tokens, lengths)
  gallery_features = jax.jit(
      lambda v, x: model.apply(v, x, train=False, method=model.embed_target)
  )(variables, normalize_images(split.images(split.gallery)))
  return np.asarray(gallery_features), np.asarray(query_features)


def test_features_equal_encoding_every_query_image_again(built):
  config, vocab, model, variables, extractor = built
  split = make_split()
  max_length = config.model.text_encoder.max_length
  gallery, queries = extractor.features(
      variables, split, split.gallery, split.queries, vocab, max_length
  )
  want_gallery, want_queries = encoded_every_time(
      model, variables, split, vocab, max_length
  )
  # The same float32 arithmetic in other batches and programs: only the
  # summation order inside the convolutions and matmuls may differ, a few
  # ulps per layer of features normalized to the learned scale (4).
  scale = config.model.normalization_scale
  tolerance = dict(rtol=0, atol=scale * 64 * np.finfo(np.float32).eps)
  np.testing.assert_allclose(np.asarray(gallery), want_gallery, **tolerance)
  np.testing.assert_allclose(np.asarray(queries), want_queries, **tolerance)
  assert queries.shape == (len(split.queries), config.model.embed_dim)

  gallery_alone, no_queries = extractor.features(
      variables, split, split.gallery, [], vocab, max_length
  )
  # The same compiled program on batches of the same shape, and no
  # arithmetic mixes rows (BatchNorm uses its running statistics): the
  # bits cannot depend on which other images share a batch.
  np.testing.assert_array_equal(gallery_alone, gallery)
  assert no_queries.shape == (0, config.model.embed_dim)


def numpy_recall(gallery_features, query_features, split, ks):
  """TIRG's protocol in float64: the source's column out, one argsort per
  query, a hit when a top-k image has the target caption."""
  sims = query_features.astype(np.float64) @ gallery_features.T.astype(
      np.float64
  )
  for row, column in enumerate(split.excluded_columns()):
    if column >= 0:
      sims[row, column] = -np.inf
  captions = np.asarray([split.captions[i] for i in split.gallery])
  ranked = np.argsort(-sims, axis=1, kind="stable")
  recall = {}
  for k in ks:
    hits = [
        q.target_caption in captions[ranked[row, :k]]
        for row, q in enumerate(split.queries)
    ]
    recall[f"recall@{k}"] = float(np.mean(hits))
  return recall


def test_evaluate_split_recall_is_tirgs_protocol(built):
  config, vocab, _, variables, extractor = built
  split = make_split(seed=1)
  max_length = config.model.text_encoder.max_length
  ks = (1, 3, 5)
  recall, queries, _ = evaluate.evaluate_split(
      extractor,
      variables,
      split,
      vocab=vocab,
      max_length=max_length,
      ks=ks,
  )
  gallery_features, query_features = extractor.features(
      variables, split, split.gallery, queries, vocab, max_length
  )
  gallery_features = np.asarray(gallery_features)
  query_features = np.asarray(query_features)
  assert_no_near_ties(gallery_features, query_features, ks)
  want = numpy_recall(gallery_features, query_features, split, ks)
  assert recall == want


def assert_no_near_ties(gallery_features, query_features, ks):
  """Float32 and float64 scores rank alike when no two scores at a cut-off
  are closer than twice float32's error bound for a D-term dot product of
  these norms, D eps |q| |g| (checked, not assumed)."""
  dim = gallery_features.shape[1]
  norms = (
      np.linalg.norm(query_features, axis=1).max()
      * np.linalg.norm(gallery_features, axis=1).max()
  )
  bound = 2 * dim * np.finfo(np.float32).eps * norms
  sims = np.sort(query_features @ gallery_features.T, axis=1)[:, ::-1]
  for k in ks:
    if k < sims.shape[1]:
      assert (sims[:, k - 1] - sims[:, k]).min() > bound


class RecordingSplit(PixelSplit):
  """Records which thread decoded each batch; fails on image `fail_on`."""

  def __init__(self, split: PixelSplit, fail_on: int = -1):
    super().__init__(split._pixels, split.queries, split.gallery)
    self.fail_on = fail_on
    self.threads = []

  def images(self, indices: np.ndarray) -> np.ndarray:
    self.threads.append(threading.current_thread().name)
    if self.fail_on in np.asarray(indices):
      raise ValueError(f"pixels/test[{self.fail_on}]: unreadable image")
    return super().images(indices)


@pytest.mark.parametrize("built", ["tirg_lastconv"], indirect=True)
def test_decode_threads_change_who_decodes_not_the_features(built):
  config, vocab, _, variables, extractor = built
  max_length = config.model.text_encoder.max_length
  split = make_split()
  inline = RecordingSplit(split)
  want = extractor.features(
      variables, inline, split.gallery, split.queries, vocab, max_length
  )
  threaded = RecordingSplit(split)
  extractor.decode_threads = 2
  try:
    got = extractor.features(
        variables, threaded, split.gallery, split.queries, vocab, max_length
    )
    failing = RecordingSplit(split, fail_on=20)  # in the second batch
    with pytest.raises(ValueError, match=r"pixels/test\[20\]: unreadable"):
      extractor.features(
          variables, failing, split.gallery, split.queries, vocab, max_length
      )
  finally:
    extractor.decode_threads = 0
  # Two batches of images, decoded by the evaluating thread or the pool's.
  assert inline.threads == [threading.current_thread().name] * 2
  assert len(threaded.threads) == 2
  assert all(name.startswith("irtf_jax-map") for name in threaded.threads)
  for want_features, got_features in zip(want, got):
    np.testing.assert_array_equal(got_features, want_features)
  with pytest.raises(ValueError, match="decode_threads=-1"):
    evaluate.FeatureExtractor(
        None, parallel.DataParallel("jit"), BATCH_SIZE, decode_threads=-1
    )
