"""Test setup: 8 CPU devices, set before JAX starts, and fast compilation.

Tests run small models whose time goes to XLA compilation: the persistent
compilation cache lets every test that builds a program someone already
built (a run, then its resumption; this run, then the next) load it instead.
The cache is set through the environment, so the subprocesses tests start
(the command line, notebooks, benchmarks) share it; the two-process test's
workers run without it (tests/test_parallel_multihost.py says why).

In this process the backend optimization level is 0: most programs here
compile in under the cache's 0.5 s threshold and run once, and level 0
compiles them about twice as fast (measured: `-m "not slow"` 149 s at level
0 against 203 s at the default, both with a warm cache). Tests that train
start the command line at the default level instead (tests/helpers.run_main:
the config smoke runs, the preempted runs), as do the benchmark smoke run and
the results notebook: with a warm cache that level runs their training steps
several times faster. The other notebooks keep level 0 (tests/test_notebooks.py
says why); the two-process test sets its own flags.
"""

import os
import tempfile

_CACHE = os.environ.get(
    "IRTF_JAX_TEST_CACHE",
    os.path.join(tempfile.gettempdir(), "irtf_jax_test_xla_cache"),
)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["IRTF_JAX_COMPILATION_CACHE"] = _CACHE  # irtf_jax.main's own
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
