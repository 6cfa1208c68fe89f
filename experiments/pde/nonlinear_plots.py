"""Plots of the non-linear PDE experiment: Figure 5 (loss, RelL1), Figure 6 (dt*lambda_max), Table 3 regimes.

Object-oriented matplotlib only (:class:`matplotlib.figure.Figure`, saved atomically by
:func:`eos_jax.io.save_figure`): no pyplot state, no backend switch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from eos_jax.io import save_figure
from eos_jax.pde.nonlinear import REGIMES, NonlinearConfig


def _colors(n: int) -> list[Any]:
    """Distinct line colors."""
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _plot_loss(ax: Any, results: dict[str, Any], config: NonlinearConfig) -> None:
    """Loss (7) of the k=1 lanes, log scale."""
    for (key, v), c in zip(results["per_dt"].items(), _colors(len(config.dts))):
        loss = np.asarray(v["lanes"]["k1"]["loss"], np.float64)
        ax.plot(np.arange(loss.size), loss, color=c, lw=0.8, label=f"dt={key} ({v['classification']})")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (7)")
    ax.legend(fontsize=7)


def plot_figure5(results: dict[str, Any], config: NonlinearConfig, path: Path) -> None:
    """Figure 5: loss and RelL1(k=1, k=3) per dt."""
    fig = Figure(figsize=(11, 4))
    a1, a2 = fig.subplots(1, 2)
    _plot_loss(a1, results, config)
    for (key, v), c in zip(results["per_dt"].items(), _colors(len(config.dts))):
        rel = np.asarray(v["rel_l1"], np.float64)
        a2.plot(np.arange(rel.size), np.where(rel > 0, rel, np.nan), color=c, lw=0.5, alpha=0.35)
        ma = v["rel_l1_moving_average"]
        avg = np.asarray(ma["values"], np.float64)
        a2.plot(
            np.arange(avg.size) + ma["first_step"], np.where(avg > 0, avg, np.nan), color=c, lw=1.4, label=f"dt={key}"
        )
    a2.axhline(config.rel_l1_level, color="k", ls=":", lw=0.8, label="amplified level")
    a2.set_yscale("log")
    a2.set_xlabel("iteration (average: last step of its window)")
    a2.set_ylabel(f"RelL1(k=1, k={config.k}): raw (faint), {config.rel_l1_window}-step mean")
    a2.legend(fontsize=7)
    fig.suptitle("non-linear PDE (9): loss and perturbation growth (cf. Figure 5)")
    save_figure(fig, path)


def plot_figure6(results: dict[str, Any], config: NonlinearConfig, path: Path) -> None:
    """Figure 6: loss and normalized sharpness dt * lambda_max with the line at 2."""
    fig = Figure(figsize=(11, 4))
    a1, a2 = fig.subplots(1, 2)
    _plot_loss(a1, results, config)
    steps = np.asarray(results["sharpness_steps"])
    for (key, v), c in zip(results["per_dt"].items(), _colors(len(config.dts))):
        ns = np.asarray(v["lanes"]["k1"]["normalized_sharpness"], np.float64)
        a2.plot(steps, ns, color=c, lw=0.8, marker=".", ms=2, label=f"dt={key}")
    a2.axhline(2.0, color="k", ls="--", lw=1.0, label="2 (GD stability)")
    a2.set_yscale("symlog", linthresh=1.0)
    a2.set_xlabel("iteration")
    a2.set_ylabel("dt * lambda_max")
    a2.legend(fontsize=7)
    fig.suptitle("non-linear PDE (9): normalized sharpness (cf. Figure 6)")
    save_figure(fig, path)


def plot_regimes(results: dict[str, Any], config: NonlinearConfig, path: Path) -> None:
    """Fractions of positions per regime of Table 3 (k=1 lanes), one panel per regime."""
    fig = Figure(figsize=(14, 3.5))
    axes = fig.subplots(1, 3, sharey=True)
    span = max(1, min(25, config.steps // 20))  # the regimes switch every few steps: show a moving average
    for ax, reg in zip(axes, REGIMES):
        for (key, v), c in zip(results["per_dt"].items(), _colors(len(config.dts))):
            f = np.asarray(v["lanes"]["k1"]["fractions"][reg], np.float64)
            avg = np.convolve(f, np.ones(span) / span, mode="valid")
            ax.plot(np.arange(avg.size) + span - 1, avg, color=c, lw=0.8, label=f"dt={key}")
        ax.set_title(reg.replace("_", " "))
        ax.set_xlabel("iteration")
    axes[0].set_ylabel(f"fraction of positions, {span}-step mean\n(eps={results['regime_threshold_eps']:.3g})")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)
