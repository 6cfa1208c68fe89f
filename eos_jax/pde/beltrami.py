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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError

F64 = jnp.float64


def loss(u: jax.Array, signal: jax.Array, *, lam: float, delta: float, dx: float) -> jax.Array:
    """Discrete Beltrami loss (4) divided by ``dx``: ``sum lambda/2 (I - u)^2 + sum sqrt(p^2 + delta^2)``."""
    p = jnp.diff(u) / dx
    return 0.5 * lam * jnp.sum((signal - u) ** 2) + jnp.sum(jnp.sqrt(p * p + delta * delta))


def strict_step_bound(*, lam: float, delta: float, dx: float) -> float:
    """``dt_strict = 1/(lambda + 2 kappa_max/dx^2)`` with ``kappa_max = 1/delta`` (CFL for Beltrami)."""
    return 1.0 / (lam + 2.0 / (delta * dx * dx))


def piecewise_constant_signal(points: int, key: jax.Array, *, noise: float, levels: tuple[float, ...] = (
        0.0, 1.0, 0.3, 0.8, 0.0, 0.6, 0.2, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Clean piecewise-constant signal (equal-length pieces at ``levels``) and its noisy version (Gaussian)."""
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
            raise ConfigError(f"steps={self.steps!r}, record_every={self.record_every!r}; expected "
                              "record_every >= 1 and steps >= 10 * record_every")
        if not 0 < self.window <= 0.5:
            raise ConfigError(f"window={self.window!r}; expected 0 < window <= 0.5")


def simulate(signal: jax.Array, dts: jax.Array, *, steps: int, lam: float, delta: float, dx: float,
             record_every: int) -> dict[str, jax.Array]:
    """Gradient descent from ``u^0 = I`` for each step size in ``dts`` (vmapped).

    Returns per step size: final ``u``, and every ``record_every`` steps the loss,
    ``max|u|`` and ``||u^{n+1} - u^n||_inf`` (shape ``(len(dts), steps // record_every)``).
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


def classify(max_abs_u: np.ndarray, update: np.ndarray, final_u: np.ndarray, signal_max: float, *,
             window: float, divergence_factor: float, oscillation_tol: float) -> str:
    """The module docstring's rule: "divergent", "restrained" or "stable"."""
    if not (np.all(np.isfinite(max_abs_u)) and np.all(np.isfinite(final_u)) and np.all(np.isfinite(update))):
        return "divergent"
    if np.max(max_abs_u) > divergence_factor * signal_max:
        return "divergent"
    tail = update[-max(1, int(round(window * update.size))):]
    return "restrained" if np.max(tail) > oscillation_tol * signal_max else "stable"


def run_beltrami(config: BeltramiConfig, out_dir: str | Path) -> dict[str, Any]:
    """Runs every multiple of ``dt_strict``; writes ``results.json`` and ``figure2.png``.

    Args:
      config: the experiment's configuration.
      out_dir: a new or empty run directory.

    Returns:
      The results dict written to ``results.json``.
    """
    from eos_jax import io
    from eos_jax.pde.common import start_pde_run

    path, _ = start_pde_run("beltrami", config, out_dir)
    dx = 1.0 / config.points
    dt0 = strict_step_bound(lam=config.lam, delta=config.delta, dx=dx)
    clean, noisy = piecewise_constant_signal(config.points, jax.random.key(config.seed), noise=config.noise)
    dts = jnp.asarray([m * dt0 for m in config.multiples], F64)
    out = {k: np.asarray(v) for k, v in simulate(
        jnp.asarray(noisy, F64), dts, steps=config.steps, lam=config.lam, delta=config.delta, dx=dx,
        record_every=config.record_every).items()}
    smax = float(np.max(np.abs(noisy)))
    runs = {}
    for i, m in enumerate(config.multiples):
        cls = classify(out["max_abs_u"][i], out["update"][i], out["u"][i], smax, window=config.window,
                       divergence_factor=config.divergence_factor, oscillation_tol=config.oscillation_tol)
        tail = out["update"][i][-max(1, int(round(config.window * out["update"].shape[1]))):]
        runs[str(m)] = {
            "multiple": m, "dt": float(dts[i]), "classification": cls,
            "final_update_inf": float(np.max(tail)),
            "max_abs_u": float(np.max(out["max_abs_u"][i])),
            "final_loss": float(out["loss"][i][-1]),
            "rms_error_to_clean": float(np.sqrt(np.mean((out["u"][i] - clean) ** 2))),
            "loss_history": out["loss"][i], "update_history": out["update"][i], "final_u": out["u"][i],
        }
    results = {
        "dx": dx, "dt_strict": dt0, "kappa_max": 1.0 / config.delta,
        "rule": (f"divergent: non-finite or max|u| > {config.divergence_factor} max|I|; restrained: bounded and "
                 f"max ||u^(n+1)-u^n||_inf over the last {config.window:.0%} of steps > "
                 f"{config.oscillation_tol:g} max|I|; stable: otherwise"),
        "signal_clean": clean, "signal_noisy": noisy, "runs": runs,
        "notes": _notes(runs, config, smax, dx),
    }
    _plot(results, config, path / "figure2.png")
    io.atomic_write_json(path / "results.json", results)
    return results


def _notes(runs: dict[str, Any], config: BeltramiConfig, smax: float, dx: float) -> list[str]:
    """Findings beside the paper's Figure 2, each checked against this run's numbers.

    For ``lambda dt < 2`` the TV part of the gradient is bounded by ``2/dx`` per sample, so
    ``|u^(n+1)| <= |1 - lambda dt| |u^n| + dt (lambda |I| + 2/dx)``: with ``lambda dt <= 1``
    ``sup|u| <= max|I| + 2/(lambda dx)``. The note sets each run's measured ``max|u|``
    beside that bound and its classification beside "cannot blow up".
    """
    bounded = [m for m, r in runs.items() if config.lam * r["dt"] < 2]
    unbounded = [m for m in runs if m not in bounded]
    notes = []
    if bounded:
        bound = smax + 2.0 / (config.lam * dx)
        parts = []
        for m in bounded:
            r = runs[m]
            check = (f" (<= bound {bound:.4g}: {'yes' if r['max_abs_u'] <= bound else 'NO'})"
                     if config.lam * r["dt"] <= 1 else "")
            parts.append(f"{m} x: {r['classification']}, max|u| {r['max_abs_u']:.4g}{check}")
        div = [m for m in bounded if runs[m]["classification"] == "divergent"]
        notes.append(
            f"multiples {', '.join(bounded)} have lambda*dt < 2, where the fidelity term contracts and the TV term "
            "is bounded, so u cannot blow up: " + "; ".join(parts)
            + (f" -- CONTRADICTED at {div}" if div else " -- none diverges, as the bound says")
            + ("; the paper calls its 1000x run 'unstable without restraint'"
               if any(float(m) == 1000.0 and runs[m]["classification"] != "divergent" for m in bounded) else ""))
    if unbounded:
        notes.append(f"multiples {', '.join(unbounded)}: lambda*dt >= 2, the fidelity term alone is unstable: "
                     + "; ".join(f"{m} x: {runs[m]['classification']}" for m in unbounded))
    return notes


def _plot(results: dict[str, Any], config: BeltramiConfig, path: Path) -> None:
    """Figure 2: final u per multiple over the noisy and clean signal, and the update history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eos_jax.io import save_figure

    runs = results["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(4.5 * len(runs), 6.5), squeeze=False)
    x = np.arange(config.points) * results["dx"]
    for j, (m, r) in enumerate(runs.items()):
        ax = axes[0, j]
        ax.plot(x, results["signal_noisy"], color="0.7", lw=0.7, label="noisy I")
        ax.plot(x, results["signal_clean"], "k--", lw=0.7, label="clean")
        u = np.asarray(r["final_u"], dtype=np.float64)
        if np.all(np.isfinite(u)):
            ax.plot(x, u, "r", lw=1, label="u (final)")
        ax.set_title(f"{m} x dt_strict: {r['classification']}", fontsize=9)
        ax.legend(fontsize=7)
        steps = np.arange(1, len(r["update_history"]) + 1) * config.record_every
        upd = np.asarray(r["update_history"], dtype=np.float64)
        # Values past 1e100 are clipped (NaN) like the paper's Figure 4: tick locators overflow near 1e308.
        axes[1, j].semilogy(steps, np.where(np.isfinite(upd) & (upd > 0) & (upd < 1e100), upd, np.nan))
        axes[1, j].set_xlabel("step")
        axes[1, j].set_ylabel("max ||u^{n+1} - u^n||_inf per record")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def summarize(results: dict[str, Any]) -> str:
    """One line per multiple."""
    lines = [f"dt_strict = {results['dt_strict']:.6g} (dx={results['dx']:.6g}, kappa_max={results['kappa_max']:g})",
             f"rule: {results['rule']}"]
    for m, r in results["runs"].items():
        lines.append(f"{m:>7} x: {r['classification']:<10} final update {r['final_update_inf']:.3g}, "
                     f"max|u| {r['max_abs_u']:.3g}, rms error to clean {r['rms_error_to_clean']:.3g}")
    lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines)
