"""eos-jax: extreme numerical sensitivities and the Edge of Stability, in JAX.

Reproduces and extends Sun, Lao, Yezzi & Sundaramoorthi, "A PDE-based Explanation of
Extreme Numerical Sensitivities and Edge of Stability in Training Neural Networks",
JMLR 25 (2024). Submodules are imported explicitly (``from eos_jax import optim``) so
that ``import eos_jax`` does not start a JAX backend before
:func:`eos_jax.runtime.configure` has set the XLA flags.
"""

__version__ = "0.1.0"
