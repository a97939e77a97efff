"""Ranking benchmark: the project's chunked top-k evaluator against TIRG's full-matrix argsort.

Usage:
  python benchmarks/ranking.py --queries=30000 --gallery=30000 --json-out=/tmp/ranking.json
  python benchmarks/ranking.py --queries=100000 --gallery=100000 --json-out=/tmp/ranking100k.json

Both methods rank the same synthetic problem: N random unit gallery features
of dimension D whose N captions repeat (N / 4 distinct caption ids by default),
Q queries, each a noisy copy of one gallery image (unit norm), with its source
image excluded and the target's caption as its label. Recall@K is computed
for K in {1, 5, 10, 50, 100}.

- project: `irtf_jax.ranking.top_k_neighbours` (query chunks scored and
  reduced by `lax.top_k` on the default JAX device) then `recall_from_neighbours`;
  the reported time is the fastest of --repeats compiled runs (the first,
  compiling run is reported too).
- naive (TIRG's evaluation): the full Q x N similarity matrix on the host with
  NumPy, the source column set to -1e10, then a full `np.argsort(-sims[i])[:110]`
  per query. When Q exceeds --naive-queries it runs on the first
  --naive-queries queries and its time is scaled linearly to Q
  ("extrapolated": true). Its time is the fastest of --repeats runs, split
  into the similarity matrix and the argsorts.

- matmul floor: the bare float32 (Q, N) score matmul every exact method
  pays, timed two ways in the same run: XLA in the project's chunking
  (`ranking.query_chunks` of at most `chunk_size` query rows per compiled
  call, contracting the (N, D) gallery's feature axis, as `top_k_neighbours`
  computes its scores) and NumPy's BLAS in row chunks of
  at most 512 MB of scores ("chunked to fit memory"). The faster is
  `matmul_floor_seconds`; `project_over_floor` is the project's time over it.

Each method runs in its own spawned process, whose peak resident memory
(`resource.getrusage`) is reported; it includes the interpreter, the imported
libraries and the generated inputs, whose share is the peak before ranking
("peak_rss_mb_before_ranking"). The recalls of both methods over the
queries the naive method ranked must be identical, else the script exits 1.
JSON goes to stdout and to --json-out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import pathlib
import resource
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import report  # pylint: disable=wrong-import-position  # benchmarks/report.py

KS = (1, 5, 10, 50, 100)
NAIVE_NEIGHBOURS = 110  # TIRG keeps the first 110 of each argsort.


def make_problem(
    queries: int, gallery: int, dim: int, captions: int, noise: float, seed: int
):
  """The synthetic ranking problem, identical in every process for the same arguments.

  Returns:
    dict with query_features (Q, D) and gallery_features (N, D) float32 unit
    vectors, gallery_ids (N,), query_target_ids (Q,) and source_index (Q,).
  """
  rng = np.random.default_rng(seed)
  gallery_features = rng.standard_normal((gallery, dim), dtype=np.float32)
  gallery_features /= np.linalg.norm(gallery_features, axis=1, keepdims=True)
  gallery_ids = rng.permutation(np.arange(gallery) % captions)
  source_index = rng.integers(0, gallery, size=queries)
  target_index = (
      source_index + rng.integers(1, gallery, size=queries)
  ) % gallery
  query_features = rng.standard_normal((queries, dim), dtype=np.float32)
  query_features *= noise / np.sqrt(dim, dtype=np.float32)
  query_features += gallery_features[target_index]
  query_features /= np.linalg.norm(query_features, axis=1, keepdims=True)
  return dict(
      query_features=query_features,
      gallery_features=gallery_features,
      gallery_ids=gallery_ids,
      query_target_ids=gallery_ids[target_index],
      source_index=source_index,
  )


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_project(
    problem_args: dict, chunk_size: int, subset: int, repeats: int
) -> dict:
  """Child process: rank with the project's evaluator; recall over all queries and over `subset`.

  Times one compiling call, then the fastest of `repeats` compiled calls.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from irtf_jax import ranking  # pylint: disable=import-outside-toplevel

  problem = make_problem(**problem_args)
  inputs_peak_rss_mb = peak_rss_mb()

  def rank():
    _, indices = ranking.top_k_neighbours(
        problem["query_features"],
        problem["gallery_features"],
        max(KS),
        exclude=problem["source_index"],
        chunk_size=chunk_size,
    )
    return indices, ranking.recall_from_neighbours(
        indices, problem["query_target_ids"], problem["gallery_ids"], KS
    )

  start = time.perf_counter()
  rank()
  first_call_seconds = time.perf_counter() - start
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    indices, recall = rank()
    timings.append(time.perf_counter() - start)
  seconds = min(timings)
  subset_recall = ranking.recall_from_neighbours(
      indices[:subset],
      problem["query_target_ids"][:subset],
      problem["gallery_ids"],
      KS,
  )
  device = jax.devices()[0]
  return dict(
      seconds=seconds,
      first_call_seconds=first_call_seconds,
      peak_rss_mb=peak_rss_mb(),
      peak_rss_mb_before_ranking=inputs_peak_rss_mb,
      chunk_size=chunk_size,
      recall={str(k): v for k, v in recall.items()},
      recall_on_naive_queries={str(k): v for k, v in subset_recall.items()},
      device=(
          f"{device.platform}: {device.device_kind}, {os.cpu_count()} host CPU"
          " cores"
      ),
  )


def run_xla_matmul(problem_args: dict, chunk_size: int, repeats: int) -> dict:
  """Child process: the score matmul alone, in the project's chunks (fastest of `repeats`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from irtf_jax import ranking  # pylint: disable=import-outside-toplevel

  problem = make_problem(**problem_args)
  queries = jnp.asarray(problem["query_features"])
  # (N, D), contracted on D as the project's ranking does (faster on XLA:CPU
  # than a pre-transposed (D, N) gallery).
  gallery = jnp.asarray(problem["gallery_features"])
  chunk_size, num_chunks = ranking.query_chunks(queries.shape[0], chunk_size)
  queries = jnp.pad(
      queries, ((0, num_chunks * chunk_size - queries.shape[0]), (0, 0))
  )
  scores = jax.jit(
      lambda q, g: jax.lax.dot_general(
          q,
          g,
          (((1,), (1,)), ((), ())),
          precision=jax.lax.Precision.HIGHEST,
      )
  )

  def run():
    for start in range(0, num_chunks * chunk_size, chunk_size):
      # One chunk's scores at a time, as the ranking holds them.
      scores(queries[start : start + chunk_size], gallery).block_until_ready()

  run()  # compile
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    timings.append(time.perf_counter() - start)
  return dict(
      seconds=min(timings), chunk_size=chunk_size, peak_rss_mb=peak_rss_mb()
  )


def run_numpy_matmul(problem_args: dict, repeats: int) -> dict:
  """Child process: the score matmul alone with NumPy's BLAS, in row chunks of at most 512 MB."""
  problem = make_problem(**problem_args)
  queries, gallery = problem["query_features"], problem["gallery_features"]
  rows = max(1, min(queries.shape[0], 2**27 // gallery.shape[0]))
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    for first in range(0, queries.shape[0], rows):
      queries[first : first + rows].dot(gallery.T)
    timings.append(time.perf_counter() - start)
  return dict(
      seconds=min(timings),
      chunk_rows=rows,
      peak_rss_mb=peak_rss_mb(),
      blas=blas_name(),
  )


def blas_name() -> str:
  """The BLAS NumPy calls, as `numpy.show_config` names it."""
  try:
    return str(
        np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    )
  except Exception:  # pylint: disable=broad-except  # older NumPy: no dicts mode
    return "unknown"


def naive_recall(queries, gallery_features, sources, targets, gallery_ids):
  """TIRG's evaluation: full host similarity matrix, one full argsort per query.

  Returns:
    (recall {"K": r}, seconds of the similarity matrix, seconds of the rest).
  """
  start = time.perf_counter()
  sims = queries.dot(gallery_features.T)
  similarity_seconds = time.perf_counter() - start
  for i, source in enumerate(sources):
    sims[i, source] = -1e10
  neighbours = [
      np.argsort(-sims[i, :])[:NAIVE_NEIGHBOURS] for i in range(sims.shape[0])
  ]
  recall = {}
  for k in KS:
    hits = sum(
        bool((gallery_ids[neighbours[i][:k]] == targets[i]).any())
        for i in range(len(targets))
    )
    recall[str(k)] = hits / len(targets)
  return (
      recall,
      similarity_seconds,
      time.perf_counter() - start - similarity_seconds,
  )


def run_naive(problem_args: dict, subset: int, repeats: int) -> dict:
  """Child process: TIRG's evaluation on the first `subset` queries, fastest of `repeats` runs."""
  problem = make_problem(**problem_args)
  inputs_peak_rss_mb = peak_rss_mb()
  runs = [
      naive_recall(
          problem["query_features"][:subset],
          problem["gallery_features"],
          problem["source_index"][:subset],
          problem["query_target_ids"][:subset],
          problem["gallery_ids"],
      )
      for _ in range(repeats)
  ]
  recall, similarity_seconds, ranking_seconds = min(
      runs, key=lambda run: run[1] + run[2]
  )
  return dict(
      measured_seconds=similarity_seconds + ranking_seconds,
      measured_similarity_seconds=similarity_seconds,
      measured_argsort_seconds=ranking_seconds,
      measured_queries=subset,
      peak_rss_mb=peak_rss_mb(),
      peak_rss_mb_before_ranking=inputs_peak_rss_mb,
      recall=recall,
  )


def in_child(function, *args) -> dict:
  """Runs `function(*args)` in a fresh spawned process (its own peak RSS)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=1, mp_context=context
  ) as executor:
    return executor.submit(function, *args).result()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--queries", type=int, default=30000, help="Q, number of queries"
  )
  parser.add_argument(
      "--gallery", type=int, default=30000, help="N, gallery size"
  )
  parser.add_argument(
      "--dim", type=int, default=512, help="D, feature dimension"
  )
  parser.add_argument(
      "--captions",
      type=int,
      default=0,
      help="distinct caption ids in the gallery (default N / 4)",
  )
  parser.add_argument(
      "--noise",
      type=float,
      default=7.0,
      help="norm of the noise added to a target feature to make its query",
  )
  parser.add_argument(
      "--chunk-size", type=int, default=1024, help="queries per compiled call"
  )
  parser.add_argument(
      "--naive-queries",
      type=int,
      default=2000,
      help=(
          "queries the naive method ranks; its time is scaled to Q beyond this"
      ),
  )
  parser.add_argument(
      "--repeats",
      type=int,
      default=2,
      help=(
          "timed runs per method (after the project's compiling run); "
          "the fastest counts"
      ),
  )
  parser.add_argument("--seed", type=int, default=0)
  report.add_json_out_flag(parser)
  args = parser.parse_args(argv)
  if args.gallery < NAIVE_NEIGHBOURS or args.queries < 1 or args.repeats < 1:
    parser.error(
        f"--gallery must be at least {NAIVE_NEIGHBOURS}, --queries and"
        " --repeats at least 1"
    )
  captions = args.captions or max(1, args.gallery // 4)
  problem_args = dict(
      queries=args.queries,
      gallery=args.gallery,
      dim=args.dim,
      captions=captions,
      noise=args.noise,
      seed=args.seed,
  )
  subset = min(args.queries, args.naive_queries)

  project = in_child(
      run_project, problem_args, args.chunk_size, subset, args.repeats
  )
  xla_matmul = in_child(
      run_xla_matmul, problem_args, args.chunk_size, args.repeats
  )
  numpy_matmul = in_child(run_numpy_matmul, problem_args, args.repeats)
  floor = min(xla_matmul["seconds"], numpy_matmul["seconds"])
  naive = in_child(run_naive, problem_args, subset, args.repeats)
  naive["extrapolated"] = subset < args.queries
  naive["seconds"] = naive["measured_seconds"] * args.queries / subset
  # TIRG's method holds the whole (Q, N) float32 similarity matrix.
  naive["similarity_matrix_mb_at_full_size"] = (
      args.queries * args.gallery * 4 / 2**20
  )
  identical = project["recall_on_naive_queries"] == naive["recall"]
  result = dict(
      project={
          key: project[key]
          for key in (
              "seconds",
              "first_call_seconds",
              "peak_rss_mb",
              "peak_rss_mb_before_ranking",
              "chunk_size",
              "recall",
              "recall_on_naive_queries",
          )
      },
      naive=naive,
      matmul_floor_seconds=floor,
      matmul_floor={
          "xla_project_chunks": xla_matmul,
          "numpy_blas_chunks": numpy_matmul,
          "fastest": (
              "xla_project_chunks"
              if xla_matmul["seconds"] <= numpy_matmul["seconds"]
              else "numpy_blas_chunks"
          ),
      },
      project_over_floor=project["seconds"] / floor,
      speedup=naive["seconds"] / project["seconds"],
      recalls_identical=identical,
      queries=args.queries,
      gallery=args.gallery,
      dim=args.dim,
      captions=captions,
      noise=args.noise,
      seed=args.seed,
      repeats=args.repeats,
      device=project["device"],
  )
  report.emit(result, args.json_out)
  if not identical:
    print(
        "recalls differ between the project's ranking and the naive ranking on"
        " the same queries",
        file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
