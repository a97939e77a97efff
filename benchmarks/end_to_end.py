r"""What a user waits for: training throughput and a full test evaluation,
irtf-jax's trainer against the official PyTorch style, on MIT-States files.

  python benchmarks/end_to_end.py --json-out=F

Writes a MIT-States copy in the published layout (`images/<adj> <noun>/
*.jpg`, photo-like 320x256 JPEGs, training nouns and TIRG test nouns) into a
temporary folder, then runs each side in its own process, one after the
other, with the same worker count, batch, model and loss:

train
  irtf_jax  the trainer's own pieces, as `train.train_and_evaluate` wires them:
            `trainer.Trainer` on configs/mit.py (224 px, batch 32, ResNet-18 +
            LSTM + TIRG-LastConv, the paper's adversarial and isotropic GA),
            the prepared TFDS copy, `config.data.workers` grain workers
            decoding and resizing, `data.pipeline.prefetched_batches` placing batches,
            the compiled step (`parallel.compile_step`).
  torch     a `torch.utils.data.Dataset` that opens each JPEG with PIL,
            resizes the shorter side to 224 and centre-crops (TIRG's
            transform), a `DataLoader` with as many workers, and
            benchmarks/torch_reference.py's trainer with the same GA (on
            a CUDA GPU when PyTorch sees one); the queries are the JAX
            trainer's (`sample_training_queries`).
  Reported: queries/s over the steps after --warmup-steps (compilation and
  worker start-up excluded), at most --steps steps or --seconds seconds.

evaluate (the full test split: every test query against every test image)
  irtf_jax  `evaluate.evaluate_split` with the trained variables: gallery and
            query features, chunked top-k ranking, recall. Timed twice; the
            second call (compiled) is the headline, the first is reported.
  torch     TIRG's test_retrieval.py method: eval mode, features of the
            queries and the gallery batch by batch (images loaded in the main
            process), the full similarity matrix, the source column set to
            -1e10, one `np.argsort` per query, recall at K.

Prints JSON: {"train": {"irtf_jax": queries/s, "torch": queries/s,
"ratio": jax/torch}, "evaluate": {"irtf_jax": s, "torch": s, "ratio":
torch/jax}, "device": ...} and details; ratios > 1 mean irtf-jax is faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
sys.path.insert(0, REPO)
sys.path.insert(0, BENCHMARKS)
import cli  # noqa: E402  # benchmarks/cli.py
import input_pipeline  # noqa: E402  (after the path set-up above)
import report  # noqa: E402  # benchmarks/report.py

TRAIN_NOUNS = (
    "apple",
    "bag",
    "ball",
    "bottle",
    "bread",
    "building",
    "car",
    "chair",
    "flower",
    "key",
    "knife",
    "shoe",
)
TEST_NOUNS = ("fish", "tomato", "wool", "clock", "garden", "mirror")
ADJECTIVES = ("old", "new", "wet", "dry")
KS = (1, 5, 10, 50)


def write_mit_states(
    root: str, images_per_class: int, test_images_per_class: int, seed: int = 0
) -> int:
  """The fixture; returns its number of images."""
  rng = np.random.default_rng(seed)
  count = 0
  for nouns, per_class in (
      (TRAIN_NOUNS, images_per_class),
      (TEST_NOUNS, test_images_per_class),
  ):
    for noun in nouns:
      for adjective in ADJECTIVES:
        folder = os.path.join(root, "images", f"{adjective} {noun}")
        os.makedirs(folder, exist_ok=True)
        for k in range(per_class):
          input_pipeline.photo_like(rng, 320, 256).save(
              os.path.join(folder, f"image_{k}.jpg"), format="JPEG", quality=90
          )
          count += 1
  return count


def mit_config(args):
  """configs/mit.py on the fixture, as a user would run it."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import mit  # pylint: disable=g-import-not-at-top
  # smoke: configs/mit.py:smoke's tiny model at 32 px (plumbing only; the
  # PyTorch side keeps its ResNet-18).
  config = mit.get_config("smoke" if args.smoke else "")
  config.batch_size = args.batch_size or config.batch_size
  config.data.manual_dir = args.fixture
  config.data.data_dir = os.path.join(args.workdir, "prepared")
  config.data.workers = args.workers
  config.data.options.num_train_queries = 0  # train recall is not timed
  if args.variant == "base":
    config.ga.adversarial.epsilon = 0.0
    config.ga.isotropic.gamma = 0.0
  return config


def _time_steps(
    steps, run_step, warmup: int, max_steps: int, max_seconds: float
) -> dict:
  """Runs `run_step(step, batch)` over `steps`; times those after warm-up.

  `run_step` returns something to wait on (the step's metrics), or None.
  Before the time cap is checked the previous step is waited on: with
  asynchronous dispatch the clock would otherwise see steps queued, not run
  (a 180 s cap once ended after 687 s), while one step stays in flight.
  """
  start = None
  timed = 0
  previous = last = None
  for count, (step, batch) in enumerate(steps):
    previous, last = last, run_step(step, batch)
    if count + 1 == warmup:
      wait(last)
      start = time.perf_counter()
    elif count + 1 > warmup:
      timed += 1
      wait(previous)
      if timed >= max_steps or time.perf_counter() - start >= max_seconds:
        break
  wait(last)
  return {"timed_steps": timed, "seconds": time.perf_counter() - start}


def wait(value) -> None:
  if value is not None:
    import jax  # pylint: disable=g-import-not-at-top

    jax.block_until_ready(value)


def run_jax(args) -> dict:
  """Child process: the irtf-jax trainer's steps, then the test evaluation."""
  import jax  # pylint: disable=g-import-not-at-top

  from irtf_jax import evaluate  # pylint: disable=g-import-not-at-top
  from irtf_jax import train_step  # pylint: disable=g-import-not-at-top
  from irtf_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from irtf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from irtf_jax.models import onednn  # pylint: disable=g-import-not-at-top

  config = mit_config(args)
  start = time.perf_counter()
  trainer = trainer_lib.Trainer(config, os.path.join(args.workdir, "jax"))
  prepare_seconds = time.perf_counter() - start
  parallel = trainer.parallel
  state = parallel.replicate(trainer.initial_state())
  step_fn = parallel.compile_step(
      train_step.make_train_step(
          trainer.model, trainer.tx, config, axis_name=parallel.axis_name
      )
  )
  rng = jax.random.key(config.seed)
  holder = [state]

  def run_step(step, batch):
    del step
    holder[0], metrics = step_fn(holder[0], batch, rng)
    return metrics  # not donated to the next step, unlike the state

  total = args.warmup_steps + args.steps
  timing = _time_steps(
      pipeline.prefetched_batches(
          trainer.make_batch,
          range(total),
          put=parallel.shard_batch,
          workers=config.data.workers,
      ),
      run_step,
      args.warmup_steps,
      args.steps,
      args.seconds,
  )
  variables = trainer.variables(parallel.unreplicate(holder[0]))
  evaluations = []
  for _ in range(2):
    start = time.perf_counter()
    recall, queries, _ = evaluate.evaluate_split(
        trainer.extractor,
        variables,
        trainer.test_split,
        vocab=trainer.vocab,
        max_length=config.model.text_encoder.max_length,
        ks=KS,
        chunk_size=config.eval.chunk_size,
        name="test",
    )
    evaluations.append(time.perf_counter() - start)
  return {
      "train_queries_per_second": (
          config.batch_size * timing["timed_steps"] / timing["seconds"]
      ),
      **timing,
      "prepare_seconds": prepare_seconds,
      "evaluate_seconds": evaluations[1],
      "evaluate_first_call_seconds": evaluations[0],
      "test_queries": len(queries),
      "gallery": len(trainer.test_split.gallery),
      "recall": {k: v for k, v in recall.items() if "/" not in k},
      "workers": config.data.workers,
      "batch_size": config.batch_size,
      "image_size": config.data.options.image_size,
      "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
      "jax_version": jax.__version__,
      "onednn_kernel_gradients": onednn.enabled(),
  }


class TorchPairs:
  """torch Dataset of training queries: PIL decode, resize 224, centre crop.

  Item i is query i of the flattened list (step-major): uint8 HWC images and
  token ids, the layout benchmarks/torch_reference.py's trainer takes.
  """

  def __init__(self, root, paths, queries, tokens, lengths, image_size):
    self.root, self.paths, self.queries = root, paths, queries
    self.tokens, self.lengths, self.image_size = tokens, lengths, image_size

  def __len__(self):
    return len(self.queries)

  def load(self, index):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    from irtf_jax.data import image_files  # pylint: disable=g-import-not-at-top

    with Image.open(os.path.join(self.root, self.paths[index])) as img:
      return image_files.resize_and_center_crop(img, self.image_size)

  def __getitem__(self, i):
    source, target = self.queries[i]
    return {
        "query_image": self.load(source),
        "target_image": self.load(target),
        "tokens": self.tokens[i],
        "lengths": self.lengths[i],
    }


def run_torch(args) -> dict:
  """Child process: the official-style PyTorch loop, then TIRG's evaluation."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  from irtf_jax import data  # pylint: disable=g-import-not-at-top
  from irtf_jax.models.text_encoders import Vocabulary  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  config = mit_config(args)
  load = lambda split: data.load(
      "mit_states",
      split,
      data_dir=config.data.data_dir,
      manual_dir=config.data.manual_dir,
      **dict(config.data.options),
  )
  train_split, test_split = load("train"), load("test")
  vocab = Vocabulary.build(train_split.vocabulary_texts)
  max_length = config.model.text_encoder.max_length
  total = args.warmup_steps + args.steps
  queries = [
      q
      for step in range(total)
      for q in train_split.sample_training_queries(
          config.seed, step, config.batch_size
      )
  ]
  tokens, lengths = vocab.encode([q.text for q in queries], max_length)
  dataset = TorchPairs(
      args.fixture,
      train_split.paths,
      [(q.source_index, q.target_index) for q in queries],
      tokens,
      lengths,
      config.data.options.image_size,
  )
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=config.batch_size, num_workers=config.data.workers
  )
  trainer = torch_reference.Trainer(
      vocab_size=len(vocab),
      eta=config.loss.eta,
      isotropic_gamma=config.ga.isotropic.gamma,
      adversarial_epsilon=config.ga.adversarial.epsilon,
  )
  device = trainer.device

  def run_step(step, batch):
    del step
    trainer.step(batch)

  timing = _time_steps(
      enumerate(loader), run_step, args.warmup_steps, args.steps, args.seconds
  )
  start = time.perf_counter()
  recall = tirg_test_retrieval(
      trainer.model, test_split, vocab, max_length, args.fixture
  )
  evaluate_seconds = time.perf_counter() - start
  return {
      "train_queries_per_second": (
          config.batch_size * timing["timed_steps"] / timing["seconds"]
      ),
      **timing,
      "evaluate_seconds": evaluate_seconds,
      "recall": recall,
      "workers": config.data.workers,
      "threads": torch.get_num_threads(),
      "torch_version": torch.__version__,
      "torch_device": str(device),
  }


def tirg_test_retrieval(
    model, split, vocab, max_length, root, batch_size: int = 32
) -> dict:
  """TIRG's test_retrieval.py: features in eval mode, the full similarity
  matrix, the source image's column at -1e10, one argsort per query."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  from irtf_jax.data import image_files  # pylint: disable=g-import-not-at-top

  def images(indices):
    out = []
    for i in indices:
      with Image.open(os.path.join(root, split.paths[i])) as img:
        out.append(image_files.resize_and_center_crop(img, split.image_size))
    batch = torch.from_numpy(np.stack(out)).to(device)
    return torch_reference.normalize_images(batch)

  device = next(model.parameters()).device
  model.eval()
  queries = split.queries
  with torch.no_grad():
    query_features = []
    for start in range(0, len(queries), batch_size):
      chosen = queries[start : start + batch_size]
      tokens, lengths = vocab.encode([q.text for q in chosen], max_length)
      query_features.append(
          model.embed_query(
              images([q.source_index for q in chosen]),
              torch.from_numpy(tokens).to(device),
              torch.from_numpy(lengths).to(device),
          )
          .cpu()
          .numpy()
      )
    gallery = split.gallery
    gallery_features = [
        model.embed_target(images(gallery[start : start + batch_size]))
        .cpu()
        .numpy()
        for start in range(0, len(gallery), batch_size)
    ]
  all_queries = np.concatenate(query_features)
  all_images = np.concatenate(gallery_features)
  all_queries /= np.linalg.norm(all_queries, axis=1, keepdims=True)
  all_images /= np.linalg.norm(all_images, axis=1, keepdims=True)
  sims = all_queries.dot(all_images.T)
  for i, q in enumerate(queries):
    sims[i, q.source_index] = -10e10
  nn_result = [np.argsort(-sims[i, :])[:110] for i in range(sims.shape[0])]
  captions = [split.captions[i] for i in gallery]
  recall = {}
  for k in KS:
    hits = sum(
        q.target_caption in [captions[j] for j in nn_result[i][:k]]
        for i, q in enumerate(queries)
    )
    recall[f"recall@{k}"] = hits / len(queries)
  return recall


# The options a side's child process gets from the parent.
CHILD_OPTIONS = (
    "fixture",
    "workdir",
    "workers",
    "steps",
    "warmup_steps",
    "seconds",
    "variant",
    "batch_size",
    "smoke",
)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--workers",
      type=int,
      default=min(4, os.cpu_count() or 1),
      help=(
          "input workers on both sides "
          "(config.data.workers; DataLoader num_workers)"
      ),
  )
  parser.add_argument(
      "--steps",
      type=int,
      default=300,
      help="timed training steps per side (at most)",
  )
  parser.add_argument(
      "--seconds",
      type=float,
      default=180.0,
      help="stop timing a side after this long",
  )
  parser.add_argument("--warmup-steps", type=int, default=2)
  parser.add_argument(
      "--variant",
      default="paper",
      choices=("paper", "base"),
      help=(
          "paper: configs/mit.py's adversarial + isotropic GA; base: without GA"
      ),
  )
  parser.add_argument(
      "--batch-size",
      type=int,
      default=0,
      help="0: the config's (32 for MIT-States)",
  )
  parser.add_argument(
      "--smoke",
      action="store_true",
      help=(
          "seconds on CPU: configs/mit.py:smoke's tiny "
          "model at 32 px, 2 steps, a small fixture"
      ),
  )
  parser.add_argument("--images-per-class", type=int, default=12)
  parser.add_argument("--test-images-per-class", type=int, default=10)
  report.add_json_out_flag(parser)
  cli.add_side_flag(parser)
  parser.add_argument("--fixture", default="", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.smoke:
    args.steps, args.warmup_steps, args.batch_size = 2, 1, 8
    args.images_per_class = args.test_images_per_class = 2
  return args


def main(argv=None):
  args = parse_args(argv)
  if cli.answer_side(args, {"jax": run_jax, "torch": run_torch}):
    return
  load_before = list(os.getloadavg())
  with tempfile.TemporaryDirectory() as folder:
    args.fixture = os.path.join(folder, "mit_states")
    args.workdir = os.path.join(folder, "work")
    images = write_mit_states(
        args.fixture, args.images_per_class, args.test_images_per_class
    )
    flags = cli.flags(args, CHILD_OPTIONS)
    # JAX first: it prepares the TFDS copy.
    jax_result = cli.run_side(__file__, "jax", flags)
    torch_result = cli.run_side(__file__, "torch", flags)
  report.emit(
      {
          "train": {
              "irtf_jax": jax_result["train_queries_per_second"],
              "torch": torch_result["train_queries_per_second"],
              "ratio": (
                  jax_result["train_queries_per_second"]
                  / torch_result["train_queries_per_second"]
              ),
          },
          "evaluate": {
              "irtf_jax": jax_result["evaluate_seconds"],
              "torch": torch_result["evaluate_seconds"],
              "ratio": (
                  torch_result["evaluate_seconds"]
                  / jax_result["evaluate_seconds"]
              ),
          },
          "device": (
              f"{jax_result['device']}, "
              f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs"
          ),
          "fixture_images": images,
          "variant": args.variant,
          "smoke": args.smoke,
          "batch_size": jax_result["batch_size"],
          "workers": args.workers,
          "irtf_jax_details": jax_result,
          "torch_details": torch_result,
          "load_average_before": load_before,
          "load_average_after": list(os.getloadavg()),
      },
      args.json_out,
  )


if __name__ == "__main__":
  main()
