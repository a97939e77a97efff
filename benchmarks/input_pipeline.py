r"""Images/s of 224x224 JPEG decode + resize + centre crop, by worker count.

  python benchmarks/input_pipeline.py --workers=0,1,2,4 --images=1024

Writes its own JPEG fixtures (random 320x240 pictures with smooth content, so
they compress like photos) into a temporary folder, then reads them through
`irtf_jax.data.pipeline.training_batches`: each "step" decodes one batch of
files with `image_files.resize_and_center_crop` (TIRG's test transform, what
MIT-States and Fashion200k use). 0 workers decodes in this process (the
trainer's in-thread path). The evaluation decodes the same batches in
`config.data.workers` threads instead (`pipeline.mapped_ahead`), timed as
`evaluation_images_per_second`. Prints JSON with images/s per worker count,
over the second half of the batches (the steady state a training run sees).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import cli  # benchmarks/cli.py
import numpy as np
from PIL import Image
import report  # benchmarks/report.py

from irtf_jax.data import image_files
from irtf_jax.data import pipeline


def photo_like(
    rng: np.random.Generator, width: int = 320, height: int = 240
) -> Image.Image:
  """Random smooth content (a bicubic blow-up of 6x8 random colours), which
  JPEG compresses about as well as a photo."""
  low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  return Image.fromarray(low).resize((width, height), Image.BICUBIC)


def write_jpegs(folder: str, count: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    path = os.path.join(folder, f"{i:05d}.jpg")
    photo_like(rng).save(path, format="JPEG", quality=90)
    paths.append(path)
  return paths


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
  """step -> uint8 (batch, size, size, 3), decoded from files; picklable."""

  paths: tuple[str, ...]
  batch_size: int
  size: int

  def __call__(self, step: int) -> dict:
    start = step * self.batch_size
    out = []
    for i in range(start, start + self.batch_size):
      with Image.open(self.paths[i % len(self.paths)]) as img:
        out.append(image_files.resize_and_center_crop(img, self.size))
    return {"image": np.stack(out)}


def steady_images_per_second(batches, batch_size: int) -> float:
  """Images/s over the second half of `batches`: the first half absorbs the
  workers' start-up and their first batches, which a run of a few hundred
  steps amortizes and a benchmark of a few dozen would not."""
  arrivals = [time.perf_counter() for _ in batches]
  half = len(arrivals) // 2
  return (
      (len(arrivals) - 1 - half) * batch_size / (arrivals[-1] - arrivals[half])
  )


def images_per_second(decode: DecodeBatch, steps: int, workers: int) -> float:
  batches = pipeline.training_batches(decode, range(steps), workers)
  return steady_images_per_second(batches, decode.batch_size)


def evaluation_images_per_second(
    decode: DecodeBatch, steps: int, threads: int
) -> float:
  batches = pipeline.mapped_ahead(decode, range(steps), threads)
  return steady_images_per_second(batches, decode.batch_size)


def main():
  parser = cli.step_parser(__doc__, image_size=224)
  parser.add_argument("--workers", default=f"0,1,2,{os.cpu_count()}")
  parser.add_argument("--images", type=int, default=1024)
  args = parser.parse_args()
  workers = sorted({int(w) for w in args.workers.split(",")})
  with tempfile.TemporaryDirectory() as folder:
    paths = write_jpegs(folder, args.images)
    decode = DecodeBatch(tuple(paths), args.batch_size, args.image_size)
    steps = max(4, args.images // args.batch_size)
    result = {
        "cpus": os.cpu_count(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": steps,
        "load_average": list(os.getloadavg()),
        "images_per_second": {
            str(w): images_per_second(decode, steps, w) for w in workers
        },
        "evaluation_images_per_second": {
            str(w): evaluation_images_per_second(decode, steps, w)
            for w in workers
        },
    }
  report.emit(result, args.json_out)


if __name__ == "__main__":
  main()
