"""Numerical PDE analysis of the paper (Sections 3, 5, 6.1; Appendices D, E).

Submodules: :mod:`~eos_jax.pde.common` (checkerboard input, the float64 requirement),
:mod:`~eos_jax.pde.heat` (Eq. (2)), :mod:`~eos_jax.pde.beltrami` (Eq. (4)),
:mod:`~eos_jax.pde.linear` (linearized CNN PDE, Eqs. (10)-(18)),
:mod:`~eos_jax.pde.nonlinear` (one-layer non-linear PDE, Eq. (9)). They are imported
explicitly so that importing the package starts no JAX backend.

The package holds the maths only: it writes no file, and changes no process-wide setting (x64,
``XLA_FLAGS``, the matplotlib backend). Each experiment's presets, run directory, findings and
plots live in :mod:`experiments.pde`, whose entry point configures the runtime.
"""
