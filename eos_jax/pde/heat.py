"""The heat equation (1) and its forward-Euler / central-difference scheme (2) (Section 3.1).

Grid: ``K`` interior points ``x_j = j dx``, ``j = 1..K``, ``dx = L/(K + 1)``, Dirichlet ends
``u(0) = u(L) = 0``; ``r = kappa dt / dx^2``. The scheme (2) is
``u_j <- u_j + r (u_{j+1} - 2 u_j + u_{j-1})``.

Modes. With Dirichlet ends the eigenvectors of the discrete Laplacian are the sine modes
``phi_m(j) = sin(m pi j / (K + 1))``, ``m = 1..K`` (the discrete sine transform, DST-I,
takes the place of the paper's DFT), and (2) multiplies mode ``m`` by exactly::

    A_m = 1 - 2 r (1 - cos(m pi / (K + 1))),

which is the paper's ``A(omega) = 1 - 2 kappa dt/dx^2 [1 - cos(omega dx)]`` at the
Dirichlet wavenumbers ``omega_m = m pi / L`` (``omega_m dx = m pi/(K + 1)``). The scheme is
stable iff ``|A_m| < 1`` for all ``m``; since ``A_m`` decreases in ``m`` with
``A_m > 1 - 4r``, ``r <= 1/2`` (the CFL condition ``dt < dx^2/(2 kappa)``) suffices, and
for ``r > 1/2`` the mode with the largest ``|A_m|`` is ``m = K`` (the highest frequency).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError
from eos_jax.pde.common import require_x64

F64 = jnp.float64


def amplifier(ratio: float, points: int) -> np.ndarray:
    """``A_m = 1 - 2 r (1 - cos(m pi/(K + 1)))`` for ``m = 1..K`` (Eq. (3) with Dirichlet modes).

    Examples:
      At ``r = 1/2`` and ``K = 3``, ``A_m = cos(m pi/4)``:

      >>> import numpy as np
      >>> from eos_jax.pde import heat
      >>> np.round(heat.amplifier(0.5, 3), 6).tolist()
      [0.707107, 0.0, -0.707107]
    """
    m = np.arange(1, points + 1, dtype=np.float64)
    return 1.0 - 2.0 * ratio * (1.0 - np.cos(m * np.pi / (points + 1)))


def cfl_ratio_bound() -> float:
    """The CFL bound on ``r = kappa dt/dx^2``: stable for every grid iff ``r <= 1/2``.

    Examples:
      Above the bound the highest mode is amplified (``|A_K| > 1``), at it none is:

      >>> import numpy as np
      >>> from eos_jax.pde import heat
      >>> r = heat.cfl_ratio_bound()
      >>> r, bool(np.abs(heat.amplifier(r, 29)).max() <= 1), bool(np.abs(heat.amplifier(0.6, 29)).max() > 1)
      (0.5, True, True)
    """
    return 0.5


def sine_basis(points: int) -> np.ndarray:
    """The ``K x K`` DST-I matrix ``S[m-1, j-1] = sin(m pi j/(K + 1))`` (``S @ S = (K + 1)/2 I``).

    Examples:
      >>> import numpy as np
      >>> from eos_jax.pde import heat
      >>> S = heat.sine_basis(5)
      >>> S.shape, bool(np.allclose(S @ S, 3.0 * np.eye(5)))
      ((5, 5), True)
    """
    j = np.arange(1, points + 1, dtype=np.float64)
    return np.sin(np.outer(j, j) * np.pi / (points + 1))


def triangle(points: int, length: float, height: float = 1.0) -> np.ndarray:
    """Triangle initial condition on the interior points: 0 at both ends, ``height`` at ``L/2``.

    Examples:
      >>> from eos_jax.pde import heat
      >>> heat.triangle(3, 4.0).tolist()
      [0.5, 1.0, 0.5]
    """
    x = np.arange(1, points + 1, dtype=np.float64) * (length / (points + 1))
    return height * (1.0 - np.abs(x - 0.5 * length) / (0.5 * length))


def simulate(u0: jax.typing.ArrayLike, ratio: float, steps: int) -> jax.Array:
    """Scheme (2) with Dirichlet zeros; returns all iterates ``u^0..u^steps`` as ``(steps + 1, K)`` float64.

    Examples:
      A sine mode is an eigenvector of the scheme: after ``n`` steps it is ``A_m^n`` times itself.
      The scheme runs in float64, so JAX's x64 mode must be on:

      >>> import jax, numpy as np
      >>> from eos_jax.pde import heat
      >>> phi = heat.sine_basis(5)[1]  # mode m = 2
      >>> with jax.enable_x64(True):
      ...     hist = np.asarray(heat.simulate(phi, 0.4, 3))
      >>> hist.shape, hist.dtype
      ((4, 5), dtype('float64'))
      >>> bool(np.allclose(hist[3], heat.amplifier(0.4, 5)[1] ** 3 * phi, rtol=0, atol=1e-12))
      True
    """
    require_x64("heat.simulate")
    u0 = jnp.asarray(u0, dtype=F64)

    def body(u: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
        padded = jnp.pad(u, 1)
        new = u + ratio * (padded[2:] - 2.0 * u + padded[:-2])
        return new, new

    _, hist = jax.jit(lambda u: jax.lax.scan(body, u, None, length=steps))(u0)
    return jnp.concatenate([u0[None], hist], axis=0)


def measured_growth(history: np.ndarray, *, rel_floor: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Per-mode growth factor measured from the iterates by least squares in the sine basis.

    ``g_m = sum_n c_m^{n+1} c_m^n / sum_n (c_m^n)^2`` with ``c^n = S u^n``, over the steps where
    ``|c_m^n|`` is above ``rel_floor`` times the largest coefficient at that step (below it
    the coefficient is rounding noise). Returns ``(g, used)``; ``g`` is NaN where unused.

    Examples:
      The triangle has only odd modes; their measured growth is the amplifier ``A_m``:

      >>> import jax, numpy as np
      >>> from eos_jax.pde import heat
      >>> with jax.enable_x64(True):
      ...     hist = np.asarray(heat.simulate(heat.triangle(9, 10.0), 0.8, 60))
      >>> g, used = heat.measured_growth(hist)
      >>> np.flatnonzero(used).tolist()
      [0, 2, 4, 6, 8]
      >>> bool(np.allclose(g[used], heat.amplifier(0.8, 9)[used]))
      True
    """
    coeffs = np.asarray(history) @ sine_basis(history.shape[1])
    scale = np.max(np.abs(coeffs), axis=1, keepdims=True)
    ok = np.abs(coeffs) > rel_floor * scale
    pair = ok[:-1] & ok[1:]
    num = np.sum(np.where(pair, coeffs[1:] * coeffs[:-1], 0.0), axis=0)
    den = np.sum(np.where(pair, coeffs[:-1] ** 2, 0.0), axis=0)
    used = den > 0
    g = np.where(used, num / np.where(used, den, 1.0), np.nan)
    return g, used


def first_mode_to_cross(history: np.ndarray, threshold: float) -> tuple[int | None, int | None]:
    """The first mode ``m`` (1-based) whose sine coefficient reaches ``|c_m^n| > threshold``, and that step ``n``.

    Examples:
      Above the CFL bound the highest mode (``m = K = 9``) is the first to grow tenfold:

      >>> import jax, numpy as np
      >>> from eos_jax.pde import heat
      >>> u0 = heat.triangle(9, 10.0)
      >>> with jax.enable_x64(True):
      ...     hist = np.asarray(heat.simulate(u0, 0.8, 60))
      >>> threshold = 10 * np.abs(u0 @ heat.sine_basis(9)).max()
      >>> heat.first_mode_to_cross(hist, threshold)
      (9, 8)
      >>> heat.first_mode_to_cross(hist[:5], threshold)
      (None, None)
    """
    coeffs = np.abs(np.asarray(history) @ sine_basis(history.shape[1]))
    hit = coeffs > threshold
    if not hit.any():
        return None, None
    n = int(np.argmax(hit.any(axis=1)))
    m = int(np.argmax(np.where(hit[n], coeffs[n], -1.0))) + 1
    return m, n


@dataclasses.dataclass(frozen=True)
class HeatConfig:
    """Configuration of ``python -m experiments.pde heat`` (Figure 1).

    Attributes:
      ratios: values of ``r = kappa dt / dx^2``.
      points: interior grid points ``K``.
      length: domain length ``L`` (Dirichlet ends at 0 and L).
      steps: time steps per run.
      cross_factor: a mode "grows" when its sine coefficient exceeds ``cross_factor`` times
        the largest initial coefficient.

    Examples:
      >>> from eos_jax.pde.heat import HeatConfig
      >>> HeatConfig().ratios, HeatConfig(points=9).points
      ((0.4, 0.8), 9)
      >>> HeatConfig(ratios=(-0.1,)).validate()
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: ratios=(-0.1,); expected positive finite values of kappa*dt/dx^2
    """

    ratios: tuple[float, ...] = (0.4, 0.8)
    points: int = 29
    length: float = 30.0
    steps: int = 200
    cross_factor: float = 10.0

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        if not self.ratios or any(not (r > 0 and math.isfinite(r)) for r in self.ratios):
            raise ConfigError(f"ratios={self.ratios!r}; expected positive finite values of kappa*dt/dx^2")
        if self.points < 2:
            raise ConfigError(f"points={self.points!r}; expected an integer >= 2")
        if not (self.length > 0 and math.isfinite(self.length)):
            raise ConfigError(f"length={self.length!r}; expected a positive finite float")
        if self.steps < 2:
            raise ConfigError(f"steps={self.steps!r}; expected an integer >= 2")
        if not self.cross_factor > 1:
            raise ConfigError(f"cross_factor={self.cross_factor!r}; expected > 1")


def analyze(config: HeatConfig, ratio: float) -> dict[str, Any]:
    """Simulates one ``r`` and compares the measured per-mode growth with ``A_m``.

    Examples:
      >>> import jax
      >>> from eos_jax.pde import heat
      >>> config = heat.HeatConfig(ratios=(0.8,), points=9, steps=60)
      >>> with jax.enable_x64(True):
      ...     res = heat.analyze(config, 0.8)
      >>> res["behaviour"], res["largest_abs_amplifier_mode"], res["first_mode_to_grow"]
      ('blows up', 9, 9)
      >>> res["predicted_first_mode_to_grow"], res["max_rel_err_growth_vs_amplifier"] < 1e-6
      (9, True)
    """
    u0 = triangle(config.points, config.length)
    hist = np.asarray(simulate(u0, ratio, config.steps))
    amp = amplifier(ratio, config.points)
    g, used = measured_growth(hist)
    c0 = np.abs(u0 @ sine_basis(config.points))
    threshold = config.cross_factor * float(c0.max())
    m_cross, n_cross = first_mode_to_cross(hist, threshold)
    # Prediction from A: mode m crosses after log(threshold/|c_m^0|)/log|A_m| steps
    # (only modes with |A_m| > 1 and a nonzero initial coefficient can cross).
    with np.errstate(divide="ignore", invalid="ignore"):
        n_pred = np.where(
            (np.abs(amp) > 1) & (c0 > 1e-12 * c0.max()), np.log(threshold / c0) / np.log(np.abs(amp)), np.inf
        )
    finite = bool(np.all(np.isfinite(hist)))
    max_final = float(np.max(np.abs(hist[-1]))) if finite else float("inf")
    rel_err = np.abs(g[used] - amp[used]) / np.abs(amp[used])
    return {
        "ratio": ratio,
        "dt_over_cfl": ratio / cfl_ratio_bound(),
        "behaviour": "decays" if max_final < float(np.max(np.abs(u0))) else "blows up",
        "max_abs_u_initial": float(np.max(np.abs(u0))),
        "max_abs_u_final": max_final,
        "amplifier": amp.tolist(),
        "measured_growth": [None if not used[i] else float(g[i]) for i in range(len(g))],
        "max_rel_err_growth_vs_amplifier": float(rel_err.max()) if rel_err.size else None,
        "modes_measured": int(used.sum()),
        "largest_abs_amplifier_mode": int(np.argmax(np.abs(amp))) + 1,
        "first_mode_to_grow": m_cross,
        "first_growth_step": n_cross,
        "predicted_first_mode_to_grow": (int(np.argmin(n_pred)) + 1) if np.isfinite(n_pred).any() else None,
        "grow_threshold": threshold,
        "snapshots": {str(n): hist[n].tolist() for n in _snapshot_steps(config.steps)},
    }


def _snapshot_steps(steps: int) -> list[int]:
    """A few iteration numbers to plot (0, some intermediate, last)."""
    return sorted({0, 1, 5, 10, 20, 40, steps // 2, steps} & set(range(steps + 1)))
