"""regularizers.sampling: the hashed sampler's bits, erfinv and normal draws,
the threefry draws, and the choice per backend."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from irtf_jax import regularizers as ga
from irtf_jax.regularizers import sampling


def test_erfinv_matches_scipy_in_float64_into_the_tails():
  from scipy import special  # pylint: disable=g-import-not-at-top
  # The symmetric 23-bit grid the sampler feeds it, sampled densely near 0
  # and into both extreme cells.
  grid = np.concatenate([
      np.linspace(-1, 1, 200001)[1:-1],
      1 - 2.0 ** -np.arange(1, 24),
      -1 + 2.0 ** -np.arange(1, 24),
  ])
  grid = grid.astype(np.float32)
  got = np.asarray(jax.jit(sampling.erfinv)(grid), np.float64)
  want = special.erfinv(grid.astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sampler", ["hashed", "threefry"])
def test_normal_samplers_are_standard_normal(sampler):
  from scipy import stats  # pylint: disable=g-import-not-at-top

  n = 2**20
  draw = sampling.normal_sampler(sampler)
  samples = np.asarray(
      jax.jit(draw, static_argnums=(1, 2))(jax.random.key(3), (n,), np.float32),
      np.float64,
  )
  # Kolmogorov-Smirnov against N(0, 1); moments within 5 standard errors.
  assert stats.kstest(samples, "norm").pvalue > 1e-3
  assert abs(samples.mean()) < 5 / math.sqrt(n)
  assert abs(samples.var() - 1) < 5 * math.sqrt(2 / n)
  assert abs(stats.skew(samples)) < 5 * math.sqrt(6 / n)
  assert abs(stats.kurtosis(samples)) < 5 * math.sqrt(24 / n)
  # Same resolution as jax.random.normal: tails reach past 4.5 sigma in 2^20.
  assert 4.5 < np.abs(samples).max() < 5.4


def test_hashed_bits_are_a_keyed_bijection_of_the_index():
  a = np.asarray(ga.hashed_bits(jax.random.key(0), (256, 1024)))
  b = np.asarray(ga.hashed_bits(jax.random.key(1), (256, 1024)))
  assert a.dtype == np.uint32
  assert np.unique(a).size == a.size  # No word repeats within one draw.
  # Another key gives unrelated words: bitwise agreement ~ 1/2, and the two
  # draws' normals are uncorrelated.
  agreement = np.unpackbits((~(a ^ b)).view(np.uint8)).mean()
  assert abs(agreement - 0.5) < 5 * 0.5 / math.sqrt(32 * a.size)
  # Every bit position is fair.
  bits = np.unpackbits(a.view(np.uint8)).reshape(a.size, 32).mean(0)
  assert np.all(np.abs(bits - 0.5) < 5 * 0.5 / math.sqrt(a.size))
  with pytest.raises(ValueError, match="2\\^32 elements"):
    ga.hashed_bits(jax.random.key(0), (2**16, 2**16))


def test_auto_sampler_is_hashed_on_cpu_and_threefry_elsewhere():
  assert sampling.normal_sampler("auto", backend="cpu") is ga.hashed_normal
  for backend in ("gpu", "tpu"):
    assert sampling.normal_sampler("auto", backend=backend) is jax.random.normal
    assert (
        sampling.uniform_sampler("auto", backend=backend)
        is sampling.threefry_uniform
    )
  assert sampling.uniform_sampler("hashed") is sampling.hashed_uniform
  custom = lambda key, shape, dtype: None
  assert sampling.normal_sampler(custom) is custom
  with pytest.raises(ValueError, match="sampler='philox'"):
    sampling.normal_sampler("philox")


def test_the_package_depends_on_jax_and_optax_only():
  """Importing irtf_jax.regularizers loads nothing beyond what jax and optax
  load themselves, and no other part of irtf_jax."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  script = (
      "import sys\n"
      "import jax, optax\n"
      "before = {m.split('.')[0] for m in sys.modules}\n"
      "import irtf_jax.regularizers\n"
      "added = {m for m in sys.modules if m.split('.')[0] not in before}\n"
      "print(sorted(added))\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, check=True
  ).stdout
  added = eval(out)  # pylint: disable=eval-used
  assert added and all(
      m == "irtf_jax" or m.startswith("irtf_jax.regularizers") for m in added
  ), added
