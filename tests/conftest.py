"""Test setup: 8 CPU devices, set before JAX starts, and fast compilation.

Tests run tiny models whose time goes to XLA compilation, not execution: the
backend optimization level 0 halves compile time, and the persistent
compilation cache lets tests that build the same program several times (a
run, then its resumption) compile it once.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# One cache for every pytest worker process (and later runs).
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "IRTF_JAX_TEST_CACHE",
        os.path.join(tempfile.gettempdir(), "irtf_jax_test_xla_cache"),
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
