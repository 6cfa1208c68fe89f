"""The picture of ``python -m experiments.predict cnn``: the (lr, weight decay) plane per depth (Figure 9, generalised)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from eos_jax.io import save_figure
from experiments.predict.common import COLORS, ORDER


def plot_cnn(results: dict[str, Any], path: Path) -> None:
    """Per depth: measured regime per seed (dots, one column per seed), predicted majority (squares), boundary line.

    The line joins, per weight decay, the geometric mean of the largest learning rate predicted
    stable and the smallest predicted otherwise (in the majority over seeds).
    """
    depths = sorted({c["layers"] for c in results["cells"]})
    fig = Figure(figsize=(5 * len(depths), 4))
    axes = np.atleast_1d(fig.subplots(1, len(depths)))
    for ax, d in zip(axes, depths):
        grid = [c for c in results["grid_cells"] if c["layers"] == d]
        wds = sorted({c["weight_decay"] for c in grid})
        seeds = results["seeds"]
        for c in results["cells"]:
            if c["layers"] != d:
                continue
            y = wds.index(c["weight_decay"]) + 0.12 * (seeds.index(c["seed"]) - (len(seeds) - 1) / 2)
            ax.scatter([c["lr"]], [y], s=22, color=COLORS.get(c["measured"], "k"), zorder=3)
        edge = []
        for j, wd in enumerate(wds):
            row = sorted((c for c in grid if c["weight_decay"] == wd), key=lambda c: c["lr"])
            for c in row:
                ax.scatter([c["lr"]], [j], s=260, marker="s", color=COLORS.get(c["predicted"], "k"), alpha=0.25)
            st = [c["lr"] for c in row if c["predicted"] == "stable"]
            un = [c["lr"] for c in row if c["predicted"] != "stable" and (not st or c["lr"] > max(st))]
            if st and un:
                edge.append((float(np.sqrt(max(st) * min(un))), j))
        if edge:
            ax.plot([e[0] for e in edge], [e[1] for e in edge], "k--", lw=1.2, label="predicted stable boundary")
        for r in ORDER:
            if any(r in (c["measured"], c["predicted"]) for c in results["cells"] if c["layers"] == d):
                ax.scatter([], [], color=COLORS[r], label=r)
        ax.set_xscale("log")
        ax.set_yticks(range(len(wds)), [f"wd {w:g}" for w in wds])
        ax.set_ylim(-0.6, len(wds) - 0.4)
        ax.set_xlabel("learning rate")
        acc = results["per_depth"][str(d)]
        ax.set_title(
            f"{d} layer(s): predicted (squares) vs measured (dots)\naccuracy {acc['accuracy']:.2f}, "
            f"baseline {acc['baseline_accuracy']:.2f}",
            fontsize=9,
        )
        ax.legend(fontsize=6, loc="upper left")
    save_figure(fig, path)
