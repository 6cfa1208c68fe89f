"""Beltrami experiment (Section 3.2, Figure 2): run directory, findings, summary and plot.

``python -m experiments.pde beltrami --out runs/beltrami`` (~7 s). The maths (loss (4), strict
step bound, gradient descent, classifier) is :mod:`eos_jax.pde.beltrami`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from eos_jax import distributed
from eos_jax.io import atomic_write_json, save_figure
from eos_jax.pde.beltrami import (
    F64,
    BeltramiConfig,
    classify,
    piecewise_constant_signal,
    simulate,
    strict_step_bound,
)
from experiments.pde.rundir import start_run


def run_beltrami(config: BeltramiConfig, out_dir: str | Path) -> dict[str, Any]:
    """Runs every multiple of ``dt_strict``; writes ``results.json`` and ``figure2.png``.

    With several processes every process runs every multiple; process 0 writes the files.

    Args:
      config: the experiment's configuration.
      out_dir: a new or empty run directory.

    Returns:
      The results dict written to ``results.json``.
    """
    path, _ = start_run("beltrami", config, out_dir)
    dx = 1.0 / config.points
    dt0 = strict_step_bound(lam=config.lam, delta=config.delta, dx=dx)
    clean, noisy = piecewise_constant_signal(config.points, jax.random.key(config.seed), noise=config.noise)
    dts = jnp.asarray([m * dt0 for m in config.multiples], F64)
    out = {
        k: np.asarray(v)
        for k, v in simulate(
            jnp.asarray(noisy, F64),
            dts,
            steps=config.steps,
            lam=config.lam,
            delta=config.delta,
            dx=dx,
            record_every=config.record_every,
        ).items()
    }
    smax = float(np.max(np.abs(noisy)))
    runs = {}
    for i, m in enumerate(config.multiples):
        cls = classify(
            out["max_abs_u"][i],
            out["update"][i],
            out["u"][i],
            smax,
            window=config.window,
            divergence_factor=config.divergence_factor,
            oscillation_tol=config.oscillation_tol,
        )
        tail = out["update"][i][-max(1, int(round(config.window * out["update"].shape[1]))) :]
        runs[str(m)] = {
            "multiple": m,
            "dt": float(dts[i]),
            "classification": cls,
            "final_update_inf": float(np.max(tail)),
            "max_abs_u": float(np.max(out["max_abs_u"][i])),
            "final_loss": float(out["loss"][i][-1]),
            "rms_error_to_clean": float(np.sqrt(np.mean((out["u"][i] - clean) ** 2))),
            "loss_history": out["loss"][i],
            "update_history": out["update"][i],
            "final_u": out["u"][i],
        }
    results = {
        "dx": dx,
        "dt_strict": dt0,
        "kappa_max": 1.0 / config.delta,
        "rule": (
            f"divergent: non-finite or max|u| > {config.divergence_factor} max|I|; restrained: bounded and "
            f"max ||u^(n+1)-u^n||_inf over the last {config.window:.0%} of steps > "
            f"{config.oscillation_tol:g} max|I|; stable: otherwise"
        ),
        "signal_clean": clean,
        "signal_noisy": noisy,
        "runs": runs,
        "notes": _notes(runs, config, smax, dx),
    }
    if distributed.is_primary():  # several processes: each computed the same results; process 0 writes
        _plot(results, config, path / "figure2.png")
        atomic_write_json(path / "results.json", results)
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
            check = (
                f" (<= bound {bound:.4g}: {'yes' if r['max_abs_u'] <= bound else 'NO'})"
                if config.lam * r["dt"] <= 1
                else ""
            )
            parts.append(f"{m} x: {r['classification']}, max|u| {r['max_abs_u']:.4g}{check}")
        div = [m for m in bounded if runs[m]["classification"] == "divergent"]
        notes.append(
            f"multiples {', '.join(bounded)} have lambda*dt < 2, where the fidelity term contracts and the TV term "
            "is bounded, so u cannot blow up: "
            + "; ".join(parts)
            + (f" -- CONTRADICTED at {div}" if div else " -- none diverges, as the bound says")
            + (
                "; the paper calls its 1000x run 'unstable without restraint'"
                if any(float(m) == 1000.0 and runs[m]["classification"] != "divergent" for m in bounded)
                else ""
            )
        )
    if unbounded:
        notes.append(
            f"multiples {', '.join(unbounded)}: lambda*dt >= 2, the fidelity term alone is unstable: "
            + "; ".join(f"{m} x: {runs[m]['classification']}" for m in unbounded)
        )
    return notes


def _plot(results: dict[str, Any], config: BeltramiConfig, path: Path) -> None:
    """Figure 2: final u per multiple over the noisy and clean signal, and the update history."""
    runs = results["runs"]
    fig = Figure(figsize=(4.5 * len(runs), 6.5))
    axes = fig.subplots(2, len(runs), squeeze=False)
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
    save_figure(fig, path, bbox_inches=None)  # laid out already: no second (bbox) render


def summarize(results: dict[str, Any]) -> str:
    """One line per multiple."""
    lines = [
        f"dt_strict = {results['dt_strict']:.6g} (dx={results['dx']:.6g}, kappa_max={results['kappa_max']:g})",
        f"rule: {results['rule']}",
    ]
    for m, r in results["runs"].items():
        lines.append(
            f"{m:>7} x: {r['classification']:<10} final update {r['final_update_inf']:.3g}, "
            f"max|u| {r['max_abs_u']:.3g}, rms error to clean {r['rms_error_to_clean']:.3g}"
        )
    lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines)
