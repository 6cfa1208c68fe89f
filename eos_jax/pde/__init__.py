"""Numerical PDE analysis of the paper (Sections 3, 5, 6.1; Appendices D, E).

Submodules: :mod:`~eos_jax.pde.common` (checkerboard input, run directories),
:mod:`~eos_jax.pde.heat` (Eq. (2)), :mod:`~eos_jax.pde.beltrami` (Eq. (4)),
:mod:`~eos_jax.pde.linear` (linearized CNN PDE, Eqs. (10)-(18)),
:mod:`~eos_jax.pde.nonlinear` (one-layer non-linear PDE, Eq. (9)). They are imported
explicitly so that importing the package starts no JAX backend.
"""
