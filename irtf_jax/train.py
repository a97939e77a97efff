"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Everything a run leaves is in `workdir`: config.json, vocab.json,
metrics.jsonl, TensorBoard events, checkpoints/ (orbax) and one PNG of
qualitative results per evaluation. Running again in the same workdir resumes
from the latest checkpoint; because batches and random keys are pure
functions of (seed, step), a resumed run computes exactly what an
uninterrupted one does, whether the first was stopped by a signal
(`checkpointing.Preempted`), killed outright, or crashed.

The run's pieces (splits, tokenizer, model, optimizer, checkpoints,
evaluation) are `irtf_jax.trainer.Trainer`'s; this module is the loop that
drives them: the steps, logging, checkpoint and evaluation cadence, resuming,
and stopping on a non-finite loss or a preemption signal.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import ml_collections
import numpy as np
import tqdm

from irtf_jax import checkpointing
from irtf_jax import train_step as train_step_lib
from irtf_jax import trainer as trainer_lib
from irtf_jax.data import pipeline


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def _stopped(what: str, last_good: int, workdir: str) -> str:
  return (
      f"{what}; training stopped. The last good checkpoint (step "
      f"{last_good}) in {workdir}/checkpoints is intact; lower "
      "config.optimizer.learning_rate or the GA strengths and rerun in a "
      "new workdir."
  )


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}


def _is_eval_step(config, step: int) -> bool:
  return step % config.eval_every == 0 or step == config.num_train_steps


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and
  evaluates; returns the last evaluation's metrics.

  Raises:
    checkpointing.Preempted: SIGTERM or SIGINT arrived; the step it arrived
      in was finished and checkpointed (rerun to continue).
  """
  trainer = trainer_lib.Trainer(config, workdir)
  with contextlib.ExitStack() as stack:
    stack.callback(trainer.close)
    preemption = stack.enter_context(checkpointing.PreemptionWatch())
    return _train(trainer, preemption, stack)


def _train(
    trainer: trainer_lib.Trainer,
    preemption: checkpointing.PreemptionWatch,
    stack: contextlib.ExitStack,
) -> dict[str, float]:
  config, workdir, parallel = trainer.config, trainer.workdir, trainer.parallel
  host_state = trainer.initial_state()
  start = int(host_state.step)
  trainer.writer.truncate_after(start)
  if start and trainer.is_chief:
    print(f"Resuming from step {start} (checkpoint in {workdir}/checkpoints)")
  state = parallel.replicate(host_state)
  step_fn = parallel.compile_step(
      train_step_lib.make_train_step(
          trainer.model, trainer.tx, config, axis_name=parallel.axis_name
      )
  )
  rng = jax.random.key(config.seed)
  learning_rate = train_step_lib.learning_rate_schedule(config)
  last_good = start
  pending: list[dict] = []
  results: dict[str, float] = {}
  timer = time.perf_counter()
  timed_steps = 0
  progress = stack.enter_context(
      tqdm.tqdm(
          total=config.num_train_steps,
          initial=start,
          desc=f"train {config.data.name}/{config.model.name}",
          disable=not trainer.is_chief,
          dynamic_ncols=True,
      )
  )

  def flush(step):
    nonlocal pending, timer, timed_steps
    if not pending:
      return
    losses_seen = np.asarray(jax.device_get([m["loss"] for m in pending]))
    if not np.all(np.isfinite(losses_seen)):
      bad = step - len(pending) + 1 + int(np.argmin(np.isfinite(losses_seen)))
      raise NonFiniteLossError(
          _stopped(
              f"train/loss is not finite at step {bad}", last_good, workdir
          )
      )
    values = _mean_metrics(pending)
    values["train/lr"] = float(learning_rate(step - 1))
    elapsed = time.perf_counter() - timer
    values["train/steps_per_second"] = timed_steps / max(elapsed, 1e-9)
    trainer.writer.write(step, values)
    progress.set_postfix(
        loss=f"{values['train/loss']:.3f}",
        steps_s=f"{values['train/steps_per_second']:.2f}",
    )
    pending, timer, timed_steps = [], time.perf_counter(), 0

  def save(step):
    nonlocal host_state, last_good
    flush(step)
    host_state = parallel.unreplicate(state)
    if not all(
        np.all(np.isfinite(x))
        for x in jax.tree.leaves((host_state.params, host_state.batch_stats))
    ):
      raise NonFiniteLossError(
          _stopped(
              f"parameters are not finite after step {step}", last_good, workdir
          )
      )
    trainer.checkpoints.save(step, host_state)
    last_good = step

  def evaluate(step):
    nonlocal results, timer
    flush(step)
    results = trainer.evaluate(parallel.unreplicate(state), step)
    trainer.writer.write(step, results)
    progress.write(_summary(step, results))
    timer = time.perf_counter()

  # A run stopped after its checkpoint but before that step's evaluation
  # finished evaluates it now (a finished one is never evaluated twice).
  recorded = (
      trainer.writer.find(start, f"test/recall@{min(config.eval.ks)}")
      if start
      else None
  )
  if recorded is not None:
    results = recorded
  elif start and _is_eval_step(config, start):
    evaluate(start)
  batches = stack.enter_context(
      contextlib.closing(
          pipeline.prefetched_batches(
              trainer.make_batch,
              range(start, config.num_train_steps),
              put=parallel.shard_batch,
              workers=trainer.workers,
          )
      )
  )
  for step, batch in batches:
    state, step_metrics = step_fn(state, batch, rng)  # placed by the thread
    pending.append(step_metrics)
    timed_steps += 1
    progress.update(1)
    done = step + 1
    if done % config.log_every == 0:
      flush(done)
    if done % config.checkpoint_every == 0 or done == config.num_train_steps:
      save(done)
    if _is_eval_step(config, done):
      evaluate(done)
    if preemption.stop_requested() and done < config.num_train_steps:
      if last_good != done:
        save(done)
      raise checkpointing.Preempted(done, workdir, preemption.received)
  return results


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Evaluates the latest checkpoint of `workdir` (--mode=evaluate)."""
  trainer = trainer_lib.Trainer(config, workdir)
  try:
    if trainer.checkpoints.latest_step() is None:
      raise FileNotFoundError(
          f"{workdir}/checkpoints: no checkpoint to "
          "evaluate; train first (--mode=train)"
      )
    host_state = trainer.initial_state()
    step = int(host_state.step)
    results = trainer.evaluate(host_state, step)
    trainer.writer.write(step, {f"evaluate/{k}": v for k, v in results.items()})
  finally:
    trainer.close()
  print(_summary(step, results))
  return results


def _summary(step: int, results: dict[str, float]) -> str:
  keys = [
      k
      for k in results
      if k.startswith(("test/recall@", "train/recall@")) or k == "whm"
  ]
  return f"step {step}: " + json.dumps(
      {k: round(100 * results[k], 2) for k in keys}
  )
