"""The linearized CNN gradient-descent PDE (10): schemes, amplifiers, stability bounds.

Setting (Sections 5.2-5.3, Appendices D.3 and E). Around ``K * I = 0`` the one-layer
network's gradient-descent PDE (9) linearizes to (10)::

    dK/dt = W [ -(a/2) (Ibar + beta (K * I) * I) - alpha K ],

with ``*`` the cross-correlation of deep-learning libraries, ``(K * I)(x) = sum_z K(z)
I(x + z)``, and ``W`` the kernel's window. Write ``C K = K * I`` (the *valid*
correlation of a ``w x w`` kernel with the ``n x n`` image, an ``(n-w+1)^2`` map) and
``C^T r = r * I`` restricted to the window (the correlation of the image with the map
``r``): then ``W[(K * I) * I] = M K`` with ``M = C^T C`` symmetric positive
semi-definite, and (10) is gradient flow on the quadratic loss::

    L(K) = (a beta / 4) ||K * I||^2 + (a/2) Ibar sum(K) + (alpha/2) ||K||^2,

whose gradient ``(a/2)(Ibar + beta M K) + alpha K`` :func:`linearized_loss` checks
against ``jax.grad``. In the periodic version (``w -> infinity``, circular correlation
on the ``n x n`` torus) ``M`` is diagonal in the DFT basis with eigenvalue
``|I_hat(omega)|^2`` (unnormalized DFT, Eq. (53)).

Schemes (``z = alpha + (a beta/2) mu`` for an eigenvalue ``mu`` of ``M``):

* forward Euler (11): ``K <- K - dt grad(K)``; per mode ``A = 1 - dt z`` (13), stable
  iff ``0 < dt z < 2``, which gives (14).
* semi-implicit Nesterov (16)-(17): ``V = K + m (K - K_prev)``, ``K <- V - s grad(V)``
  with momentum ``m = (2 - d dt)/(2 + d dt)`` and step ``s = 2 dt^2/(2 + d dt)``; given
  ``m`` (0.9 for Table 9), ``d = 2 (1 - m) / ((1 + m) dt)`` and ``s = (1 + m) dt^2 / 2``.
  Per mode the 2-step recursion ``K+ = q((1 + m) K - m K_prev)``, ``q = 1 - s z``, has
  characteristic polynomial ``lam^2 - q (1 + m) lam + q m``; by the Schur-Cohn test it is
  stable iff ``-1/(1 + 2m) < q < 1``, i.e. ``0 < z < 4 / ((1 + 2m) dt^2)`` exactly. The
  paper's (18) states ``alpha_max = 4/(3 dt^2) - ...``, which is this bound in the limit
  ``m -> 1`` (``d dt -> 0``); at ``m = 0.9`` the exact bound is 4/2.8 instead of 4/3 (7%
  larger). We report both: ``*_theory`` keys use the exact amplifier, ``*_paper`` keys
  the formula as printed.

Hence for any spectrum ``[mu_min, mu_max]`` of ``M`` and ``Z`` the scheme's bound on
``z`` (``2/dt`` or ``4/((1 + 2m) dt^2)``)::

    alpha_min = -min(c mu_min, c mu_max),  alpha_max = Z - max(c mu_min, c mu_max),  c = a beta / 2,

which for ``a < 0`` is (14)/(18): ``alpha_min = -c max|I_hat|^2``, ``alpha_max = Z - c
min|I_hat|^2``. The *empirical* windowed bounds are found two independent ways:
bisection on ``alpha`` of simulated runs (:func:`bisect_bounds`, criterion in
:func:`is_unstable`), and the extreme eigenvalues of the windowed ``M`` by power
iteration with a shift (:func:`operator_extremes`), inserted in the formula above.

Pooling (``pool``, ``ibar``). The network's logit is a global pooling of ``r(K * I)``
over the ``P = (n - w + 1)^2`` valid positions; a mean pooling puts ``1/P`` on the whole
data term, ``(a/2)(Ibar_mean + (beta/P) M K)`` with ``Ibar_mean`` the image mean, a sum
pooling gives ``(a/2)(Ibar_sum + beta M K)`` (the paper's text: ``Ibar`` "the input sum",
Eq. (47)). The authors' code for Table 2 (``single_layer/linear.py`` in
sunyx523/surprising-instabilities) does neither purely: its gradient is
``0.5 a (mean(I) + beta np.dot(conv_out, col_image.T)) + alpha K`` -- the data term
``(K * I) * I`` SUMMED over the output positions (no division) and ``Ibar`` the image MEAN
-- and the ``alpha_min`` it prints, ``0.25 max|fft2(I)|^2``, is (14) with the sum. The
defaults follow that file: ``pool="sum"`` (data term summed over positions, as in
linear.py, so the bounds (14)/(18) are the paper's) and ``ibar="mean"`` (as in linear.py);
``pool="mean"`` scales ``M`` by ``q = 1/P`` (``1/n^2`` for the periodic operator and the
periodic bounds, which correlate over all ``n^2`` positions), and ``ibar="sum"`` gives the
paper's text. ``Ibar`` is a constant forcing: it moves the fixed point but not the
amplifiers, so the bounds depend on ``pool`` only (``mu -> q mu``). For the pixel
checkerboard of even side ``mean(I) = sum(I) = 0``, so ``ibar`` changes nothing there.

All computations are float64: the caller enables JAX's x64 mode (the entry point
``python -m experiments.pde`` does, through ``eos_jax.runtime.configure()``); the functions that
need it raise a ConfigError under JAX's float32 default instead of switching it on.

Submodules: :mod:`~eos_jax.pde.linear.theory` (amplifiers, bounds (14)/(18), the image spectrum),
:mod:`~eos_jax.pde.linear.operators` (the windowed and periodic ``M``, the loss, extreme
eigenvalues by :mod:`eos_jax.eigen`), :mod:`~eos_jax.pde.linear.schemes` (the schemes (11) and
(16)-(17), simulation, bisection, the config). Their public names are re-exported here.
"""

from __future__ import annotations

from eos_jax.pde.linear.operators import (
    checkerboard_window_extremes,
    linearized_loss,
    loss_from_operator,
    make_periodic_operator,
    make_windowed_operator,
    operator_extremes,
    scaled_operator,
    valid_correlation,
)
from eos_jax.pde.linear.schemes import (
    LinearConfig,
    SchemeState,
    analyze_window,
    bisect_bounds,
    is_unstable,
    make_instability_test,
    make_step,
    simulate,
)
from eos_jax.pde.linear.theory import (
    C128,
    F64,
    IBARS,
    POOLS,
    SCHEMES,
    Operator,
    alpha_bounds,
    amplifier,
    data_scale,
    image_bar,
    image_spectrum,
    nesterov_coefficients,
    theory_bounds,
    z_bound,
)

__all__ = [
    "C128",
    "F64",
    "IBARS",
    "LinearConfig",
    "Operator",
    "POOLS",
    "SCHEMES",
    "SchemeState",
    "alpha_bounds",
    "amplifier",
    "analyze_window",
    "bisect_bounds",
    "checkerboard_window_extremes",
    "data_scale",
    "image_bar",
    "image_spectrum",
    "is_unstable",
    "linearized_loss",
    "loss_from_operator",
    "make_instability_test",
    "make_periodic_operator",
    "make_step",
    "make_windowed_operator",
    "nesterov_coefficients",
    "operator_extremes",
    "scaled_operator",
    "simulate",
    "theory_bounds",
    "valid_correlation",
    "z_bound",
]
