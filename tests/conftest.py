"""Test-wide JAX settings: float64 available, strict dtype promotion, rank promotion raises.

Library code names every dtype, so strict promotion catches silent float32 -> float64
upcasts (and the reverse) and implicit broadcasting of mismatched ranks.

Compile time is most of the suite's time (many small CLI runs build the same programs in
new closures), so the session shares one persistent XLA compilation cache: a fresh
directory per session, created by the controlling process, inherited by the xdist
workers and by every child process the tests start (through ``JAX_COMPILATION_CACHE_DIR``),
and removed at the end. A cache hit loads the executable the same HLO compiled to, so
no bit changes; nothing is kept between sessions.

XLA:CPU compiles convolutions with Eigen, as ``eos_jax.runtime.configure()`` sets for every
entry point (set here before the backend starts, so in-process runs match the CLIs).

Random test inputs of rank 3 or more are drawn as one flat vector and reshaped: the same
bits (JAX's partitionable threefry counts in row-major flat order), but a shaped rank-4
draw compiles for seconds on this CPU (see ``eos_jax.models.layers.make_kernel_init``).
"""

import os
import shutil
import sys
import tempfile

_CACHE_ENV = "EOS_JAX_TEST_XLA_CACHE"
if not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="eos_jax_test_xla_cache_")
    _OWNS_CACHE = True  # this process made it (the controller, or a run without xdist)
else:
    _OWNS_CACHE = False
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (after the cache variables, which jax reads at import)

from eos_jax import cli, runtime  # noqa: E402

# The convolution setting runtime.configure() gives every entry point (importing jax starts no
# backend, so it still takes effect here): in-process programs and CLI runs, and the child
# processes that inherit this environment, then compile convolutions alike.
if runtime.eigen_conv_supported() and runtime.YNN_FUSION_OPTION not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + runtime.EIGEN_CONV_FLAG).strip()

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_finish(session):
    """Tracing and lowering allocate many short-lived Python objects: with the test modules imported,
    their objects are moved out of the collector's view (``gc.freeze``) and collections of the
    youngest generation come less often (tracing and lowering measured 15-20 % faster)."""
    cli._tune_gc()  # the command-line entry points' setting, once per process


def pytest_collection_modifyitems(config, items):
    """Long tests first (child processes and ``slow``), in their file order otherwise.

    With ``--dist worksteal`` an idle worker takes tests from the end of the other's queue, so
    when the long ones come first the session does not end with one worker running a long test
    while the other waits.
    """
    items.sort(key=lambda item: 0 if item.get_closest_marker("subprocess") or item.get_closest_marker("slow") else 1)


def pytest_unconfigure(config):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
