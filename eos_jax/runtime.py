"""Run-time numerical settings and the metadata that records them.

Call :func:`configure` once, before any computation, at the top of an entry point.
It fixes what changes bits from one run to the next:

* ``jax_enable_x64`` (float64 available; every array in eos-jax names its dtype);
* float32 matmul precision ``highest`` (on GPUs the default is TF32, which rounds
  the inputs of every product to 10 mantissa bits and would swamp the one-ulp
  perturbations of the paper's Section 4.1);
* ``--xla_gpu_deterministic_ops=true`` in ``XLA_FLAGS`` (deterministic reductions
  and scatters on GPU); XLA reads the flag when the backend starts, so it is set
  before that and a late call says so;
* it refuses ``--xla_cpu_enable_fast_math=true``, which lets XLA reassociate
  floating-point arithmetic and would turn ``(lr/k)*(k*g)`` back into ``lr*g``;
* :data:`EIGEN_CONV_FLAG` in ``XLA_FLAGS``: XLA:CPU runs convolutions with its own (Eigen)
  kernels instead of the YNNPACK library fusions it uses by default, with every other
  library fusion left as it is. The two give different bits for any program with a
  convolution (programs without one compile to the same HLO), and the Eigen ones are faster
  on this project's models (``benchmarks/bench_models.py`` measures both side by side). A user's own
  ``--xla_cpu_experimental_ynn_fusion_type`` is kept. Called after the CPU backend started,
  it can no longer take effect: a warning, and :func:`metadata` records which convolutions
  the process has (``cpu_convolutions``).

It also sets one thing that changes no bit, only speed: :func:`retain_host_memory`, which
keeps the host memory XLA:CPU frees for its next step instead of handing it back to the
operating system (with glibc's defaults the main job's step spends two thirds of its time
in page faults on freshly mapped temporaries).

:func:`compile_seconds` measures how much of a block of work was compilation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
import warnings
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

# Importing jax starts no backend: XLA reads XLA_FLAGS when the first backend starts, which
# configure() checks for (and sets the flag before).
import jax

from eos_jax.errors import ConfigError

try:  # private API (where JAX keeps its started backends); moved -> assume started
    from jax._src import xla_bridge as _xla_bridge
except ImportError:  # pragma: no cover
    _xla_bridge = None

DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"
# XLA:CPU's default YNNPACK library fusions are individual dots, reductions and individual
# convolutions (read off the compiled HLO of jaxlib 0.10.2: a program compiled with this list
# plus "individual_convolution" is identical to one compiled with no flag); this list drops the
# convolutions only, so they go to XLA's Eigen kernels.
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONV_FLAG = f"--{YNN_FUSION_OPTION}=individual_dot,reduce"
# The same two settings as per-program ``compiler_options`` (the enum's full names), for
# benchmarks that compare them in one process.
YNN_CONV_COMPILER_OPTIONS = {
    YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
}
EIGEN_CONV_COMPILER_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# XLA aborts the process on a flag it does not know, so the flag is set only for the jaxlib
# versions that have it as measured (0.10.x; older ones are left to their defaults).
_EIGEN_CONV_MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
    version = _version("jaxlib") or "0"
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


_cpu_convolutions: str | None = None


def _conv_status(flags: str) -> str | None:
    """What ``XLA_FLAGS`` says about XLA:CPU's convolutions, or None when it names no YNNPACK list."""
    for token in flags.split():
        if token.split("=")[0] == f"--{YNN_FUSION_OPTION}":
            return "eigen" if token == EIGEN_CONV_FLAG else f"as XLA_FLAGS sets ({token})"
    return None


def eigen_conv_supported() -> bool:
    """Whether this jaxlib knows :data:`EIGEN_CONV_FLAG` (0.10 and newer), so :func:`configure` sets it.

    Examples:
      >>> from eos_jax.runtime import EIGEN_CONV_FLAG, eigen_conv_supported
      >>> EIGEN_CONV_FLAG
      '--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce'
      >>> eigen_conv_supported() in (True, False)
      True
    """
    return _jaxlib_version() >= _EIGEN_CONV_MIN_JAXLIB


_FAST_MATH_FLAGS = ("--xla_cpu_enable_fast_math=true", "--xla_cpu_enable_fast_math")


def _backend_started() -> bool:
    """Whether a JAX backend has already been initialised in this process."""
    if _xla_bridge is None:  # pragma: no cover - private API moved: assume started.
        return True
    return bool(getattr(_xla_bridge, "_backends", {}))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes a C int: 2 GiB - 1, the largest; heap tops above it are still trimmed. (-1, "no
# trimming at all" in mallopt(3), removed a 16-lane sweep's 3.6 M faults per chunk, but the heap
# then grew past the machine's 24 GB in the same benchmark: measured, killed by the OOM killer.)
_TRIM_THRESHOLD = (1 << 31) - 1
HOST_MEMORY_ENV = "EOS_JAX_HOST_MEMORY"
_host_memory: str | None = None


def retain_host_memory() -> str:
    """Makes glibc keep freed host memory for reuse (speed only; no bit changes); returns what it did.

    XLA:CPU allocates each step's temporaries with ``malloc`` and frees them after the step.
    glibc serves large blocks with fresh ``mmap`` s (and XLA's worker threads from per-thread
    arenas that it trims), so every step faults every page of its temporaries in again: the
    main job's gradient step on 12,000 images took 219k page faults, 0.35 s, where the arithmetic
    needs 0.1 s (``benchmarks/bench_main.py``). Three ``mallopt`` settings keep the memory:
    one arena (``M_ARENA_MAX=1``), no ``mmap`` for large blocks (``M_MMAP_MAX=0``) and no
    trimming of the heap top below 2 GiB (``M_TRIM_THRESHOLD``, a C int). The process's resident memory then
    stays at its peak instead of falling back between steps.

    It must run before the backend starts: XLA's worker threads take their arenas when they are
    created, and a later call would change the main arena only. It is a no-op (and says so) when
    the backend already started, off glibc, or when ``$EOS_JAX_HOST_MEMORY`` is ``system``.
    :func:`configure` calls it; the value is recorded in :func:`metadata` as ``host_memory``.
    Idempotent: the first call decides.

    Returns:
      ``"retained"``, or why not: ``"system (EOS_JAX_HOST_MEMORY=system)"``,
      ``"system (backend already started)"``, ``"system (not glibc)"``.

    Examples:
      >>> from eos_jax.runtime import retain_host_memory
      >>> status = retain_host_memory()  # first thing in an entry point; later calls repeat the answer
      >>> status == "retained" or status.startswith("system ("), retain_host_memory() == status
      (True, True)
    """
    global _host_memory
    if _host_memory is not None:
        return _host_memory
    if os.environ.get(HOST_MEMORY_ENV, "retain") == "system":
        _host_memory = f"system ({HOST_MEMORY_ENV}=system)"
    elif _backend_started():
        _host_memory = "system (backend already started)"
    elif platform.libc_ver()[0] != "glibc":
        _host_memory = "system (not glibc)"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # out-of-range values raise, not wrap
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        )
        _host_memory = "retained" if ok else "system (mallopt refused)"
    return _host_memory


def check_xla_flags(flags: str | None = None) -> None:
    """Raises ConfigError if ``flags`` (default: ``$XLA_FLAGS``) enable fast math.

    Examples:
      >>> from eos_jax.runtime import check_xla_flags
      >>> check_xla_flags("--xla_gpu_deterministic_ops=true")  # fine: returns None
      >>> check_xla_flags("--xla_cpu_enable_fast_math=true")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: XLA_FLAGS contains '--xla_cpu_enable_fast_math=true': fast math ...
    """
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    for token in flags.split():
        if token in _FAST_MATH_FLAGS:
            raise ConfigError(
                f"XLA_FLAGS contains {token!r}: fast math reassociates floating point and "
                "destroys the last-bit perturbations; remove it (allowed: "
                "--xla_cpu_enable_fast_math=false or leaving it unset)"
            )


def configure(
    *,
    x64: bool = True,
    matmul_precision: str = "highest",
    deterministic_gpu: bool = True,
    eigen_convolutions: bool = True,
    retain_memory: bool = True,
) -> dict[str, Any]:
    """Sets the numerical run-time options and returns :func:`metadata`.

    Args:
      x64: enable 64-bit types (``jax_enable_x64``).
      matmul_precision: ``jax_default_matmul_precision``; ``"highest"`` means true
        float32 products on every backend.
      deterministic_gpu: add ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS``.
      eigen_convolutions: add :data:`EIGEN_CONV_FLAG` to ``XLA_FLAGS`` (XLA:CPU convolutions by
        Eigen, not YNNPACK) unless ``XLA_FLAGS`` already names
        ``--xla_cpu_experimental_ynn_fusion_type``.
      retain_memory: call :func:`retain_host_memory` (speed only: no bit changes).

    Returns:
      The metadata dict of :func:`metadata`.

    Raises:
      ConfigError: fast math is enabled in ``XLA_FLAGS``, or the deterministic GPU flag is
        requested after a GPU backend already started without it. (The convolution flag
        after the CPU backend started is a warning, not an error: that process's convolutions
        stay in YNNPACK, deterministic but with other bits, and :func:`metadata` records it as
        ``cpu_convolutions``.)

    Examples:
      An entry point calls ``meta = configure()`` first thing (it changes process-wide
      settings, so a library function never does). A bad setting is refused before
      anything is changed:

      >>> from eos_jax.runtime import configure
      >>> configure(matmul_precision="tf32")
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: matmul_precision='tf32'; allowed: highest, float32, high, bfloat16_3x, default, bfloat16
    """
    allowed = ("highest", "float32", "high", "bfloat16_3x", "default", "bfloat16")
    if matmul_precision not in allowed:
        raise ConfigError(f"matmul_precision={matmul_precision!r}; allowed: {', '.join(allowed)}")
    check_xla_flags()
    if retain_memory:
        retain_host_memory()
    if deterministic_gpu:
        flags = os.environ.get("XLA_FLAGS", "")
        if DETERMINISTIC_GPU_FLAG not in flags.split():
            if _backend_started():
                if jax.default_backend() == "gpu":
                    raise ConfigError(
                        "the GPU backend started before eos_jax.runtime.configure(): "
                        f"{DETERMINISTIC_GPU_FLAG} cannot take effect; call configure() first"
                    )
            os.environ["XLA_FLAGS"] = (flags + " " + DETERMINISTIC_GPU_FLAG).strip()
    global _cpu_convolutions
    flags = os.environ.get("XLA_FLAGS", "")
    status = _conv_status(flags)
    if status is None and not eigen_conv_supported():
        status = f"XLA's default (jaxlib {_version('jaxlib')} predates {EIGEN_CONV_FLAG.split('=')[0]})"
    elif status is None and not eigen_convolutions:
        status = "ynnpack (XLA's default)"
    elif status is None and _backend_started() and jax.default_backend() == "cpu":
        # XLA read XLA_FLAGS when the backend started: too late for this process. Its programs
        # with convolutions get other bits than an entry point's; the metadata says so.
        status = "ynnpack (XLA's default: the CPU backend started before configure())"
        warnings.warn(
            f"eos_jax.runtime.configure(): the CPU backend already started, so {EIGEN_CONV_FLAG} cannot "
            "take effect: convolutions run in YNNPACK and give other bits than the command-line tools "
            "(call configure() first, or put the flag in XLA_FLAGS before Python starts)",
            stacklevel=2,
        )
    elif status is None:
        os.environ["XLA_FLAGS"] = (flags + " " + EIGEN_CONV_FLAG).strip()
        status = "eigen"
    _cpu_convolutions = status
    jax.config.update("jax_enable_x64", bool(x64))
    jax.config.update("jax_default_matmul_precision", matmul_precision)
    return metadata()


# Vector-instruction families that decide how XLA:CPU (LLVM for the host CPU) vectorizes elementwise functions.
_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f")


def cpu() -> dict[str, Any]:
    """The host CPU's model and vector-instruction families (Linux ``/proc/cpuinfo``; elsewhere the model only).

    XLA:CPU compiles for the CPU it runs on, and its elementwise functions are not all correctly
    rounded: the same program can differ in the last bit between CPU models (``docs/bits.md``), so
    ``metadata.json`` records the CPU beside the versions.

    Examples:
      >>> from eos_jax.runtime import cpu
      >>> sorted(cpu())
      ['model', 'simd']
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "simd": [f for f in _SIMD_FLAGS if f in flags]}


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def metadata() -> dict[str, Any]:
    """Versions, devices and numerical settings of this process, for ``metadata.json``.

    Examples:
      >>> from eos_jax.runtime import metadata
      >>> m = metadata()
      >>> m["x64"], m["device_count"] >= 1, m["versions"]["jax"] is not None  # under JAX's defaults
      (False, True, True)
      >>> sorted(m)  # doctest: +NORMALIZE_WHITESPACE
      ['backend', 'cpu', 'cpu_convolutions', 'device_count', 'device_kinds', 'host_memory', 'matmul_precision', 'platform',
       'process_count', 'python', 'versions', 'x64', 'xla_flags']
    """
    devices = jax.devices()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu(),
        "versions": {
            name: _version(dist)
            for name, dist in [
                ("jax", "jax"),
                ("jaxlib", "jaxlib"),
                ("flax", "flax"),
                ("optax", "optax"),
                ("orbax_checkpoint", "orbax-checkpoint"),
                ("numpy", "numpy"),
                ("scipy", "scipy"),
            ]
        },
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "device_kinds": sorted({d.device_kind for d in devices}),
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_memory": _host_memory or "system",
        # What configure() found or set; without configure(), what XLA_FLAGS says now.
        "cpu_convolutions": _cpu_convolutions
        or _conv_status(os.environ.get("XLA_FLAGS", ""))
        or "ynnpack (XLA's default)",
    }


# jax.monitoring's events of one compilation: tracing to a jaxpr, lowering to StableHLO, XLA's compile.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    BACKEND_COMPILE_EVENT,
)


@contextlib.contextmanager
def compile_seconds(into: dict[str, float], key: str = "compile_seconds", events: Sequence[str] = COMPILE_EVENTS):
    """Adds to ``into[key]`` the seconds that JAX reports for ``events`` inside the block (``jax.monitoring``).

    The default, :data:`COMPILE_EVENTS`, is all of a compilation: tracing, lowering and XLA's
    compile; ``events=(BACKEND_COMPILE_EVENT,)`` is XLA's part alone.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.runtime import compile_seconds
      >>> spent = {}
      >>> with compile_seconds(spent):
      ...     _ = jax.jit(lambda x: x * 2.0)(jnp.ones(3))
      >>> spent["compile_seconds"] > 0
      True
    """

    def listen(event: str, secs: float, **_: Any) -> None:
        if event in events:
            into[key] = into.get(key, 0.0) + secs

    into.setdefault(key, 0.0)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield into
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
