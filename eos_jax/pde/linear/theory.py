"""Von Neumann theory of the linearized CNN PDE (10): amplifiers, the bounds (14) and (18) on alpha, the image spectrum."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError
from eos_jax.pde.common import require_x64

SCHEMES = ("gd", "nesterov")
POOLS = ("sum", "mean")
IBARS = ("mean", "sum")
F64 = jnp.float64
C128 = jnp.complex128

Operator = Callable[[jax.Array], jax.Array]


def nesterov_coefficients(dt: float, momentum: float) -> tuple[float, float]:
    """Damping ``d`` and step ``s`` of the Nesterov scheme (16)-(17) for a given momentum.

    Args:
      dt: time step ``Delta t`` > 0.
      momentum: ``m = (2 - d dt)/(2 + d dt)`` in (0, 1).

    Returns:
      ``(d, s)`` with ``d = 2 (1 - m)/((1 + m) dt)`` and ``s = 2 dt^2/(2 + d dt)``.

    Examples:
      ``s = (1 + m) dt^2 / 2``:

      >>> from eos_jax.pde import linear
      >>> d, s = linear.nesterov_coefficients(0.1, 0.9)
      >>> round(d, 9), round(s, 9)
      (1.052631579, 0.0095)
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

    Examples:
      At ``m = 0.9`` the exact Nesterov bound ``4/2.8`` is 7% above the paper's ``4/3``:

      >>> from eos_jax.pde import linear
      >>> linear.z_bound("gd", 0.5)
      4.0
      >>> round(linear.z_bound("nesterov", 1.0, 0.9), 6), round(linear.z_bound("nesterov", 1.0, 0.9, form="paper"), 6)
      (1.428571, 1.333333)
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
    mu_min: float,
    mu_max: float,
    *,
    scheme: str,
    dt: float,
    a: float,
    beta: float,
    momentum: float = 0.9,
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

    Examples:
      Eq. (14) with ``a = -1/2``, ``beta = 1``: ``alpha_min = max mu / 4`` and
      ``alpha_max = 2/dt - min mu / 4``:

      >>> from eos_jax.pde import linear
      >>> linear.alpha_bounds(0.0, 64.0, scheme="gd", dt=0.01, a=-0.5, beta=1.0)
      (16.0, 200.0)
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

    Examples:
      Forward Euler: ``A = 1 - dt z`` (float64, so x64 must be on); Nesterov at
      ``m = 0.9`` crosses ``|A| = 1`` at ``z = 4/(2.8 dt^2)``:

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.pde import linear
      >>> with jax.enable_x64(True):
      ...     gd = linear.amplifier(jnp.array([0.0, 100.0, 300.0]), scheme="gd", dt=0.01)
      ...     z = 4 / (2.8 * 0.01**2) * jnp.array([0.999, 1.001])
      ...     nag = jax.jit(lambda z: linear.amplifier(z, scheme="nesterov", dt=0.01, momentum=0.9))(z)
      ...     print(gd.tolist(), nag.dtype, (np.abs(nag) > 1).tolist())
      [1.0, 0.0, -2.0] complex128 [False, True]
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
    """``|I_hat(omega)|^2`` on the full DFT grid (unnormalized DFT, as in Section 3.1), float64.

    Examples:
      The pixel checkerboard's energy is all at the Nyquist frequency: ``n**4`` there:

      >>> import jax, numpy as np
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     spec = np.asarray(linear.image_spectrum(checkerboard(4)))
      >>> spec.shape, float(spec[2, 2]), float(spec.sum())
      ((4, 4), 256.0, 256.0)
    """
    require_x64("linear.image_spectrum")
    img = jnp.asarray(image, dtype=F64)
    return jnp.abs(jnp.fft.fft2(img)) ** 2


def data_scale(pool: str, positions: int) -> float:
    """Factor ``q`` of the data term ``beta (K * I) * I``: ``1/positions`` for "mean", 1 for "sum".

    Examples:
      >>> from eos_jax.pde import linear
      >>> linear.data_scale("mean", 4), linear.data_scale("sum", 4)
      (0.25, 1.0)
    """
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r}; allowed: {', '.join(POOLS)}")
    return 1.0 / positions if pool == "mean" else 1.0


def image_bar(image: jax.typing.ArrayLike, ibar: str) -> float:
    """``Ibar`` of (10): the image mean (``ibar="mean"``, as in linear.py) or its sum (the paper's text).

    Examples:
      >>> import jax, numpy as np
      >>> from eos_jax.pde import linear
      >>> with jax.enable_x64(True):
      ...     print(linear.image_bar(np.ones((2, 2)), "mean"), linear.image_bar(np.ones((2, 2)), "sum"))
      1.0 4.0
    """
    require_x64("linear.image_bar")
    if ibar not in IBARS:
        raise ConfigError(f"ibar={ibar!r}; allowed: {', '.join(IBARS)}")
    img = np.asarray(image, np.float64)
    return float(img.mean() if ibar == "mean" else img.sum())


def theory_bounds(
    image: jax.typing.ArrayLike,
    *,
    scheme: str,
    dt: float,
    a: float,
    beta: float,
    momentum: float = 0.9,
    form: str = "exact",
    pool: str = "sum",
) -> tuple[float, float]:
    """Bounds (14) / (18) of the periodic (``w -> infinity``) scheme from the DFT of ``image``.

    With ``pool="mean"`` the periodic data term is averaged over the ``n^2`` positions of
    the torus, so ``|I_hat|^2`` enters as ``|I_hat|^2 / n^2``.

    Examples:
      Table 2's periodic setting (256 x 256 pixel checkerboard, ``dt = 1e-8``,
      ``a = -1/2``): ``alpha_min = 256**4 / 4`` exceeds ``alpha_max = 2/dt``, an empty interval:

      >>> import jax
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     lo, hi = linear.theory_bounds(checkerboard(256), scheme="gd", dt=1e-8, a=-0.5, beta=1.0)
      >>> lo, hi, lo >= hi
      (1073741824.0, 200000000.0, True)
    """
    spec = np.asarray(image_spectrum(image))
    q = data_scale(pool, spec.size)
    return alpha_bounds(
        q * float(spec.min()), q * float(spec.max()), scheme=scheme, dt=dt, a=a, beta=beta, momentum=momentum, form=form
    )


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
