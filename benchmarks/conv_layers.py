r"""Per-layer convolution timings: each `layers.Conv` formulation and PyTorch.

  python benchmarks/conv_layers.py --image-size=224 --batch-size=32 \
      --implementations=lax,im2col,auto --json-out=F

Times every distinct convolution of the benchmarked model (ResNet-18 in
torchvision's layout and TIRG-LastConv's four convolutions on the last map)
at the given image size and batch, in three passes:

  fwd     y = conv(x, w)
  grad    gradient of sum(y * r) w.r.t. x and w (the base train step's work;
          w alone for the stem, whose input gradient the step never needs)
  double  gradient w.r.t. w of sum(tanh(y) * r) + sum(|d/dx sum(tanh(y) * r)|)
          (adversarial GA's double backprop through one layer of the query
          image's encoder)

for each JAX formulation named in --implementations (see
`irtf_jax.models.layers.CONV_IMPLEMENTATIONS`; "auto" is what the model
uses on this backend) and for PyTorch's `nn.Conv2d` (NCHW, eager, the
reference of benchmarks/train_step.py). All formulations of one layer run
interleaved, round after round, in this one process, so a change of load on
a shared machine hits them alike; per pass the minimum and the median over
--rounds are reported (the minimum is the least disturbed).

`per_step_ms` weighs each layer by how often a train step runs it (the
ResNet convolutions twice, for the query and the target image; the
composer's once) and sums the minima: the convolutions' share of one base
step ("base": grad everywhere) and of one adversarial step ("adversarial":
double on the query side, grad on the target side), per formulation and for
the fastest JAX formulation of each layer ("best_jax"). Printed as a table on
stderr, JSON on stdout.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=wrong-import-position  # benchmarks/cli.py
import report  # pylint: disable=wrong-import-position  # benchmarks/report.py

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from irtf_jax.models import layers

PASSES = ("fwd", "grad", "double")


def conv_row(name: str, h, c, o, k, s, p, count: int, **extra) -> dict:
  """One convolution: h x h x c input, o outputs, k x k kernel, stride s,
  symmetric padding p, run `count` times a train step."""
  return dict(name=name, h=h, c=c, o=o, k=k, s=s, p=p, count=count, **extra)


def model_convolutions(image_size: int) -> list[dict]:
  """Distinct convolutions of ResNet-18 + TIRG-LastConv at `image_size`.

  Returns:
    dicts with name, h (= w, input side), c, o, k, s, p (symmetric padding),
    count (runs per train step: query and target image for the ResNet) and
    query_count (those on the query side, where adversarial GA's double
    backprop runs).
  """
  side = lambda h, k, s, p: (h + 2 * p - k) // s + 1
  convs = [conv_row("conv1", image_size, 3, 64, 7, 2, 3, count=2, stem=True)]
  h = side(side(image_size, 7, 2, 3), 3, 2, 1)  # stem conv, then max-pool
  c = 64
  for stage, width in enumerate((64, 128, 256, 512)):
    name = f"layer{stage + 1}"
    if stage == 0:  # stride 1 throughout
      convs.append(conv_row(f"{name}_*/conv (4 of 4)", h, c, width, 3, 1, 1, 8))
    else:
      convs.append(conv_row(f"{name}_0/conv1", h, c, width, 3, 2, 1, 2))
      convs.append(conv_row(f"{name}_0/downsample", h, c, width, 1, 2, 0, 2))
      h = side(h, 3, 2, 1)
      # The remaining three 3x3 convolutions of the stage are stride 1.
      convs.append(
          conv_row(f"{name}_*/conv (3 of 4)", h, width, width, 3, 1, 1, 6)
      )
    c = width
  for conv in convs:  # the ResNet runs on the query and the target image
    conv["query_count"] = conv["count"] // 2
  # TIRG-LastConv's gate and residual branches, on the query side only.
  for i, outputs in ((1, 2 * c), (2, c)):
    name = f"composer/*_conv{i} (gate, res)"
    convs.append(conv_row(name, h, 2 * c, outputs, 3, 1, 1, 2, query_count=2))
  return convs


def jax_passes(conv, x, w, r, stem: bool):
  """Compiled fwd / grad / double of `conv(x, w)`; each returns arrays."""

  def fwd(x, w):
    return conv(x, w)

  def grad(x, w):
    return jax.grad(
        lambda x, w: jnp.sum(conv(x, w) * r), argnums=1 if stem else (0, 1)
    )(x, w)

  def double(x, w):
    def loss(x, w):
      return jnp.sum(jnp.tanh(conv(x, w)) * r)

    def penalized(w):
      return loss(x, w) + jnp.sum(jnp.abs(jax.grad(loss)(x, w)))

    return jax.grad(penalized)(w)

  return {
      name: jax.jit(f)
      for name, f in (("fwd", fwd), ("grad", grad), ("double", double))
  }


def torch_passes(
    layer: dict, x: np.ndarray, w: np.ndarray, r: np.ndarray
) -> dict:
  """The same three passes with torch.nn.functional.conv2d (NCHW)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
  tr = torch.from_numpy(r.transpose(0, 3, 1, 2).copy())
  conv = lambda x, w: F.conv2d(x, w, stride=layer["s"], padding=layer["p"])

  def fwd():
    with torch.no_grad():
      return conv(tx, tw)

  def grad():
    x, w = tx.requires_grad_(not layer.get("stem")), tw.requires_grad_(True)
    return torch.autograd.grad(
        (conv(x, w) * tr).sum(), (w,) if layer.get("stem") else (x, w)
    )

  def double():
    x, w = tx.requires_grad_(True), tw.requires_grad_(True)
    loss = (torch.tanh(conv(x, w)) * tr).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return torch.autograd.grad(loss + gx.abs().sum(), w)

  return {"fwd": fwd, "grad": grad, "double": double}


def time_layer(
    layer: dict,
    implementations,
    passes,
    rounds: int,
    batch_size: int,
    with_torch: bool,
) -> dict:
  """{formulation: {pass: {"min_ms", "median_ms"}}} for one layer."""
  rng = np.random.default_rng(0)
  k, s, p = layer["k"], layer["s"], layer["p"]
  x = rng.standard_normal(
      (batch_size, layer["h"], layer["h"], layer["c"]), dtype=np.float32
  )
  w = rng.standard_normal((k, k, layer["c"], layer["o"]), dtype=np.float32)
  w /= np.sqrt(k * k * layer["c"])
  out = (layer["h"] + 2 * p - k) // s + 1
  r = rng.standard_normal((batch_size, out, out, layer["o"]), dtype=np.float32)
  jx, jw, jr = jnp.asarray(x), jnp.asarray(w), jnp.asarray(r)
  runners = {}
  for impl in implementations:
    try:
      conv = layers.conv_function(
          impl,
          kernel_size=(k, k),
          strides=(s, s),
          padding=((p, p), (p, p)),
          input_hw=(layer["h"], layer["h"]),
          in_channels=layer["c"],
      )
    except ValueError:  # the formulation does not cover this convolution
      continue
    compiled = jax_passes(conv, jx, jw, jr, bool(layer.get("stem")))
    for name in passes:
      fn = compiled[name]
      args = (jx, jw)
      runners[(impl, name)] = lambda fn=fn, args=args: jax.block_until_ready(
          fn(*args)
      )
  if with_torch:
    for name, fn in torch_passes(layer, x, w, r).items():
      if name in passes:
        runners[("torch", name)] = fn
  for run in runners.values():  # compile and warm up
    run()
  seconds = {key: [] for key in runners}
  for _ in range(rounds):
    for key, run in runners.items():
      start = time.perf_counter()
      run()
      seconds[key].append(time.perf_counter() - start)
  result: dict = {}
  for (impl, name), values in seconds.items():
    result.setdefault(impl, {})[name] = {
        "min_ms": 1e3 * min(values),
        "median_ms": 1e3 * statistics.median(values),
    }
  return result


def per_step(table: list[dict], formulations) -> dict:
  """Convolution ms of one base and one adversarial step per formulation and
  for the per-layer fastest JAX formulation ("best_jax"), from the minima."""

  def ms(layer, impl, name):
    times = layer["ms"]
    if impl == "best_jax":
      candidates = [
          v[name]["min_ms"]
          for f, v in times.items()
          if f != "torch" and name in v
      ]
      return min(candidates) if candidates else None
    return times.get(impl, {}).get(name, {}).get("min_ms")

  def total(impl, weights):
    """Sum of weight * ms over layers and passes; None if one is missing."""
    result = 0.0
    for layer in table:
      for name, weight in weights(layer).items():
        value = ms(layer, impl, name) if weight else 0.0
        if value is None:
          return None
        result += weight * value
    return result

  schemes = {
      "base": lambda layer: {"grad": layer["count"]},
      "adversarial": lambda layer: {
          "double": layer["query_count"],
          "grad": layer["count"] - layer["query_count"],
      },
  }
  totals = {}
  for scheme, weights in schemes.items():
    totals[scheme] = {}
    for impl in list(formulations) + ["best_jax"]:
      value = total(impl, weights)
      if value is not None:
        totals[scheme][impl] = value
  return totals


def print_table(table: list[dict], formulations, passes) -> None:
  """Minimum ms per layer, formulation and pass ("-": not applicable)."""
  print(
      "layer".ljust(34)
      + "".join(f"{f} {p}".rjust(20) for p in passes for f in formulations),
      file=sys.stderr,
  )
  for layer in table:
    row = (
        f"{layer['name'][:22]} {layer['h']}x{layer['c']}>{layer['o']} "
        f"k{layer['k']}s{layer['s']}"
    )[:33].ljust(34)
    for p in passes:
      for f in formulations:
        value = layer["ms"].get(f, {}).get(p)
        row += f"{value['min_ms']:20.1f}" if value else "-".rjust(20)
    print(row, file=sys.stderr)


def main(argv=None):
  parser = cli.step_parser(__doc__, image_size=224)
  parser.add_argument(
      "--implementations",
      default="lax,im2col,auto",
      help="comma-separated layers.CONV_IMPLEMENTATIONS",
  )
  parser.add_argument("--passes", default=",".join(PASSES))
  parser.add_argument(
      "--layers",
      default="",
      help=(
          "only layers whose name matches one of these "
          "comma-separated regular expressions (re.search)"
      ),
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  implementations = cli.comma_list(
      parser,
      "--implementations",
      args.implementations,
      layers.CONV_IMPLEMENTATIONS,
  )
  passes = cli.comma_list(parser, "--passes", args.passes, PASSES)
  with_torch = not args.no_torch
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(os.cpu_count() or 1)
  selected = [
      layer
      for layer in model_convolutions(args.image_size)
      if not args.layers
      or any(
          re.search(pattern, layer["name"])
          for pattern in args.layers.split(",")
      )
  ]
  load_before = list(os.getloadavg())
  table = []
  for layer in selected:
    layer = dict(
        layer,
        ms=time_layer(
            layer,
            implementations,
            passes,
            args.rounds,
            args.batch_size,
            with_torch,
        ),
    )
    table.append(layer)
    print(
        f"{layer['name']}: "
        + ", ".join(
            f"{f} {p} {v[p]['min_ms']:.0f}"
            for f, v in layer["ms"].items()
            for p in passes
        ),
        file=sys.stderr,
        flush=True,
    )
  formulations = implementations + (["torch"] if with_torch else [])
  print_table(table, formulations, passes)
  report.emit(
      {
          "image_size": args.image_size,
          "batch_size": args.batch_size,
          "rounds": args.rounds,
          "layers": table,
          "per_step_ms": per_step(table, formulations),
          "device": (
              f"{jax.devices()[0].device_kind}, "
              f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs"
          ),
          "load_average_before": load_before,
          "load_average_after": list(os.getloadavg()),
      },
      args.json_out,
  )


if __name__ == "__main__":
  main()
