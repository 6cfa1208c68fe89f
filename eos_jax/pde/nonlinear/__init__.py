"""The non-linear one-layer CNN gradient-descent PDE (9): restrained instabilities and EoS.

Setting (Sections 5.1, 5.4, 6.1; Appendix D.1, D.5). The network of Eq. (6) is the
``cnn`` model of :mod:`eos_jax.models` with one ``w x w`` kernel ``K`` (valid
cross-correlation, no bias), Swish ``r(x) = x s(beta x)``, a global pooling over the
``P = (n - w + 1)^2`` output positions and the sigmoid inside the binary cross-entropy.
The pooling is the MEAN by default, as in the authors' code for Figures 4-6
(``AvgPooling``, ``np.mean`` over both spatial axes, in ``single_layer/PySun.py`` of
sunyx523/surprising-instabilities); ``pool="sum"`` (the integral of Eq. (6) with unit
pixel area) is the alternative, and scales the data term by ``P`` (50,625 here), which
moves every threshold. The loss is Eq. (7) with the weight decay IN THE LOSS::

    L(K) = BCE(s(g), y) + (alpha/2) ||K||^2,   g = q sum_x r(K * I)(x),  q = 1/P (mean) or 1 (sum),

so ``grad L = (y_hat - y) q r'(K * I) * I + alpha K`` (Theorem 5.1, Eq. (8); PyTorch's
``weight_decay=alpha`` adds the same ``alpha K`` to the gradient, but keeping it in the
loss makes the recorded loss Eq. (7) and the Hessian include ``alpha``).
:func:`analytic_gradient` evaluates Eq. (8) directly; the tests compare it with
``jax.grad`` of the model's loss. Gradient descent with step ``dt`` (the paper's
learning rate) is forward Euler on (9): ``K <- K - dt grad L(K)``, done by
:func:`eos_jax.optim.sgd` so that the perturbed lane ``k = 3`` computes
``K - (dt/k)(k grad)`` (Section 4.1).

The lanes ``(dt, k)``, ``k in {1, k_perturbed}``, are the training engine's
``dt x k`` sweep of this one-layer ``cnn`` on one image (:func:`eos_jax.train.fit`, one
vmapped program in ``lax.scan`` chunks; built by ``experiments/pde/nonlinear_sim.py``,
since the engine sits above this maths layer). Per step and lane it records the loss (7),
its cross-entropy part, the logit ``g``, and the fraction of output positions in each
regime of Table 3 (:func:`regime_fractions`, threshold :func:`regime_threshold`); per
step and ``dt`` the RelL1 distance between the ``k = 1`` and ``k = 3`` kernels; every
``sharpness_every`` steps the normalized sharpness ``dt * lambda_max`` (largest
ALGEBRAIC Hessian eigenvalue of the loss in ``K``, fixed-iteration Lanczos from
:func:`eos_jax.hessian.top_eigenvalue`, warm-started from the previous eigenvector).
A lane whose step does not complete finitely (``L(K_t)``, its gradient or ``K_{t+1}``
not finite) records that step ``t`` (the engine's convention) and is frozen; its later
records are NaN (``null`` in JSON), the other lanes go on.

Indexing: record ``t`` of every history describes the iterate ``K_t`` (``K_0`` the
initial kernel), before the update that produces ``K_{t+1}``.

Classification of each ``dt`` (:func:`classify`, rule text in ``results.json``), on the
last ``window`` records:

* ``divergent``: a lane of this ``dt`` became non-finite, or its loss over the window
  stays above ``growth_factor`` times the initial loss (growing without bound);
* ``restrained``: finite and bounded, but the loss keeps oscillating -- the
  non-monotone part of its variation, ``(TV - |net change|) / (W mean|L|)``, exceeds
  ``osc_level`` -- or RelL1(k=1, k=3) over the window exceeds ``rel_l1_level``
  (amplified perturbation);
* ``stable``: neither (converged, perturbation not amplified).

Initial kernel: ``K_0 ~ N(0, 1)`` from the engine's lane init key
(``fold_in(fold_in(key(0), seed), 0)``, :func:`eos_jax.train.lane_init_key`). The authors
draw ``np.random.randn`` after ``np.random.seed(7)`` in float64; JAX does not reproduce
NumPy's stream, so ``K_0`` differs as a sample. On the pixel checkerboard what matters is
``c_0 = <K_0, chi>`` (``results.json`` ``initial_c``): it sets where the run starts on the
one-dimensional landscape of :func:`checkerboard_loss_1d`, not the minimum it ends in.

The RelL1(k=1, k) series is recorded every step, raw and as the trailing 100-step mean
the authors plot (:func:`moving_average`).

Theory (:func:`theory`): Table 3's bounds for the three regimes with the image's sum
``Ibar`` and DFT, and the windowed transitioning bound from the extreme eigenvalues of
``M = W[(. * I) * I]`` (:func:`eos_jax.pde.linear.make_windowed_operator`). For the
pixel checkerboard ``(-1)^(i+j)`` of even side, ``Ibar = 0``: the activated bound
``alpha < 2/dt - Ibar^2/8`` collapses to the not-activated one ``dt < 2/alpha`` and the
constant forcing ``-(a/2) Ibar`` of (10) vanishes. For that image the loss depends on
``K`` only through ``c = <K, chi>`` and ``||K||`` (:func:`checkerboard_minima`): its
minimum and the curvature there give the threshold ``dt < 2/lambda_max`` between
converging and oscillating, printed beside the classification.

Command (12 lanes, float32, FFT convolution, through the training engine, the Lanczos sharpness
every 10 steps)::

    python -m experiments.pde nonlinear --dt 0.01 0.03 0.05 0.07 0.09 0.11 --steps 2000 --out runs/nonlinear

Measured with ``pool="mean"`` (the default; again after the move onto the engine, with its
``K_0``): stable at 0.01 and 0.03, restrained at 0.05, 0.07 and 0.09, divergent at 0.11 (step 218); the closed-form threshold of the checkerboard
minimum is ``dt < 2/61.997 = 0.0323``. With ``pool="sum"`` it is ``2/563 = 0.00355``.

Submodules: :mod:`~eos_jax.pde.nonlinear.model` (Swish regimes, the cnn model and loss, the
config), :mod:`~eos_jax.pde.nonlinear.theory` (classification, checkerboard closed forms, the
bounds of Table 3). Their public names are re-exported here.
"""

from __future__ import annotations

from eos_jax.pde.nonlinear.model import (
    CLASSES,
    F32,
    POOLS,
    REGIMES,
    LossParts,
    NonlinearConfig,
    PyTree,
    analytic_gradient,
    kernel_of,
    make_batch,
    make_loss_fn,
    make_loss_parts,
    make_model,
    num_positions,
    pool_scale,
    regime_fractions,
    regime_threshold,
    swish_prime,
    valid_correlation,
)
from eos_jax.pde.nonlinear.theory import (
    checkerboard_loss_1d,
    checkerboard_minima,
    checkerboard_orbit,
    chi,
    classification_rule,
    classify,
    dt_key,
    moving_average,
    oscillation,
    theory,
)

__all__ = [
    "CLASSES",
    "F32",
    "LossParts",
    "NonlinearConfig",
    "POOLS",
    "PyTree",
    "REGIMES",
    "analytic_gradient",
    "checkerboard_loss_1d",
    "checkerboard_minima",
    "checkerboard_orbit",
    "chi",
    "classification_rule",
    "classify",
    "dt_key",
    "kernel_of",
    "make_batch",
    "make_loss_fn",
    "make_loss_parts",
    "make_model",
    "moving_average",
    "num_positions",
    "oscillation",
    "pool_scale",
    "regime_fractions",
    "regime_threshold",
    "swish_prime",
    "theory",
    "valid_correlation",
]
