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
  floating-point arithmetic and would turn ``(lr/k)*(k*g)`` back into ``lr*g``.
"""

from __future__ import annotations

import os
import platform
import sys
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
_FAST_MATH_FLAGS = ("--xla_cpu_enable_fast_math=true", "--xla_cpu_enable_fast_math")


def _backend_started() -> bool:
    """Whether a JAX backend has already been initialised in this process."""
    if _xla_bridge is None:  # pragma: no cover - private API moved: assume started.
        return True
    return bool(getattr(_xla_bridge, "_backends", {}))


def check_xla_flags(flags: str | None = None) -> None:
    """Raises ConfigError if ``flags`` (default: ``$XLA_FLAGS``) enable fast math.

    Example:
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
) -> dict[str, Any]:
    """Sets the numerical run-time options and returns :func:`metadata`.

    Args:
      x64: enable 64-bit types (``jax_enable_x64``).
      matmul_precision: ``jax_default_matmul_precision``; ``"highest"`` means true
        float32 products on every backend.
      deterministic_gpu: add ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS``.

    Returns:
      The metadata dict of :func:`metadata`.

    Raises:
      ConfigError: fast math is enabled in ``XLA_FLAGS``, or the deterministic GPU
        flag is requested after a GPU backend already started without it.

    Example:
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
    jax.config.update("jax_enable_x64", bool(x64))
    jax.config.update("jax_default_matmul_precision", matmul_precision)
    return metadata()


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def metadata() -> dict[str, Any]:
    """Versions, devices and numerical settings of this process, for ``metadata.json``.

    Example:
      >>> from eos_jax.runtime import metadata
      >>> m = metadata()
      >>> m["x64"], m["device_count"] >= 1, m["versions"]["jax"] is not None  # under JAX's defaults
      (False, True, True)
      >>> sorted(m)  # doctest: +NORMALIZE_WHITESPACE
      ['backend', 'device_count', 'device_kinds', 'matmul_precision', 'platform', 'process_count', 'python',
       'versions', 'x64', 'xla_flags']
    """
    devices = jax.devices()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
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
    }
