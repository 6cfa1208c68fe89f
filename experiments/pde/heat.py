"""Heat equation experiment (Section 3.1, Figure 1): run directory, summary and plot.

``python -m experiments.pde heat --out runs/heat`` (~6 s). The maths (scheme (2), amplifier
``A_m``, CFL bound, per-mode growth) is :mod:`eos_jax.pde.heat`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from eos_jax import distributed
from eos_jax.io import atomic_write_json, save_figure
from eos_jax.pde.heat import HeatConfig, analyze
from experiments.pde.rundir import start_run


def run_heat(config: HeatConfig, out_dir: str | Path) -> dict[str, Any]:
    """Runs every ratio, writes ``config.json``, ``metadata.json``, ``results.json``, ``figure1.png``.

    With several processes every process runs every ratio; process 0 writes the files.

    Args:
      config: the experiment's configuration.
      out_dir: a new or empty run directory.

    Returns:
      The results dict written to ``results.json``.
    """
    path, _ = start_run("heat", config, out_dir)
    dx = config.length / (config.points + 1)
    results = {
        "dx": dx,
        "cfl": "stable for every mode iff r = kappa dt/dx^2 <= 1/2, i.e. dt <= dx^2/(2 kappa)",
        "amplifier_formula": "A_m = 1 - 2 r (1 - cos(m pi/(K+1))), m = 1..K (Dirichlet sine modes)",
        "runs": {str(r): analyze(config, r) for r in config.ratios},
    }
    if distributed.is_primary():  # several processes: each computed the same results; process 0 writes
        _plot(results, config, path / "figure1.png")
        atomic_write_json(path / "results.json", results)
    return results


def _plot(results: dict[str, Any], config: HeatConfig, path: Path) -> None:
    """Figure 1 (solution snapshots per ratio) plus measured growth vs ``A_m``."""
    runs = results["runs"]
    fig = Figure(figsize=(5 * len(runs), 7))
    axes = fig.subplots(2, len(runs), squeeze=False)
    x = np.arange(config.points + 2) * results["dx"]
    for j, (r, res) in enumerate(runs.items()):
        for n, u in res["snapshots"].items():
            axes[0, j].plot(x, np.pad(np.asarray(u, dtype=np.float64), 1), label=f"n={n}")
        axes[0, j].set_title(f"r = {r}: {res['behaviour']}")
        if res["behaviour"] == "blows up":
            axes[0, j].set_yscale("symlog")
        axes[0, j].legend(fontsize=7)
        m = np.arange(1, config.points + 1)
        axes[1, j].plot(m, res["amplifier"], "k-", label="A_m")
        g = np.array([np.nan if v is None else v for v in res["measured_growth"]])
        axes[1, j].plot(m, g, "o", mfc="none", label="measured")
        axes[1, j].axhline(1, color="gray", lw=0.5)
        axes[1, j].axhline(-1, color="gray", lw=0.5)
        axes[1, j].set_xlabel("mode m")
        axes[1, j].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, bbox_inches=None)  # laid out already: no second (bbox) render


def summarize(results: dict[str, Any]) -> str:
    """One line per ratio."""
    lines = [results["cfl"]]
    for r, res in results["runs"].items():
        lines.append(
            f"r={r}: {res['behaviour']} (max|u| {res['max_abs_u_initial']:.3g} -> {res['max_abs_u_final']:.3g}); "
            f"growth vs A: max rel err {res['max_rel_err_growth_vs_amplifier']:.2e} over {res['modes_measured']} modes; "
            f"largest |A| mode {res['largest_abs_amplifier_mode']}, first to grow {res['first_mode_to_grow']} "
            f"(step {res['first_growth_step']}), predicted {res['predicted_first_mode_to_grow']}"
        )
    return "\n".join(lines)
