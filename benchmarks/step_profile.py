r"""Where one JAX train step's time goes, by kind of XLA operation.

  python benchmarks/step_profile.py --image-size=224 --batch-size=32 \
      --variant=base --json-out=F

Compiles the step of `train_step.py` (the same model, batch and variants),
runs it --warmup times, then traces --steps steps with `jax.profiler` and
adds up the time of each operation of the compiled program (XLA:CPU runs
each fusion, matmul or copy as one "thunk", which the trace records with its
HLO name). Each operation is put in one kind by what its HLO computes:

  matmul         a dot (slice-im2col's GEMMs, the dense layers)
  convolution    XLA's native convolution
  patches        slices, concatenations and pads only: building
                 slice-im2col's patch matrices and scattering their
                 gradients back
  reduction      a reduce (BatchNorm's statistics, pooling, losses)
  copy           copies and transposes (layout changes)
  elementwise    any other fusion
  control        a loop's or call's own bookkeeping (its body is traced
                 operation by operation)
  <target>       a custom call, by its target (e.g. TopK)

Not every operation's event covers its work: XLA:CPU runs plain `dot`s (those
not in a YNNPACK fusion, e.g. the kernel gradients' row contractions)
asynchronously on its thread pool, and their event records only the launch
(0.5 ms for a 32-GFLOP dot contracting 107,648 rows into a 384 x 384
result). Their work is missing from "matmul"; `untimed_dots` gives how many
there are and their GFLOP per step.

`benchmarks/conv_layers.py` times each convolution alone; this shows the
whole step, where the two can disagree. Prints JSON: ms per step (wall, and
summed over operations, which exceeds the wall time where XLA runs
operations concurrently), ms per step by kind, the untimed dots, and the
slowest operations.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=wrong-import-position  # benchmarks/cli.py
import report  # pylint: disable=wrong-import-position  # benchmarks/report.py
import train_step as train_step_benchmark  # pylint: disable=wrong-import-position

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\s([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
# What a while, conditional or call runs: body=%b, to_apply=%f,
# branch_computations={%x, %y}, ...
_CONTROL_TARGETS = re.compile(
    r"(?:body|condition|to_apply|calls|true_computation|false_computation)"
    r"=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_PATCH_OPCODES = {"slice", "concatenate", "pad", "bitcast", "broadcast"}
# Instructions that run no code of their own.
_NOT_RUN = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
# Instructions whose computations run as operations of their own.
_CONTROL = ("while", "conditional", "call")
_SHAPE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT_OPERANDS = re.compile(r"\sdot\(%([\w.\-]+), %([\w.\-]+)\)")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BODY = re.compile(r"body=%([\w.\-]+)")


def hlo_computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module's text; the
  entry computation is "ENTRY"."""
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if stripped.endswith("{") and not stripped.startswith("ROOT"):
      header = stripped.split()
      if header and header[0] == "ENTRY":
        current = "ENTRY"
      elif header and header[0].startswith("%"):
        current = header[0][1:]
      else:
        continue
      computations[current] = []
    elif stripped == "}":
      current = None
    elif current is not None:
      computations[current].append(line)
  return computations


def _opcodes(computations, line: str, depth: int = 4) -> set[str]:
  """The opcode of instruction `line` and those of the computations it
  calls (a fusion's body), `depth` deep."""
  match = _INSTRUCTION.match(line)
  found = {match.group(2)} if match else set()
  if depth:
    for called in _CALLS.findall(line):
      for called_line in computations.get(called, ()):
        found |= _opcodes(computations, called_line, depth - 1)
  return found


def _run_computations(computations) -> dict[str, int]:
  """{computation: how many times it runs per execution}, for the entry
  computation and the loop bodies, branches and called computations it
  reaches: those whose instructions run as operations (not fusion bodies or
  reducers, which run inside one). A loop body runs its loop's known trip
  count times (once where XLA does not know it) per run of the computation
  holding the loop; everything else as often as its caller."""
  runs, pending = {"ENTRY": 1}, ["ENTRY"]
  while pending:
    name = pending.pop()
    for line in computations[name]:
      match = _INSTRUCTION.match(line)
      if not (match and match.group(2) in _CONTROL):
        continue
      trips = _TRIP_COUNT.search(line)
      body = _BODY.search(line)
      targets = _CONTROL_TARGETS.findall(line) + [
          target
          for branches in _BRANCHES.findall(line)
          for target in re.findall(r"%([\w.\-]+)", branches)
      ]
      for target in targets:
        if target in runs or target not in computations:
          continue
        repeats = (
            int(trips.group(1))
            if trips and body and target == body.group(1)
            else 1
        )
        runs[target] = runs[name] * repeats
        pending.append(target)
  return runs


def operation_kinds(hlo_text: str) -> dict[str, str]:
  """{instruction name: kind} (see the module docstring), for the
  instructions of the computations that `_run_computations` finds: XLA:CPU
  runs those of loop bodies and called computations as operations of their
  own (a fusion's are inside its one operation and are never traced)."""
  computations = hlo_computations(hlo_text)
  kinds = {}
  for line in (
      line
      for name in _run_computations(computations)
      for line in computations[name]
  ):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    if opcode in _NOT_RUN:
      continue
    if opcode in _CONTROL:
      # Its own time only: what its body runs is traced op by op.
      kinds[name] = "control"
      continue
    opcodes = _opcodes(computations, line)
    target = _CUSTOM_CALL_TARGET.search(line)
    if "dot" in opcodes:
      kinds[name] = "matmul"
    elif "convolution" in opcodes:
      kinds[name] = "convolution"
    elif opcode == "custom-call" and target:
      kinds[name] = target.group(1)
    elif "reduce" in opcodes or "reduce-window" in opcodes:
      kinds[name] = "reduction"
    elif opcodes & {"copy", "transpose"}:
      kinds[name] = "copy"
    elif opcodes - {"fusion", "parameter", "constant"} <= _PATCH_OPCODES:
      kinds[name] = "patches"
    else:
      kinds[name] = "elementwise"
  return kinds


def untimed_dots(hlo_text: str) -> dict[str, float]:
  """{name: GFLOP per execution} of the plain `dot` operations, which
  XLA:CPU runs asynchronously and whose trace events cover only their
  launch; a dot in a loop body counts once per iteration."""
  computations = hlo_computations(hlo_text)
  gflop = {}
  for name, runs in _run_computations(computations).items():
    lines = computations[name]
    shapes = {}
    for line in lines:
      match = _SHAPE.match(line)
      if match:
        shapes[match.group(1)] = [
            int(d) for d in match.group(2).split(",") if d
        ]
    for line in lines:
      match = _INSTRUCTION.match(line)
      operands = _DOT_OPERANDS.search(line)
      contracting = _LHS_CONTRACTING.search(line)
      if not (match and match.group(2) == "dot" and operands and contracting):
        continue
      lhs = shapes[operands.group(1)]
      depth = math.prod(lhs[int(d)] for d in contracting.group(1).split(","))
      gflop[match.group(1)] = (
          2 * math.prod(shapes[match.group(1)]) * depth * 1e-9 * runs
      )
  return gflop


def traced_operation_seconds(trace_folder: str) -> dict[str, float]:
  """{HLO operation name: seconds summed over the trace} from the Perfetto
  trace that `jax.profiler` wrote under `trace_folder`."""
  (path,) = glob.glob(
      os.path.join(trace_folder, "**", "*.trace.json.gz"), recursive=True
  )
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  seconds = collections.Counter()
  for event in events:
    operation = event.get("args", {}).get("hlo_op")
    if event.get("ph") == "X" and operation:
      seconds[operation] += event["dur"] * 1e-6
  return dict(seconds)


def profile(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from irtf_jax import models  # pylint: disable=g-import-not-at-top
  from irtf_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  batch = jax.device_put(
      train_step_benchmark.random_batch(0, args.batch_size, args.image_size)
  )
  config = train_step_benchmark.jax_config(args.variant)
  config.batch_size = args.batch_size
  if args.smoke:
    config.model.image_encoder.depth = 10
  model = models.build_model(config.model, train_step_benchmark.VOCAB_SIZE)
  tx = ts.make_optimizer(config)
  state = jax.jit(lambda rng: ts.init_state(model, tx, batch, rng))(
      jax.random.key(0)
  )
  step = train_step_benchmark.jit_jax_step(model, tx, config)
  rng = jax.random.key(1)
  hlo_text = step.lower(state, batch, rng).compile().as_text()
  kinds = operation_kinds(hlo_text)
  dots = untimed_dots(hlo_text)
  for _ in range(args.warmup):
    state, _ = step(state, batch, rng)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, _ = step(state, batch, rng)
    jax.block_until_ready(state)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    seconds = traced_operation_seconds(folder)
  per_step_ms = {name: 1e3 * s / args.steps for name, s in seconds.items()}
  by_kind = collections.Counter()
  for name, ms in per_step_ms.items():
    by_kind[kinds.get(name, "other")] += ms
  slowest = sorted(per_step_ms.items(), key=lambda item: -item[1])
  return {
      "variant": args.variant,
      "image_size": args.image_size,
      "batch_size": args.batch_size,
      "steps": args.steps,
      "backend": jax.default_backend(),
      "ms_per_step": 1e3 * wall / args.steps,
      "operations_ms_per_step": sum(per_step_ms.values()),
      "by_kind_ms_per_step": dict(by_kind.most_common()),
      "untimed_dots": {
          "count": len(dots),
          "gflop_per_step": sum(dots.values()),
      },
      "slowest": [
          {"operation": name, "kind": kinds.get(name, "other"), "ms": ms}
          for name, ms in slowest[: args.top]
      ],
  }


def parse_args(argv=None):
  parser = cli.step_parser(__doc__, image_size=224)
  parser.add_argument(
      "--variant",
      default="base",
      choices=train_step_benchmark.VARIANTS,
      help="the train_step.py variant",
  )
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--steps", type=int, default=2, help="steps traced")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument(
      "--smoke",
      action="store_true",
      help="a ResNet-10 at the given size, for a test of this script",
  )
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  report.emit(profile(args), args.json_out)


if __name__ == "__main__":
  main()
