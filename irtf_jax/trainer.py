"""The pieces of one run, built from its config: `Trainer`.

`Trainer(config, workdir)` validates the config, takes the workdir's lock,
writes config.json, and builds the data splits (`load_splits`), the text
tokenizer (`load_or_build_tokenizer`, which keeps vocab.json), the model, the
optimizer, the metric writer, the checkpoints and the feature extractor. It
gives the initial train state (restored, or initialized with the pretrained
weights) and evaluates a state (test and train-split recall, WHM and the
qualitative picture). The loop that drives it is `irtf_jax.train`.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from irtf_jax import checkpointing
from irtf_jax import config_base
from irtf_jax import data
from irtf_jax import evaluate
from irtf_jax import metrics as metrics_lib
from irtf_jax import models
from irtf_jax import parallel as parallel_lib
from irtf_jax import train_step as train_step_lib
from irtf_jax import visualize
from irtf_jax.data import fixtures
from irtf_jax.data import pipeline
from irtf_jax.metric_writers import MetricWriter
from irtf_jax.models.text_encoders import Vocabulary


def load_splits(config, workdir: str) -> tuple[data.Split, data.Split]:
  """The train and test splits of config.data.

  With `config.data.fixture` and no `manual_dir` (the smoke variants of the
  real datasets), a small copy of the dataset in its published on-disk format
  is written into the workdir and loaded from there, through the same loader.
  """
  manual_dir = config.data.manual_dir or None
  data_dir = config.data.data_dir or None
  if config.data.fixture and not manual_dir:
    manual_dir = fixtures.write_fixture(
        config.data.name, os.path.join(workdir, "fixture", "manual")
    )
    data_dir = data_dir or os.path.join(workdir, "fixture", "prepared")
  kwargs = dict(
      data_dir=data_dir, manual_dir=manual_dir, **dict(config.data.options)
  )
  return (
      data.load(config.data.name, "train", **kwargs),
      data.load(config.data.name, "test", **kwargs),
  )


def load_or_build_tokenizer(config, workdir: str, train_split):
  """The host-side text tokenizer of config.model.text_encoder.

  The LSTM's word vocabulary (built from the training texts) is saved in the
  workdir, and a resumed run checks that the data still gives the same one;
  the pretrained and precomputed encoders bring their own.
  """
  if config.model.text_encoder.name != "lstm":
    return models.build_text_tokenizer(
        config.model, train_split.vocabulary_texts
    )
  vocab = Vocabulary.build(train_split.vocabulary_texts)
  path = os.path.join(workdir, "vocab.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = Vocabulary.from_json(f.read())
    if saved != vocab:
      raise ValueError(
          f"{path}: the training texts give a different vocabulary "
          "than the one this run started with; use a new workdir "
          "or the original data"
      )
  elif jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(vocab.to_json())
  return vocab


def recall_summary(
    results: dict[str, float], ks, alpha: float
) -> dict[str, float]:
  """WHM (`metrics.weighted_harmonic_mean`) of train and test recall at every
  K evaluated on both, as "whm@K", and "whm" at the smallest such K."""
  whm = {}
  for k in sorted(ks):
    if f"test/recall@{k}" in results and f"train/recall@{k}" in results:
      whm[f"whm@{k}"] = metrics_lib.weighted_harmonic_mean(
          results[f"train/recall@{k}"], results[f"test/recall@{k}"], alpha
      )
  if whm:
    whm["whm"] = whm[f"whm@{min(int(k[4:]) for k in whm)}"]
  return whm


class Trainer:
  """The pieces of one run, built from a config (validated first)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_base.validate(config, jax.device_count())
    self.parallel = parallel_lib.DataParallel(config.parallel.strategy)
    self.config = config
    self.workdir = workdir
    self.is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.lock = (
        checkpointing.WorkdirLock(workdir).acquire() if self.is_chief else None
    )
    try:
      self._build(config, workdir)
    except BaseException:
      # A notebook keeps the failed call's frames: free the workdir now.
      if self.lock is not None:
        self.lock.release()
      raise

  def _build(self, config, workdir: str) -> None:
    if self.is_chief:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    self.train_split, self.test_split = load_splits(config, workdir)
    self.train_recall = evaluate.train_recall_split(
        self.train_split,
        self.test_split,
        train_gallery=config.eval.train_gallery,
        max_train_queries=config.eval.max_train_queries,
        max_test_queries=config.eval.max_test_queries,
    )
    self.vocab = load_or_build_tokenizer(config, workdir, self.train_split)
    self.model = models.build_model(
        config.model,
        len(self.vocab),
        precision=config.precision,
        bn_axis_name=self.parallel.axis_name,
    )
    self.tx = train_step_lib.make_optimizer(config)
    # Input workers (and evaluation decode threads), config.data.workers = -1
    # resolved for this host.
    self.workers = pipeline.resolve_workers(config.data.workers)
    self.writer = MetricWriter(workdir, enabled=self.is_chief)
    self.checkpoints = checkpointing.Checkpoints(
        workdir, config.keep_checkpoints
    )
    self.extractor = evaluate.FeatureExtractor(
        self.model,
        self.parallel,
        config.eval.batch_size,
        show_progress=self.is_chief,
        decode_threads=self.workers,
    )

  def close(self) -> None:
    self.checkpoints.close()
    self.writer.close()
    if self.lock is not None:
      self.lock.release()

  @property
  def make_batch(self) -> pipeline.HostBatch:
    """step -> this process's host batch; picklable, for worker processes."""
    config = self.config
    return pipeline.HostBatch(
        self.train_split,
        self.vocab,
        seed=config.seed,
        batch_size=config.batch_size,
        max_length=config.model.text_encoder.max_length,
        num_processes=jax.process_count(),
        process_index=jax.process_index(),
    )

  def initial_state(self) -> train_step_lib.TrainState:
    """Restored from the latest checkpoint that restores, or freshly
    initialized with the pretrained weights the config names (host)."""
    example = self.make_batch(0)
    init = jax.jit(
        lambda rng: train_step_lib.init_state(self.model, self.tx, example, rng)
    )
    state = jax.device_get(init(jax.random.key(self.config.seed)))
    restored = self.checkpoints.restore(state)
    if restored is not None:
      return restored
    variables = models.load_pretrained(
        {"params": state.params, "batch_stats": state.batch_stats},
        self.config.model,
    )
    return state.replace(
        params=jax.device_get(variables["params"]),
        batch_stats=jax.device_get(variables["batch_stats"]),
    )

  def variables(self, host_state) -> dict:
    return jax.device_put(
        {"params": host_state.params, "batch_stats": host_state.batch_stats},
        self.parallel.replicated,
    )

  def evaluate(self, host_state, step: int) -> dict[str, float]:
    """Test and train-split recall, WHM, and the qualitative PNG."""
    config = self.config
    variables = self.variables(host_state)
    results = {}
    shown = None
    for prefix, split, limit in (
        ("test", self.test_split, config.eval.max_test_queries),
        ("train", *self.train_recall),
    ):
      recall, queries, neighbours = evaluate.evaluate_split(
          self.extractor,
          variables,
          split,
          vocab=self.vocab,
          max_length=config.model.text_encoder.max_length,
          ks=config.eval.ks,
          max_queries=limit,
          seed=config.seed,
          chunk_size=config.eval.chunk_size,
          name=f"eval {prefix}",
      )
      results.update({f"{prefix}/{k}": v for k, v in recall.items()})
      if prefix == "test" and config.eval.num_qualitative:
        # Spread over the queries (consecutive ones share a modification).
        rows = np.unique(
            np.linspace(
                0, len(queries) - 1, config.eval.num_qualitative
            ).astype(int)
        )
        shown = ([queries[i] for i in rows], neighbours[rows])
    results.update(
        recall_summary(results, config.eval.ks, config.eval.whm_alpha)
    )
    if self.is_chief and shown and shown[0]:
      first = min(config.eval.ks)
      visualize.save_retrievals(
          os.path.join(self.workdir, f"retrievals_step{step:07d}.png"),
          self.test_split,
          shown[0],
          shown[1],
          top_k=min(5, shown[1].shape[1]),
          title=(
              f"{config.data.name} / {config.model.name}, step {step}: "
              f"test R@{first} "
              f"{100 * results.get(f'test/recall@{first}', 0):.1f}"
          ),
      )
    return results
