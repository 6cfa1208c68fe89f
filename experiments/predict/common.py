"""Shared pieces of ``python -m experiments.predict``: JSON records of bounds, the confusion matrix, the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from eos_jax import predict
from eos_jax.io import save_figure

# Plot order and colors of the regimes (eos_jax.stability's names).
ORDER = ("stable", "transient", "restrained", "spikes-off-edge", "stalled", "collapsed", "divergent")
COLORS = {
    "stable": "tab:green",
    "transient": "tab:olive",
    "restrained": "tab:orange",
    "spikes-off-edge": "tab:pink",
    "stalled": "tab:purple",
    "collapsed": "tab:gray",
    "divergent": "tab:red",
}


def bound_records(bounds: Sequence[predict.Bound]) -> list[dict[str, Any]]:
    """The bounds as JSON-able dicts (``lr_max`` None for an infinite bound)."""
    return [
        {"name": b.name, "layer": b.layer, "effect": b.effect, "lr_max": b.lr_max if math.isfinite(b.lr_max) else None}
        for b in bounds
    ]


def confusion(cells: Sequence[dict[str, Any]], key: str = "predicted") -> dict[str, dict[str, int]]:
    """``{measured: {predicted: count}}`` over the cells.

    Examples:
      >>> from experiments.predict.common import confusion
      >>> confusion([{"predicted": "stable", "measured": "stable"}, {"predicted": "stable", "measured": "restrained"}])
      {'stable': {'stable': 1}, 'restrained': {'stable': 1}}
    """
    out: dict[str, dict[str, int]] = {}
    for c in cells:
        row = out.setdefault(c["measured"], {})
        row[c[key]] = row.get(c[key], 0) + 1
    return out


def plot_pde(results: dict[str, Any], path: Path) -> None:
    """Predicted regime per dt (bands), measured regime (markers) and the bounds (vertical lines)."""
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    cells = results["cells"]
    dts = np.array([c["dt"] for c in cells])
    for c in cells:
        ax.scatter([c["dt"]], [1.0], s=140, marker="s", color=COLORS.get(c["predicted"], "k"), alpha=0.35)
        ax.scatter([c["dt"]], [0.0], s=60, marker="o", color=COLORS.get(c["measured"], "k"))
    at: dict[float, list[dict[str, Any]]] = {}  # bounds at the same step size share one line and label
    for b in results["bounds"]:
        if b["lr_max"] is not None and 0 < b["lr_max"] < 10 * dts.max():
            at.setdefault(round(b["lr_max"], 12), []).append(b)
    for x, bs in at.items():
        ax.axvline(x, color="k", ls="-" if any(b["effect"] for b in bs) else ":", lw=0.8)
        ax.text(x, 1.35, "\n".join(f"{b['name']} ({x:.4g})" for b in bs), rotation=90, fontsize=6, va="bottom")
    for r in ORDER:
        if any(r in (c["predicted"], c["measured"]) for c in cells):
            ax.scatter([], [], color=COLORS[r], label=r)
    ax.set_yticks([0.0, 1.0], ["measured", "predicted"])
    ax.set_ylim(-0.6, 3.6)
    ax.set_xlabel("dt")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"non-linear PDE (9): accuracy {results['accuracy']:.2f}", fontsize=9)
    save_figure(fig, path)
