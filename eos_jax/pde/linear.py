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
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.eigen import Extremes, psd_extremes
from eos_jax.errors import ConfigError
from eos_jax.pde.common import require_x64

SCHEMES = ("gd", "nesterov")
POOLS = ("sum", "mean")
IBARS = ("mean", "sum")
F64 = jnp.float64
C128 = jnp.complex128

Operator = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- theory


def nesterov_coefficients(dt: float, momentum: float) -> tuple[float, float]:
    """Damping ``d`` and step ``s`` of the Nesterov scheme (16)-(17) for a given momentum.

    Args:
      dt: time step ``Delta t`` > 0.
      momentum: ``m = (2 - d dt)/(2 + d dt)`` in (0, 1).

    Returns:
      ``(d, s)`` with ``d = 2 (1 - m)/((1 + m) dt)`` and ``s = 2 dt^2/(2 + d dt)``.
    """
    _check_dt_momentum(dt, momentum)
    d = 2.0 * (1.0 - momentum) / ((1.0 + momentum) * dt)
    s = 2.0 * dt * dt / (2.0 + d * dt)
    return d, s


def z_bound(scheme: str, dt: float, momentum: float = 0.9, *, form: str = "exact") -> float:
    """Upper bound ``Z`` on ``z = alpha + (a beta/2)|I_hat|^2`` for stability (``0 < z < Z``).

    Args:
      scheme: "gd" (forward Euler (11): ``Z = 2/dt``, Eq. (56)) or "nesterov" ((16)-(17)).
      dt: time step.
      momentum: Nesterov momentum ``m`` (ignored for "gd").
      form: "exact" (Schur-Cohn bound ``4/((1 + 2m) dt^2)`` for Nesterov) or "paper"
        (Eq. (73)/(18): ``4/(3 dt^2)``, the ``m -> 1`` limit). Same for "gd".

    Returns:
      ``Z`` as a Python float.
    """
    _check_scheme(scheme)
    if form not in ("exact", "paper"):
        raise ConfigError(f"form={form!r}; allowed: 'exact', 'paper'")
    if scheme == "gd":
        if not dt > 0:
            raise ConfigError(f"dt={dt!r}; expected dt > 0")
        return 2.0 / dt
    _check_dt_momentum(dt, momentum)
    if form == "paper":
        return 4.0 / (3.0 * dt * dt)
    return 4.0 / ((1.0 + 2.0 * momentum) * dt * dt)


def alpha_bounds(
    mu_min: float, mu_max: float, *, scheme: str, dt: float, a: float, beta: float, momentum: float = 0.9,
    form: str = "exact",
) -> tuple[float, float]:
    """Stability interval ``(alpha_min, alpha_max)`` for a spectrum ``[mu_min, mu_max]`` of ``M``.

    With ``mu = |I_hat(omega)|^2`` this is (14) for "gd" and (18) for "nesterov"
    (``form="paper"``) or its exact version (``form="exact"``).

    Args:
      mu_min, mu_max: extreme eigenvalues of ``M`` (``min/max |I_hat|^2`` when periodic).
      scheme, dt, momentum, form: see :func:`z_bound`.
      a, beta: constants of (10).

    Returns:
      ``(alpha_min, alpha_max)``; the scheme is stable iff ``alpha_min < alpha < alpha_max``
      (an empty interval when ``alpha_min >= alpha_max``).
    """
    c = 0.5 * a * beta
    zmax = z_bound(scheme, dt, momentum, form=form)
    lo = min(c * mu_min, c * mu_max)
    hi = max(c * mu_min, c * mu_max)
    return -lo, zmax - hi


def amplifier(z: jax.typing.ArrayLike, *, scheme: str, dt: float, momentum: float = 0.9) -> jax.Array:
    """Per-mode amplification factor for ``z = alpha + (a beta/2)|I_hat(omega)|^2``.

    "gd": ``A = 1 - dt z`` (Eq. (13)), real. "nesterov": the root of largest modulus of
    ``lam^2 - q (1 + m) lam + q m`` with ``q = 1 - s z`` (complex128; Eqs. (70)-(72)).

    Args:
      z: gradient amplifier(s) (Eq. (72)), float64.
      scheme, dt, momentum: see :func:`z_bound`.

    Returns:
      ``A`` (float64) for "gd"; the dominant root (complex128) for "nesterov".
    """
    require_x64("linear.amplifier")
    _check_scheme(scheme)
    z = jnp.asarray(z, dtype=F64)
    if scheme == "gd":
        return 1.0 - dt * z
    _, s = nesterov_coefficients(dt, momentum)
    q = (1.0 - s * z).astype(C128)
    b = q * (1.0 + momentum)
    disc = jnp.sqrt(b * b - 4.0 * q * momentum)
    r1 = 0.5 * (b + disc)
    r2 = 0.5 * (b - disc)
    return jnp.where(jnp.abs(r1) >= jnp.abs(r2), r1, r2)


def image_spectrum(image: jax.typing.ArrayLike) -> jax.Array:
    """``|I_hat(omega)|^2`` on the full DFT grid (unnormalized DFT, as in Section 3.1), float64."""
    require_x64("linear.image_spectrum")
    img = jnp.asarray(image, dtype=F64)
    return jnp.abs(jnp.fft.fft2(img)) ** 2


def data_scale(pool: str, positions: int) -> float:
    """Factor ``q`` of the data term ``beta (K * I) * I``: ``1/positions`` for "mean", 1 for "sum"."""
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r}; allowed: {', '.join(POOLS)}")
    return 1.0 / positions if pool == "mean" else 1.0


def image_bar(image: jax.typing.ArrayLike, ibar: str) -> float:
    """``Ibar`` of (10): the image mean (``ibar="mean"``, as in linear.py) or its sum (the paper's text)."""
    require_x64("linear.image_bar")
    if ibar not in IBARS:
        raise ConfigError(f"ibar={ibar!r}; allowed: {', '.join(IBARS)}")
    img = np.asarray(image, np.float64)
    return float(img.mean() if ibar == "mean" else img.sum())


def theory_bounds(
    image: jax.typing.ArrayLike, *, scheme: str, dt: float, a: float, beta: float, momentum: float = 0.9,
    form: str = "exact", pool: str = "sum",
) -> tuple[float, float]:
    """Bounds (14) / (18) of the periodic (``w -> infinity``) scheme from the DFT of ``image``.

    With ``pool="mean"`` the periodic data term is averaged over the ``n^2`` positions of
    the torus, so ``|I_hat|^2`` enters as ``|I_hat|^2 / n^2``.
    """
    spec = np.asarray(image_spectrum(image))
    q = data_scale(pool, spec.size)
    return alpha_bounds(q * float(spec.min()), q * float(spec.max()), scheme=scheme, dt=dt, a=a, beta=beta,
                        momentum=momentum, form=form)


def scaled_operator(op: Operator, q: float) -> Operator:
    """``q M`` (the data term of a mean pooling when ``q = 1/P``); ``op`` itself when ``q == 1``."""
    if q == 1.0:
        return op
    return lambda kernel: q * op(kernel)


# -------------------------------------------------------------------------- operators


def valid_correlation(kernel: jax.Array, image: jax.Array) -> jax.Array:
    """``(K * I)(x) = sum_z K(z) I(x + z)`` over valid positions (no padding), via ``lax.conv``.

    Deep-learning libraries' convolution; the direct reference for the FFT operators.
    """
    require_x64("linear.valid_correlation")
    out = jax.lax.conv_general_dilated(
        image[None, None].astype(F64), kernel[None, None].astype(F64), (1, 1), "VALID",
        precision=jax.lax.Precision.HIGHEST,
    )
    return out[0, 0]


def make_windowed_operator(image: jax.typing.ArrayLike, w: int) -> Operator:
    """``M K = W[(K * I) * I]`` for a ``w x w`` kernel and valid correlations, FFT-based.

    The kernel is zero-padded to the ``n x n`` image; a circular correlation then equals
    the valid one on the ``(n - w + 1)^2`` positions that do not wrap, and the same holds
    for correlating the (zero-padded) valid map back with ``I`` on the ``w x w`` window.

    Args:
      image: ``n x n`` input ``I``.
      w: kernel side, ``1 <= w <= n``.

    Returns:
      A jittable linear map ``(w, w) float64 -> (w, w) float64`` (symmetric PSD).
    """
    require_x64("linear.make_windowed_operator")
    img = jnp.asarray(image, dtype=F64)
    n = img.shape[0]
    if img.ndim != 2 or img.shape[1] != n:
        raise ConfigError(f"image shape {img.shape}; expected a square 2-D image")
    if not 1 <= w <= n:
        raise ConfigError(f"kernel size w={w!r}; expected 1 <= w <= image side {n}")
    v = n - w + 1
    img_hat = jnp.fft.rfft2(img)
    valid_mask = jnp.zeros((n, n), F64).at[:v, :v].set(1.0)

    def corr_with_image(f: jax.Array) -> jax.Array:
        # (f * I)(x) = sum_z f(z) I(x + z): DFT conj(f_hat) I_hat for real f.
        return jnp.fft.irfft2(jnp.conj(jnp.fft.rfft2(f)) * img_hat, s=(n, n))

    def op(kernel: jax.Array) -> jax.Array:
        k_pad = jnp.zeros((n, n), F64).at[:w, :w].set(kernel)
        r = corr_with_image(k_pad) * valid_mask
        return corr_with_image(r)[:w, :w]

    return op


def make_periodic_operator(image: jax.typing.ArrayLike) -> Operator:
    """``M K = (K * I) * I`` with circular correlations on the ``n x n`` torus (``w -> infinity``).

    Diagonal in the DFT basis: ``DFT{M K} = K_hat |I_hat|^2`` (Eqs. (50)-(53)).
    """
    require_x64("linear.make_periodic_operator")
    img = jnp.asarray(image, dtype=F64)
    n = img.shape[0]
    spec = (jnp.abs(jnp.fft.rfft2(img)) ** 2).astype(C128)

    def op(kernel: jax.Array) -> jax.Array:
        return jnp.fft.irfft2(jnp.fft.rfft2(kernel) * spec, s=(n, n))

    return op


def linearized_loss(kernel: jax.Array, image: jax.Array, *, a: float, beta: float, alpha: float,
                    pool: str = "sum", ibar: str = "mean") -> jax.Array:
    """Quadratic loss whose gradient is the right-hand side of (10) (windowed, valid correlation).

    ``L(K) = (a beta q/4) ||K * I||^2 + (a/2) Ibar sum(K) + (alpha/2) ||K||^2``; its gradient is
    ``(a/2)(Ibar + beta q (K * I) * I) + alpha K``, so forward Euler (11) is gradient descent on it.
    ``q`` is :func:`data_scale` of ``pool`` over the ``(n - w + 1)^2`` valid positions and
    ``Ibar`` :func:`image_bar` (defaults: as in the authors' ``single_layer/linear.py``).
    """
    r = valid_correlation(kernel, image)
    q = data_scale(pool, r.size)
    ib = image_bar(image, ibar)
    return (0.25 * a * beta * q * jnp.sum(r * r) + 0.5 * a * ib * jnp.sum(kernel)
            + 0.5 * alpha * jnp.sum(kernel * kernel))


def loss_from_operator(op: Operator, kernel: jax.Array, ibar: jax.Array, *, a: float, beta: float,
                       alpha: jax.Array) -> jax.Array:
    """The same loss written with ``M``: ``||K * I||^2 = <K, M K>``."""
    return (0.25 * a * beta * jnp.vdot(kernel, op(kernel)) + 0.5 * a * ibar * jnp.sum(kernel)
            + 0.5 * alpha * jnp.vdot(kernel, kernel))


# ---------------------------------------------------------------------------- schemes


class SchemeState(NamedTuple):
    """State of the two schemes: current and previous kernel (previous unused by "gd")."""

    kernel: jax.Array
    prev_kernel: jax.Array


def make_step(op: Operator, ibar: jax.typing.ArrayLike, *, scheme: str, dt: float, a: float, beta: float,
              momentum: float = 0.9) -> Callable[[SchemeState, jax.Array], SchemeState]:
    """One step of forward Euler (11) or semi-implicit Nesterov (16)-(17) on (10).

    Args:
      op: ``M`` (windowed or periodic), or ``q M`` (:func:`scaled_operator`) for a mean pooling.
      ibar: ``Ibar``, the image mean or sum (:func:`image_bar`).
      scheme, dt, a, beta, momentum: see the module docstring.

    Returns:
      ``step(state, alpha) -> state`` (jittable, vmappable over ``alpha``).
    """
    require_x64("linear.make_step")
    _check_scheme(scheme)
    ibar = jnp.asarray(ibar, dtype=F64)

    def grad(k: jax.Array, alpha: jax.Array) -> jax.Array:
        return 0.5 * a * (ibar + beta * op(k)) + alpha * k

    if scheme == "gd":
        def step(state: SchemeState, alpha: jax.Array) -> SchemeState:
            k = state.kernel
            return SchemeState(k - dt * grad(k, alpha), k)
    else:
        _, s = nesterov_coefficients(dt, momentum)

        def step(state: SchemeState, alpha: jax.Array) -> SchemeState:
            k = state.kernel
            v = k + momentum * (k - state.prev_kernel)
            return SchemeState(v - s * grad(v, alpha), k)

    return step


def simulate(step: Callable[[SchemeState, jax.Array], SchemeState], kernel0: jax.Array, alpha: jax.Array,
             num_steps: int, record: Callable[[SchemeState], jax.Array]) -> tuple[SchemeState, jax.Array]:
    """Runs ``num_steps`` steps from ``kernel0`` (``K^{-1} = K^0``) in a ``lax.scan``; returns final state and records."""
    def body(state: SchemeState, _: None) -> tuple[SchemeState, jax.Array]:
        new = step(state, alpha)
        return new, record(new)

    return jax.lax.scan(body, SchemeState(kernel0, kernel0), None, length=num_steps)


# ------------------------------------------------------------------ empirical bounds


def make_instability_test(step: Callable[[SchemeState, jax.Array], SchemeState], num_steps: int
                          ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``is_unstable(kernel0, alpha) -> bool`` by simulation (see :func:`is_unstable` for the rule)."""
    if num_steps < 8:
        raise ConfigError(f"bisection steps={num_steps}; expected >= 8")
    q = num_steps // 8

    def test(kernel0: jax.Array, alpha: jax.Array) -> jax.Array:
        def record(state: SchemeState) -> jax.Array:
            return jnp.sqrt(jnp.sum((state.kernel - state.prev_kernel) ** 2))

        final, upd = simulate(step, kernel0, alpha, num_steps, record)
        last = jnp.max(upd[num_steps - q:])
        before = jnp.max(upd[num_steps - 2 * q:num_steps - q])
        finite = jnp.all(jnp.isfinite(final.kernel)) & jnp.all(jnp.isfinite(upd))
        return (~finite) | (last > before)

    return test


def is_unstable(test: Callable[[jax.Array, jax.Array], jax.Array], kernel0: jax.Array, alpha: float) -> bool:
    """The blow-up criterion used by the bisection.

    A run of ``N`` steps is *unstable* iff a value is non-finite, or the largest update
    norm ``||K^{n+1} - K^n||`` over the last eighth of the run (``n >= 7N/8``) exceeds the
    largest over the eighth before it (``3N/4 <= n < 7N/8``). For the affine recursion
    the updates obey the homogeneous recursion, so their norm is a sum of modes
    ``c_i rho_i^n``: the rule detects ``rho = max_i |A_i| > 1`` once the growing mode
    outweighs the decaying ones, and comparing window maxima keeps rotating (complex)
    Nesterov modes from passing for growth. Resolution: a growth ``rho = 1 + eps`` is
    seen when ``eps`` exceeds roughly the decaying modes' weight at ``3N/4``, i.e.
    ``N`` must be long against ``1/(1 - |A_2|)`` (the second largest mode).
    """
    require_x64("linear.is_unstable")
    return bool(test(kernel0, jnp.asarray(alpha, F64)))


def bisect_bounds(test: Callable[[jax.Array, jax.Array], jax.Array], kernel0: jax.Array, *, scale: float,
                  rel_tol: float = 1e-4, max_expand: int = 60) -> dict[str, Any]:
    """Empirical ``(alpha_min, alpha_max)`` by bisection on simulated runs.

    Starts from ``alpha = scale`` (``1/dt`` for GD, ``0.5/s`` for Nesterov: the middle of
    the stable band of the modes with ``mu = 0``), expands by ``scale * 2^k`` down and up
    until a run is unstable, then bisects both edges together (one vmapped program
    per round) until the bracket is below ``rel_tol * max(|edge|, scale * 1e-12)``.

    Returns:
      dict with ``alpha_min``, ``alpha_max`` (midpoints of the final brackets; ``None``
      when no stable alpha was found at ``scale``), brackets, rounds and simulations run.
    """
    require_x64("linear.bisect_bounds")
    vtest = jax.jit(jax.vmap(test, in_axes=(None, 0)))
    one = lambda al: bool(vtest(kernel0, jnp.asarray([al], F64))[0])  # noqa: E731
    sims = 1
    if one(scale):
        return {"alpha_min": None, "alpha_max": None, "stable_start": None, "simulations": sims,
                "note": f"{scale:.6g} is unstable"}
    # Expand: lower probes s - scale 2^k, upper probes s + scale 2^k, until each side is unstable.
    lo = [None, scale]  # [unstable, stable]
    hi = [scale, None]  # [stable, unstable]
    for k in range(max_expand):
        delta = scale * 2.0 ** k
        probes = [scale - delta, scale + delta]
        res = np.asarray(vtest(kernel0, jnp.asarray(probes, F64)))
        sims += 2
        if lo[0] is None:
            if res[0]:
                lo[0] = probes[0]
            else:
                lo[1] = probes[0]
        if hi[1] is None:
            if res[1]:
                hi[1] = probes[1]
            else:
                hi[0] = probes[1]
        if lo[0] is not None and hi[1] is not None:
            break
    if lo[0] is None or hi[1] is None:
        raise RuntimeError("bisect_bounds: no unstable alpha found while expanding; is the scheme ever unstable?")
    rounds = 0
    floor = scale * 1e-12
    while True:
        done_lo = lo[1] - lo[0] <= rel_tol * max(abs(lo[0]), abs(lo[1]), floor)
        done_hi = hi[1] - hi[0] <= rel_tol * max(abs(hi[0]), abs(hi[1]), floor)
        if done_lo and done_hi:
            break
        mids = np.array([0.5 * (lo[0] + lo[1]), 0.5 * (hi[0] + hi[1])])
        res = np.asarray(vtest(kernel0, jnp.asarray(mids, F64)))
        sims += 2
        rounds += 1
        if res[0]:
            lo[0] = mids[0]
        else:
            lo[1] = mids[0]
        if res[1]:
            hi[1] = mids[1]
        else:
            hi[0] = mids[1]
    return {
        "alpha_min": 0.5 * (lo[0] + lo[1]), "alpha_max": 0.5 * (hi[0] + hi[1]),
        "bracket_min": lo, "bracket_max": hi, "stable_start": scale, "rounds": rounds, "simulations": sims,
    }


def operator_extremes(op: Operator, shape: tuple[int, ...], key: jax.Array, *, tol: float = 1e-10,
                      max_iters: int = 20000) -> Extremes:
    """``mu_max`` and ``mu_min`` of a symmetric PSD map by power iteration, the latter with a shift.

    The shared solver :func:`eos_jax.eigen.psd_extremes` on the raveled map: ``mu_max`` by power
    iteration on ``M`` (PSD, so largest magnitude = largest algebraic), ``mu_min`` on
    ``mu_max I - M`` (PSD, largest eigenvalue ``mu_max - mu_min``). Each stops when the relative
    residual ``||B v - lam v|| / |lam|`` is below ``tol``. Float64 start vectors.

    Args:
      op: the linear map (e.g. :func:`make_windowed_operator`).
      shape: shape of its argument.
      key: PRNG key of the random start vectors.
      tol: relative residual tolerance.
      max_iters: iteration cap per eigenvalue.

    Returns:
      :class:`eos_jax.eigen.Extremes`.
    """
    require_x64("linear.operator_extremes")
    k1, k2 = jax.random.split(key)
    size = math.prod(shape)
    flat = lambda v: op(v.reshape(shape)).reshape(size)  # noqa: E731
    return psd_extremes(flat, jax.random.normal(k1, shape, F64).reshape(size),
                        jax.random.normal(k2, shape, F64).reshape(size), tol=tol, max_iters=max_iters)


def checkerboard_window_extremes(n: int, w: int) -> tuple[float, float]:
    """Closed form of ``(mu_min, mu_max)`` of the windowed ``M`` for the pixel checkerboard.

    ``(K * I)(x) = (-1)^{x1+x2} <K, chi>`` with ``chi(z) = (-1)^{z1+z2}``: ``C`` has rank one,
    ``M = (n - w + 1)^2 chi chi^T``, so ``mu_max = (n - w + 1)^2 w^2`` and ``mu_min = 0``
    (``w >= 2``; for ``w = 1`` both equal ``n^2``).
    """
    mu_max = float((n - w + 1) ** 2 * w * w)
    return (mu_max if w == 1 else 0.0), mu_max


# -------------------------------------------------------------------------- experiment


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Configuration of ``python -m experiments.pde linear`` (Table 2 / Table 9, Figure 4).

    Attributes:
      kernels: kernel sides ``w`` (each ``1 <= w <= size``).
      scheme: "gd" (forward Euler (11)) or "nesterov" ((16)-(17)).
      dt: time step ``Delta t`` > 0 (the learning rate for "gd").
      a: constant ``a = y_hat - y`` of (10).
      beta: Swish parameter ``beta`` > 0.
      momentum: Nesterov momentum ``m`` in (0, 1) (the damping ``d`` follows from it).
      size: side of the +1/-1 checkerboard ``I``.
      square: side of its squares in pixels (1: the pixel checkerboard ``(-1)^(i+j)``).
        The paper does not give it; the choice decides whether the periodic interval
        (14) is empty (``square=1``) or not (coarser squares spread the energy of
        ``|I_hat|^2`` over the odd harmonics of a square wave).
      seed: seed of ``K ~ N(0, 1)`` (per kernel size ``fold_in(key(seed), w)``).
      pool: data term summed ("sum", default, as in the authors' ``single_layer/linear.py``)
        or averaged ("mean") over the ``(n - w + 1)^2`` output positions.
      ibar: ``Ibar`` the image mean ("mean", default, as in linear.py) or sum ("sum", the
        paper's Eq. (47)).
      bisect_steps: iterations per simulated run of the bisection.
      rel_tol: relative bracket width at which bisection stops.
      plot_steps: iterations of the Figure-4 runs.
    """

    kernels: tuple[int, ...] = (16, 32, 64)
    scheme: str = "gd"
    dt: float = 1e-8
    a: float = -0.5
    beta: float = 1.0
    momentum: float = 0.9
    size: int = 256
    square: int = 1
    seed: int = 0
    pool: str = "sum"
    ibar: str = "mean"
    bisect_steps: int = 400
    rel_tol: float = 1e-4
    plot_steps: int = 1000

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        _check_scheme(self.scheme)
        if not (self.dt > 0 and math.isfinite(self.dt)):
            raise ConfigError(f"dt={self.dt!r}; expected a positive finite float")
        if self.scheme == "nesterov":
            _check_dt_momentum(self.dt, self.momentum)
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta={self.beta!r}; expected a positive finite float")
        if not math.isfinite(self.a) or self.a == 0:
            raise ConfigError(f"a={self.a!r}; expected a finite nonzero float")
        if self.size < 2:
            raise ConfigError(f"size={self.size!r}; expected an integer >= 2")
        if not 1 <= self.square <= self.size // 2:
            raise ConfigError(f"square={self.square!r}; expected 1 <= square <= size/2={self.size // 2}")
        if not self.kernels:
            raise ConfigError("kernels is empty; expected at least one kernel size")
        for w in self.kernels:
            if not 1 <= w <= self.size:
                raise ConfigError(f"kernel size {w!r}; expected 1 <= w <= size={self.size}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool={self.pool!r}; allowed: {', '.join(POOLS)}")
        if self.ibar not in IBARS:
            raise ConfigError(f"ibar={self.ibar!r}; allowed: {', '.join(IBARS)}")
        if self.bisect_steps < 8:
            raise ConfigError(f"bisect_steps={self.bisect_steps!r}; expected an integer >= 8")
        if not 0 < self.rel_tol < 0.1:
            raise ConfigError(f"rel_tol={self.rel_tol!r}; expected 0 < rel_tol < 0.1")
        if self.plot_steps < 1:
            raise ConfigError(f"plot_steps={self.plot_steps!r}; expected an integer >= 1")


def analyze_window(image: np.ndarray, w: int, kernel0: jax.Array, config: LinearConfig, key: jax.Array
                   ) -> dict[str, Any]:
    """Empirical bounds of the windowed scheme for one kernel size, by bisection and by spectrum."""
    q = data_scale(config.pool, (image.shape[0] - w + 1) ** 2)
    op = scaled_operator(make_windowed_operator(image, w), q)  # q M: the pooled data term
    ibar = image_bar(image, config.ibar)
    step = make_step(op, ibar, scheme=config.scheme, dt=config.dt, a=config.a, beta=config.beta,
                     momentum=config.momentum)
    t0 = time.perf_counter()
    eig = operator_extremes(op, (w, w), key)  # eigenvalues of q M
    t_spec = time.perf_counter() - t0
    spec_min, spec_max = alpha_bounds(eig.mu_min, eig.mu_max, scheme=config.scheme, dt=config.dt, a=config.a,
                                      beta=config.beta, momentum=config.momentum)
    scale = 1.0 / config.dt if config.scheme == "gd" else 0.5 / nesterov_coefficients(config.dt, config.momentum)[1]
    t0 = time.perf_counter()
    test = make_instability_test(step, config.bisect_steps)
    bis = bisect_bounds(test, kernel0, scale=scale, rel_tol=config.rel_tol)
    t_bis = time.perf_counter() - t0
    return {"eig": eig._asdict(), "spectral": (spec_min, spec_max), "bisection": bis,
            "seconds_spectral": t_spec, "seconds_bisection": t_bis, "step": step, "op": op, "ibar": ibar, "q": q}


def _check_scheme(scheme: str) -> None:
    """Raises ConfigError for an unknown scheme."""
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r}; allowed: {', '.join(SCHEMES)}")


def _check_dt_momentum(dt: float, momentum: float) -> None:
    """Raises ConfigError unless dt > 0 and 0 < momentum < 1."""
    if not (dt > 0 and math.isfinite(dt)):
        raise ConfigError(f"dt={dt!r}; expected a positive finite float")
    if not 0 < momentum < 1:
        raise ConfigError(f"momentum={momentum!r}; expected 0 < momentum < 1")
