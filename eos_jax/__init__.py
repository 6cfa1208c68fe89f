"""eos-jax: extreme numerical sensitivities and the Edge of Stability, in JAX.

Reproduces and extends Sun, Lao, Yezzi & Sundaramoorthi, "A PDE-based Explanation of
Extreme Numerical Sensitivities and Edge of Stability in Training Neural Networks",
JMLR 25 (2024). The library, from the bottom layer up (the experiments that use it, with
their presets, run directories and findings, are in the ``experiments`` package)::

    Foundation
      errors       exceptions with a one-line, user-facing message
      io           atomic files and run directories
      runtime      run-time numerical settings (x64, matmul precision, XLA flags) and their metadata
      cli          helpers for command-line entry points (one-line errors, exit code 2)
      fma          a correctly rounded fused multiply-add in the operands' own dtype
      metrics      distances between parameter pytrees (the paper's RelL1)
      progress     a one-line terminal progress bar
      distributed  several processes, one run: jax.distributed set-up, host views of global arrays
    Maths
      losses       losses from logits, averaged over examples
      optim        the perturbed optimizers of Section 4.1 as optax transforms
      optim_torch  PyTorch's CPU rounding for optim.sgd / optim.adam
      eigen        flat-vector eigen-solvers: power iteration and Lanczos
      hessian      Hessian-vector products, top eigenvalues and (normalized) sharpness
      models       models as pure functions, chosen by name (the paper's CNN, fc, VGG, ResNet)
      data         readers, named datasets, downloads, preprocessing and batching
      pde          the PDE analysis of Sections 3, 5, 6.1: operators, schemes, bounds, classifiers
      stability    the stability criterion and regimes of a training run (Section 6)
      optim_cfl    cfl_scale: each layer's step capped at a fraction of its stable step (Section 7)
      predict      the regime before training: classical and per-layer bounds, verdicts
    Engine
      checkpoint   Orbax checkpoints of a training state, verified on restore
      train        the training engine: one state pytree, a pure step, scan-chunked vmapped sweeps
      plotting     figures of a training run: loss and normalized sharpness against steps

The submodules are imported lazily, on first attribute access (PEP 562): ``import
eos_jax; eos_jax.hessian.top_eigenvalue`` works, while ``import eos_jax`` alone imports
neither JAX, Flax nor matplotlib (seconds of import time) and changes no state. Nothing in
the library configures the runtime at import; an entry point calls
:func:`eos_jax.runtime.configure` before it computes anything. In a REPL or a notebook, where
no entry point does, ``import eos_jax`` says so in one line (:data:`CONFIGURE_HINT`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = [
    "errors",
    "io",
    "runtime",
    "cli",
    "fma",
    "metrics",
    "progress",
    "distributed",
    "losses",
    "optim",
    "optim_torch",
    "eigen",
    "hessian",
    "models",
    "data",
    "pde",
    "stability",
    "optim_cfl",
    "predict",
    "checkpoint",
    "train",
    "plotting",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the modules load on first use
    from eos_jax import (  # noqa: F401
        checkpoint,
        cli,
        data,
        distributed,
        eigen,
        errors,
        fma,
        hessian,
        io,
        losses,
        metrics,
        models,
        optim,
        optim_cfl,
        optim_torch,
        pde,
        plotting,
        predict,
        progress,
        runtime,
        stability,
        train,
    )


CONFIGURE_HINT = (
    "eos-jax: call eos_jax.runtime.configure() before the first JAX array: x64, exact float32 matmuls, "
    "XLA:CPU's Eigen convolutions and the host-memory reuse that makes CPU steps several times faster "
    "(EOS_JAX_QUIET=1 hides this line)"
)


def _interactive() -> bool:
    """A REPL or a notebook kernel (where no entry point calls ``runtime.configure()`` for the user)."""
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules or "IPython" in sys.modules


if _interactive() and os.environ.get("EOS_JAX_QUIET", "") in ("", "0"):
    print(CONFIGURE_HINT, file=sys.stderr)


def __getattr__(name: str) -> Any:
    """Imports the public submodule ``name`` on first access (``eos_jax.hessian``)."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
