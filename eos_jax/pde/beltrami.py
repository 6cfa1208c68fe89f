"""Gradient descent on the Beltrami loss (4) and restrained instabilities (Section 3.2, Figure 2).

Discretization. ``N`` samples ``u_j`` on ``[0, 1)``, ``dx = 1/N``, forward differences
``p_j = (u_{j+1} - u_j)/dx`` (``j = 0..N-2``, free ends). The discrete loss is
``L(u) = sum_j [lambda/2 (I_j - u_j)^2] + sum_j sqrt(p_j^2 + delta^2)``, i.e. the
continuous loss (4) divided by ``dx``, so that ``-dL/du_j = lambda (I_j - u_j) +
(g_j - g_{j-1})/dx`` with ``g = p/sqrt(p^2 + delta^2)`` is the right-hand side of the PDE
(4) and gradient descent ``u <- u - dt grad L(u)`` (``jax.grad`` of :func:`loss`) IS the
forward-Euler scheme with time step ``dt``.

Step bound. Freezing ``kappa = (p^2 + delta^2)^{-1/2}`` the paper's CFL condition for
Beltrami is ``dt < 1/(lambda + 2 kappa/dx^2)``; the strict (worst-case) bound uses
``kappa_max = 1/delta``: ``dt_strict = 1/(lambda + 2/(delta dx^2))``. (The exact Hessian of
``L`` has largest eigenvalue at most ``lambda + 4/(delta dx^2)``, so plain GD stability on a
flat ``u`` allows up to ``2/(lambda + 4/(delta dx^2))``, about ``dt_strict`` as well.)

Classification of a run (stated rule, measured over the last ``window`` fraction of steps):

* ``divergent``: a non-finite value, or ``max|u| > divergence_factor * max|I|`` at any
  recorded step;
* ``restrained``: bounded, but the update keeps moving: the largest
  ``||u^{n+1} - u^n||_inf`` over the window exceeds ``oscillation_tol * max|I|``;
* ``stable``: bounded and the updates over the window are below that level (converged).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError
from eos_jax.pde.common import require_x64

F64 = jnp.float64


def loss(u: jax.Array, signal: jax.Array, *, lam: float, delta: float, dx: float) -> jax.Array:
    """Discrete Beltrami loss (4) divided by ``dx``: ``sum lambda/2 (I - u)^2 + sum sqrt(p^2 + delta^2)``.

    Examples:
      At ``u = I`` constant only the ``N - 1`` terms ``sqrt(0 + delta^2)`` remain:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import beltrami
      >>> u = jnp.zeros(5)
      >>> round(float(jax.jit(beltrami.loss)(u, u, lam=1.0, delta=0.1, dx=0.2)), 6)
      0.4
    """
    p = jnp.diff(u) / dx
    return 0.5 * lam * jnp.sum((signal - u) ** 2) + jnp.sum(jnp.sqrt(p * p + delta * delta))


def strict_step_bound(*, lam: float, delta: float, dx: float) -> float:
    """``dt_strict = 1/(lambda + 2 kappa_max/dx^2)`` with ``kappa_max = 1/delta`` (CFL for Beltrami).

    Examples:
      Figure 2's setting, ``lambda = 1000``, ``delta = 0.1``, ``N = 256``:
      ``1/dt_strict = 1000 + 2 * 256**2 / 0.1``:

      >>> from eos_jax.pde import beltrami
      >>> round(1 / beltrami.strict_step_bound(lam=1000.0, delta=0.1, dx=1 / 256), 6)
      1311720.0
    """
    return 1.0 / (lam + 2.0 / (delta * dx * dx))


def piecewise_constant_signal(
    points: int, key: jax.Array, *, noise: float, levels: tuple[float, ...] = (0.0, 1.0, 0.3, 0.8, 0.0, 0.6, 0.2, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Clean piecewise-constant signal (equal-length pieces at ``levels``) and its noisy version (Gaussian).

    Examples:
      >>> import jax
      >>> from eos_jax.pde import beltrami
      >>> with jax.enable_x64(True):
      ...     clean, noisy = beltrami.piecewise_constant_signal(16, jax.random.PRNGKey(0), noise=0.1)
      >>> clean.tolist()
      [0.0, 0.0, 1.0, 1.0, 0.3, 0.3, 0.8, 0.8, 0.0, 0.0, 0.6, 0.6, 0.2, 0.2, 1.0, 1.0]
      >>> noisy.shape, noisy.dtype
      ((16,), dtype('float64'))
    """
    require_x64("beltrami.piecewise_constant_signal")
    idx = np.minimum(np.arange(points) * len(levels) // points, len(levels) - 1)
    clean = np.asarray(levels, dtype=np.float64)[idx]
    noisy = clean + noise * np.asarray(jax.random.normal(key, (points,), F64))
    return clean, noisy


@dataclasses.dataclass(frozen=True)
class BeltramiConfig:
    """Configuration of ``python -m experiments.pde beltrami`` (Figure 2).

    Attributes:
      multiples: step sizes as multiples of ``dt_strict``.
      points: samples ``N`` on ``[0, 1)`` (``dx = 1/N``).
      steps: gradient-descent steps of every run.
      lam: data-fidelity weight ``lambda``.
      delta: ``delta`` of (4).
      noise: standard deviation of the Gaussian noise added to the signal.
      seed: noise seed.
      window: fraction of final steps over which runs are classified.
      divergence_factor: divergent when ``max|u|`` exceeds this times ``max|I|``.
      oscillation_tol: restrained when the final updates exceed this times ``max|I|``.
      record_every: loss / update history stride.

    Examples:
      >>> from eos_jax.pde.beltrami import BeltramiConfig
      >>> BeltramiConfig().multiples, BeltramiConfig().points
      ((1.0, 10.0, 100.0, 1000.0), 256)
      >>> BeltramiConfig(window=0.9).validate()
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: window=0.9; expected 0 < window <= 0.5
    """

    multiples: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    points: int = 256
    steps: int = 50000
    lam: float = 1000.0
    delta: float = 0.1
    noise: float = 0.1
    seed: int = 0
    window: float = 0.1
    divergence_factor: float = 10.0
    oscillation_tol: float = 1e-6
    record_every: int = 50

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        if not self.multiples or any(not (m > 0 and math.isfinite(m)) for m in self.multiples):
            raise ConfigError(f"multiples={self.multiples!r}; expected positive finite values")
        for name in ("lam", "delta"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name}={v!r}; expected a positive finite float")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ConfigError(f"noise={self.noise!r}; expected a finite float >= 0")
        if self.points < 8:
            raise ConfigError(f"points={self.points!r}; expected an integer >= 8")
        if self.record_every < 1 or self.steps < 10 * self.record_every:
            raise ConfigError(
                f"steps={self.steps!r}, record_every={self.record_every!r}; expected "
                "record_every >= 1 and steps >= 10 * record_every"
            )
        if not 0 < self.window <= 0.5:
            raise ConfigError(f"window={self.window!r}; expected 0 < window <= 0.5")


def simulate(
    signal: jax.Array, dts: jax.Array, *, steps: int, lam: float, delta: float, dx: float, record_every: int
) -> dict[str, jax.Array]:
    """Gradient descent from ``u^0 = I`` for each step size in ``dts`` (vmapped).

    Returns per step size: final ``u``, and every ``record_every`` steps the loss,
    ``max|u|`` and ``||u^{n+1} - u^n||_inf`` (shape ``(len(dts), steps // record_every)``).

    Examples:
      Figure 2 in miniature (16 samples, 200 steps) at 1, 10 and 50 times ``dt_strict``:
      converged, restrained (bounded but still moving), divergent:

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.pde import beltrami
      >>> kw = dict(lam=1000.0, delta=0.1, dx=1 / 16)
      >>> with jax.enable_x64(True):
      ...     _, noisy = beltrami.piecewise_constant_signal(16, jax.random.PRNGKey(0), noise=0.1)
      ...     dts = beltrami.strict_step_bound(**kw) * jnp.array([1.0, 10.0, 50.0])
      ...     out = beltrami.simulate(jnp.asarray(noisy), dts, steps=200, record_every=10, **kw)
      ...     out = {name: np.asarray(v) for name, v in out.items()}
      >>> out["loss"].shape, out["u"].shape
      ((3, 20), (3, 16))
      >>> [beltrami.classify(out["max_abs_u"][i], out["update"][i], out["u"][i], float(np.abs(noisy).max()),
      ...                    window=0.1, divergence_factor=10.0, oscillation_tol=1e-6) for i in range(3)]
      ['stable', 'restrained', 'divergent']
    """
    grad = jax.grad(loss)

    def one(dt: jax.Array) -> dict[str, jax.Array]:
        def inner(u: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
            new = u - dt * grad(u, signal, lam=lam, delta=delta, dx=dx)
            return new, jnp.max(jnp.abs(new - u))

        def outer(u: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
            u, upd = jax.lax.scan(inner, u, None, length=record_every)
            rec = jnp.stack([loss(u, signal, lam=lam, delta=delta, dx=dx), jnp.max(jnp.abs(u)), jnp.max(upd)])
            return u, rec

        u, rec = jax.lax.scan(outer, signal, None, length=steps // record_every)
        return {"u": u, "loss": rec[:, 0], "max_abs_u": rec[:, 1], "update": rec[:, 2]}

    return jax.jit(jax.vmap(one))(dts)


def classify(
    max_abs_u: np.ndarray,
    update: np.ndarray,
    final_u: np.ndarray,
    signal_max: float,
    *,
    window: float,
    divergence_factor: float,
    oscillation_tol: float,
) -> str:
    """The module docstring's rule: "divergent", "restrained" or "stable".

    Examples:
      >>> import numpy as np
      >>> from eos_jax.pde.beltrami import classify
      >>> kw = dict(window=0.5, divergence_factor=10.0, oscillation_tol=1e-6)
      >>> bounded, u = np.ones(4), np.zeros(3)
      >>> classify(bounded, np.array([1.0, 0.1, 0.0, 0.0]), u, 1.0, **kw)
      'stable'
      >>> classify(bounded, np.array([1.0, 0.1, 0.01, 0.01]), u, 1.0, **kw)
      'restrained'
      >>> classify(np.array([1.0, 2.0, 50.0, 1.0]), np.zeros(4), u, 1.0, **kw)
      'divergent'
    """
    if not (np.all(np.isfinite(max_abs_u)) and np.all(np.isfinite(final_u)) and np.all(np.isfinite(update))):
        return "divergent"
    if np.max(max_abs_u) > divergence_factor * signal_max:
        return "divergent"
    tail = update[-max(1, int(round(window * update.size))) :]
    return "restrained" if np.max(tail) > oscillation_tol * signal_max else "stable"
