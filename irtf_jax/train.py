"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Everything a run leaves is in `workdir`: config.json, vocab.json,
metrics.jsonl, TensorBoard events, checkpoints/ (orbax) and one PNG of
qualitative results per evaluation. Running again in the same workdir resumes
from the latest checkpoint; because batches and random keys are pure
functions of (seed, step), a resumed run computes exactly what an
uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from typing import Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from irtf_jax import config_base
from irtf_jax import data
from irtf_jax import evaluate
from irtf_jax import losses
from irtf_jax import metrics as metrics_lib
from irtf_jax import models
from irtf_jax import parallel as parallel_lib
from irtf_jax import train_step as train_step_lib
from irtf_jax import visualize
from irtf_jax.metric_writers import MetricWriter
from irtf_jax.models.text_encoders import Vocabulary


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def load_splits(config, workdir: str) -> tuple[data.Split, data.Split]:
  """The train and test splits of config.data.

  With `config.data.fixture` and no `manual_dir` (the smoke variants of the
  real datasets), a small copy of the dataset in its published on-disk format
  is written into the workdir and loaded from there, through the same loader.
  """
  manual_dir = config.data.manual_dir or None
  data_dir = config.data.data_dir or None
  if config.data.fixture and not manual_dir:
    from irtf_jax.data import fixtures  # pylint: disable=g-import-not-at-top
    manual_dir = fixtures.write_fixture(
        config.data.name, os.path.join(workdir, "fixture", "manual"))
    data_dir = data_dir or os.path.join(workdir, "fixture", "prepared")
  kwargs = dict(data_dir=data_dir, manual_dir=manual_dir,
                **dict(config.data.options))
  return (data.load(config.data.name, "train", **kwargs),
          data.load(config.data.name, "test", **kwargs))


def load_or_build_tokenizer(config, workdir: str, train_split):
  """The host-side text tokenizer of config.model.text_encoder.

  The LSTM's word vocabulary (built from the training texts) is saved in the
  workdir, and a resumed run checks that the data still gives the same one;
  the pretrained and precomputed encoders bring their own.
  """
  if config.model.text_encoder.name != "lstm":
    return models.build_text_tokenizer(config.model,
                                       train_split.vocabulary_texts)
  vocab = Vocabulary.build(train_split.vocabulary_texts)
  path = os.path.join(workdir, "vocab.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = Vocabulary.from_json(f.read())
    if saved != vocab:
      raise ValueError(f"{path}: the training texts give a different vocabulary "
                       "than the one this run started with; use a new workdir "
                       "or the original data")
  elif jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(vocab.to_json())
  return vocab


def host_batch(split: data.Split, vocab: Vocabulary, config, step: int,
               num_processes: int = 1, process_index: int = 0) -> dict:
  """This process's slice of training batch `step` (numpy)."""
  queries = split.sample_training_queries(config.seed, step, config.batch_size)
  local = config.batch_size // num_processes
  queries = queries[process_index * local:(process_index + 1) * local]
  tokens, lengths = vocab.encode([q.text for q in queries],
                                 config.model.text_encoder.max_length)
  return {
      "query_image": split.images(np.asarray([q.source_index for q in queries])),
      "target_image": split.images(np.asarray([q.target_index for q in queries])),
      "tokens": tokens,
      "lengths": lengths,
  }


def prefetched_batches(make_batch, steps: range, depth: int = 2, put=None,
                       workers: int = 0) -> Iterator[tuple[int, dict]]:
  """Builds batches in a background thread, `depth` ahead of the consumer.

  With `put` (e.g. `DataParallel.shard_batch`), the thread also places each
  batch on the devices, so the next batch is copied while the current step
  runs and the step itself makes no host-to-device transfer. With `workers`
  > 0 (`config.data.workers`: datasets decoded from JPEG files), batches are
  built in that many grain worker processes (`irtf_jax.data.pipeline`);
  `make_batch` must then be picklable (e.g. `pipeline.HostBatch`).
  """
  buffer: queue.Queue = queue.Queue(maxsize=depth)

  def built():
    if not workers:
      return ((step, make_batch(step)) for step in steps)
    from irtf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.training_batches(pipeline.picklable_or_raise(make_batch),
                                     steps, workers, prefetch=depth)

  def produce():
    try:
      for step, batch in built():
        buffer.put((step, batch if put is None else put(batch)))
    except BaseException as e:  # re-raised in the consumer
      buffer.put((None, e))
      return
    buffer.put((None, None))

  threading.Thread(target=produce, daemon=True).start()
  while True:
    step, batch = buffer.get()
    if step is None:
      if batch is not None:
        raise batch
      return
    yield step, batch


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=False))


def _restore(manager, host_state):
  step = manager.latest_step()
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.StandardRestore(host_state))


class Trainer:
  """The pieces of one run, built from a config (validated first)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.parallel = parallel_lib.DataParallel(config.parallel.strategy)
    config_base.validate(config, self.parallel.num_devices)
    # Fail on unknown names before loading data or compiling anything.
    losses.retrieval_loss(config.loss.name)
    models.compute_dtype(config.precision)
    if config.model.name not in models.COMPOSERS:
      models.build_model(config.model, 2)  # raises with the allowed names
    if config.data.name not in data.DATASETS:
      data.load(config.data.name, "train")  # raises with the allowed names
    self.config = config
    self.workdir = workdir
    os.makedirs(workdir, exist_ok=True)
    self.is_chief = jax.process_index() == 0
    if self.is_chief:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    self.train_split, self.test_split = load_splits(config, workdir)
    self.train_recall = evaluate.train_recall_split(
        self.train_split, self.test_split,
        train_gallery=config.eval.train_gallery,
        max_train_queries=config.eval.max_train_queries,
        max_test_queries=config.eval.max_test_queries)
    self.vocab = load_or_build_tokenizer(config, workdir, self.train_split)
    self.model = models.build_model(
        config.model, len(self.vocab), precision=config.precision,
        bn_axis_name=self.parallel.axis_name)
    self.tx = train_step_lib.make_optimizer(config)
    self.writer = MetricWriter(workdir, enabled=self.is_chief)
    self.checkpoints = _checkpoint_manager(workdir, config.keep_checkpoints)
    self.extractor = evaluate.FeatureExtractor(
        self.model, self.parallel, config.eval.batch_size,
        show_progress=self.is_chief)

  @property
  def make_batch(self):
    """step -> this process's host batch; picklable, for worker processes."""
    from irtf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.HostBatch(self.train_split, self.vocab, self.config,
                              jax.process_count(), jax.process_index())

  def initial_state(self) -> train_step_lib.TrainState:
    """Restored from the latest checkpoint, or freshly initialized (host)."""
    example = host_batch(self.train_split, self.vocab, self.config, 0)
    init = jax.jit(lambda rng: train_step_lib.init_state(
        self.model, self.tx, example, rng))
    state = jax.device_get(init(jax.random.key(self.config.seed)))
    restored = _restore(self.checkpoints, state)
    return state if restored is None else restored

  def variables(self, host_state) -> dict:
    return jax.device_put({"params": host_state.params,
                           "batch_stats": host_state.batch_stats},
                          self.parallel.replicated)

  def evaluate(self, host_state, step: int) -> dict[str, float]:
    """Test and train-split recall, WHM, and the qualitative PNG."""
    config = self.config
    variables = self.variables(host_state)
    results = {}
    shown = None
    for prefix, split, limit in (
        ("test", self.test_split, config.eval.max_test_queries),
        ("train", *self.train_recall)):
      recall, queries, neighbours = evaluate.evaluate_split(
          self.extractor, variables, split, vocab=self.vocab,
          max_length=config.model.text_encoder.max_length, ks=config.eval.ks,
          max_queries=limit, seed=config.seed,
          chunk_size=config.eval.chunk_size, name=f"eval {prefix}")
      results.update({f"{prefix}/{k}": v for k, v in recall.items()})
      if prefix == "test" and config.eval.num_qualitative:
        # Spread over the queries (consecutive ones share a modification).
        rows = np.unique(np.linspace(0, len(queries) - 1,
                                     config.eval.num_qualitative).astype(int))
        shown = ([queries[i] for i in rows], neighbours[rows])
    for k in config.eval.ks:
      if f"test/recall@{k}" in results and f"train/recall@{k}" in results:
        results[f"whm@{k}"] = metrics_lib.weighted_harmonic_mean(
            results[f"train/recall@{k}"], results[f"test/recall@{k}"],
            config.eval.whm_alpha)
    results["whm"] = results["whm@1"]
    if self.is_chief and shown and shown[0]:
      visualize.save_retrievals(
          os.path.join(self.workdir, f"retrievals_step{step:07d}.png"),
          self.test_split, shown[0], shown[1],
          top_k=min(5, shown[1].shape[1]),
          title=(f"{config.data.name} / {config.model.name}, step {step}: "
                 f"test R@1 {100 * results['test/recall@1']:.1f}"))
    return results


def _stopped(what: str, last_good: int, workdir: str) -> str:
  return (f"{what}; training stopped. The last good checkpoint (step "
          f"{last_good}) in {workdir}/checkpoints is intact; lower "
          "config.optimizer.learning_rate or the GA strengths and rerun in a "
          "new workdir.")


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and
  evaluates; returns the last evaluation's metrics."""
  trainer = Trainer(config, workdir)
  parallel = trainer.parallel
  host_state = trainer.initial_state()
  start = int(host_state.step)
  trainer.writer.truncate_after(start)
  if start and trainer.is_chief:
    print(f"Resuming from step {start} (checkpoint in {workdir}/checkpoints)")
  state = parallel.replicate(host_state)
  step_fn = parallel.compile_step(train_step_lib.make_train_step(
      trainer.model, trainer.tx, config, axis_name=parallel.axis_name))
  rng = jax.random.key(config.seed)
  learning_rate = train_step_lib.learning_rate_schedule(config)
  last_good = start
  pending: list[dict] = []
  results: dict[str, float] = {}
  timer = time.perf_counter()
  timed_steps = 0

  def flush(step):
    nonlocal pending, timer, timed_steps
    if not pending:
      return
    losses_seen = np.asarray(jax.device_get([m["loss"] for m in pending]))
    if not np.all(np.isfinite(losses_seen)):
      bad = step - len(pending) + 1 + int(np.argmin(np.isfinite(losses_seen)))
      raise NonFiniteLossError(_stopped(f"train/loss is not finite at step "
                                        f"{bad}", last_good, workdir))
    values = _mean_metrics(pending)
    values["train/lr"] = float(learning_rate(step - 1))
    elapsed = time.perf_counter() - timer
    values["train/steps_per_second"] = timed_steps / max(elapsed, 1e-9)
    trainer.writer.write(step, values)
    progress.set_postfix(loss=f"{values['train/loss']:.3f}",
                         steps_s=f"{values['train/steps_per_second']:.2f}")
    pending, timer, timed_steps = [], time.perf_counter(), 0

  steps = range(start, config.num_train_steps)
  progress = tqdm.tqdm(total=config.num_train_steps, initial=start,
                       desc=f"train {config.data.name}/{config.model.name}",
                       disable=not trainer.is_chief, dynamic_ncols=True)
  try:
    for step, batch in prefetched_batches(
        trainer.make_batch, steps, put=parallel.shard_batch,
        workers=config.data.workers):
      state, step_metrics = step_fn(state, batch, rng)  # placed by the thread
      pending.append(step_metrics)
      timed_steps += 1
      progress.update(1)
      done = step + 1
      if done % config.log_every == 0:
        flush(done)
      is_last = done == config.num_train_steps
      if done % config.checkpoint_every == 0 or is_last:
        flush(done)
        host_state = parallel.unreplicate(state)
        if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(
            (host_state.params, host_state.batch_stats))):
          raise NonFiniteLossError(_stopped(
              f"parameters are not finite after step {done}", last_good,
              workdir))
        trainer.checkpoints.save(done, args=ocp.args.StandardSave(host_state))
        last_good = done
      if done % config.eval_every == 0 or is_last:
        flush(done)
        results = trainer.evaluate(parallel.unreplicate(state), done)
        trainer.writer.write(done, results)
        progress.write(_summary(done, results))
        timer = time.perf_counter()
    if start >= config.num_train_steps:  # already trained: evaluate only
      results = trainer.evaluate(host_state, start)
  finally:
    progress.close()
    trainer.checkpoints.wait_until_finished()
    trainer.writer.close()
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str
                        ) -> dict[str, float]:
  """Evaluates the latest checkpoint of `workdir` (--mode=evaluate)."""
  trainer = Trainer(config, workdir)
  if trainer.checkpoints.latest_step() is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to evaluate; "
                            "train first (--mode=train)")
  host_state = trainer.initial_state()
  step = int(host_state.step)
  results = trainer.evaluate(host_state, step)
  trainer.writer.write(step, {f"evaluate/{k}": v for k, v in results.items()})
  trainer.writer.close()
  print(_summary(step, results))
  return results


def _summary(step: int, results: dict[str, float]) -> str:
  keys = [k for k in ("test/recall@1", "test/recall@10", "test/recall@50",
                      "train/recall@1", "whm") if k in results]
  return f"step {step}: " + json.dumps(
      {k: round(100 * results[k], 2) for k in keys})
