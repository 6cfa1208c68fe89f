"""Figures of a training run: loss and normalized sharpness against steps, threshold drawn.

Everything is drawn from the lines of ``metrics.jsonl`` (so a plot can be redrawn
from a finished or interrupted run) on :class:`matplotlib.figure.Figure` objects (no
pyplot state, no GUI backend), and saved atomically with :func:`eos_jax.io.save_figure`.
When perturbed lanes (k != 1) were compared with their k=1 twin, a third panel shows
RelL1 over the run: raw (thin) and its 100-step moving average (thick). With the trace and
the eigenvalue density tracked (``EngineConfig.track``), a second row shows the trace and the
density against the step (:func:`draw_density`, :func:`density_grid`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from eos_jax import io as eio
from eos_jax.hessian import smoothed_density

REL_MA_KEY = "rel_l1_to_k1_ma100"


def _clip_sharpness_axis(ax: Any, values: list[float], threshold: float) -> str:
    """Caps the y-axis at 5x the threshold when larger values (e.g. at initialization) would hide the edge."""
    cap = 5.0 * threshold
    if values and max(values) > cap:
        ax.set_ylim(top=cap, bottom=min(min(values), 0.0) - 0.05 * cap)
        return f" (clipped at {cap:g})"
    return ""


# Lane fields a legend names when they vary; init_seed is absent from the lines of runs made
# before it existed (it was the seed then), hence .get.
_LANE_FIELDS = ("learning_rate", "momentum", "k", "seed", "init_seed", "weight_decay")


def _varying(by_lane: dict[int, list[dict[str, Any]]]) -> list[str]:
    """The lane fields that differ between lanes (the init seed only where it is not the seed)."""
    first = [rs[0] for rs in by_lane.values()]
    out = [k for k in _LANE_FIELDS if len({r.get(k) for r in first}) > 1]
    if "init_seed" in out and all(r.get("init_seed", r.get("seed")) == r.get("seed") for r in first):
        out.remove("init_seed")
    return out


def _lane_label(r: dict[str, Any], varying: Sequence[str]) -> str:
    names = {
        "learning_rate": "lr",
        "k": "k",
        "seed": "seed",
        "init_seed": "init",
        "weight_decay": "wd",
        "momentum": "mom",
    }
    parts = [f"{names.get(k, k)}={r[k]:g}" for k in varying]
    return ", ".join(parts) if parts else f"lane {r['lane']}"


def _curvature_row(
    axes: Sequence[Any], by_lane: dict[int, list[dict[str, Any]]], labels: dict[int, str], threshold: float
) -> None:
    """The tracked trace (``axes[0]``, drawn per lane already) and the eigenvalue density of the first lane
    with one (``axes[1]``); with a third axis, the density of the other lane that spent the most sharpness
    samples at or over the threshold (then: the highest peak)."""
    ax_t = axes[0]
    ax_t.set_xlabel("step")
    ax_t.set_ylabel("trace of the Hessian")
    ax_t.set_title("Hessian trace (Hutchinson; band: 2 standard errors)")
    ax_t.grid(alpha=0.3)
    if ax_t.lines:
        ax_t.legend(fontsize=7)
    with_density = [i for i in by_lane if any("ritz" in r.get("curvature", {}) for r in by_lane[i])]
    shown = with_density[:1]

    def at_edge(i: int) -> tuple[int, float]:  # samples at or over the threshold, then the peak
        ns = [r["normalized_sharpness"] for r in by_lane[i] if r.get("normalized_sharpness") is not None]
        return sum(v >= threshold for v in ns), max(ns, default=0.0)

    if len(axes) > 2 and len(with_density) > 1:
        shown.append(max(with_density[1:], key=at_edge))
    for ax, i in zip(axes[1:], shown):
        draw_density(ax, sorted(by_lane[i], key=lambda r: r["step"]), threshold=threshold, label=labels[i])
    for ax in axes[1 + len(shown) :]:
        ax.set_visible(False)


def plot_run(
    lines: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    threshold: float | Sequence[float] = 2.0,
    title: str = "",
    max_lanes: int = 16,
    regimes: dict[int, str] | None = None,
    constant_loss: float | None = None,
) -> None:
    """Two panels, loss (log scale) and normalized sharpness ``lr * lambda_max`` against steps.

    Lanes that differ only in ``k`` share a colour; perturbed lanes (k != 1) are dashed. With
    tracked curvature (lines with ``curvature``: ``EngineConfig.track``) a second row shows the
    Hessian's trace per lane and the eigenvalue density over the steps of the first lane (and,
    beside it, of the lane most often at the edge), ``threshold / lr`` marked.

    Args:
      lines: metrics records (``lane``, ``step``, ``loss``, optional ``normalized_sharpness``
        and the lane's hyperparameters).
      path: output file (PNG).
      threshold: the optimizer's stability threshold, drawn as a dashed line (several: one
        line each, e.g. heavy ball's ``2 + 2 beta`` over a momentum axis).
      title: figure title.
      max_lanes: lanes drawn at most (the first ones).
      regimes: a regime per lane index (:func:`eos_jax.stability.regime`), added to its label.
      constant_loss: the loss of the best constant predictor (:func:`eos_jax.stability.constant_loss`),
        drawn as a grey line: where a collapsed lane ends.

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.plotting import plot_run
      >>> lines = [
      ...     {"lane": i, "step": t, "loss": 1.0 / (t + 1), "normalized_sharpness": 0.5 * t * (i + 1),
      ...      "learning_rate": lr, "k": 1.0, "seed": 0, "weight_decay": 0.0}
      ...     for i, lr in enumerate([0.1, 0.2]) for t in range(3)
      ... ]
      >>> path = os.path.join(tempfile.mkdtemp(), "run.png")
      >>> plot_run(lines, path, threshold=2.0, title="two lanes")
      >>> open(path, "rb").read(4)[1:]  # the PNG signature
      b'PNG'
    """
    by_lane: dict[int, list[dict[str, Any]]] = {}
    for r in lines:
        by_lane.setdefault(int(r["lane"]), []).append(r)
    lanes = sorted(by_lane)[:max_lanes]
    varying = _varying(by_lane)
    has_rel = any("rel_l1_to_k1" in r for r in lines)
    has_curv = any("curvature" in r for r in lines)
    fig = Figure(figsize=(16.5 if has_rel else 11, 8 if has_curv else 4))
    grid_axes = fig.subplots(2 if has_curv else 1, 3 if has_rel else 2, squeeze=False)
    axes = grid_axes[0]
    ax_l, ax_s = axes[0], axes[1]
    colours: dict[tuple, Any] = {}
    labels: dict[int, str] = {}
    for i in lanes:
        rs = sorted(by_lane[i], key=lambda r: r["step"])
        label = _lane_label(rs[0], varying)
        if regimes and i in regimes:
            label += f" ({regimes[i]})"
        twin_key = tuple(rs[0].get(k) for k in _LANE_FIELDS if k != "k")
        perturbed = rs[0].get("k", 1) != 1
        pts = [(r["step"], r["loss"]) for r in rs if r.get("loss") is not None and r["loss"] > 0]
        (line,) = ax_l.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            lw=1,
            ls="--" if perturbed else "-",
            label=label,
            color=colours.get(twin_key),
        )
        colours.setdefault(twin_key, line.get_color())
        diverged = [r["step"] for r in rs if not r.get("finite", True)]
        if diverged:
            ax_l.axvline(diverged[0], color=line.get_color(), ls=":", lw=1)
        sh = [(r["step"], r["normalized_sharpness"]) for r in rs if r.get("normalized_sharpness") is not None]
        if sh:
            ax_s.plot(
                [p[0] for p in sh],
                [p[1] for p in sh],
                lw=1,
                ls="--" if perturbed else "-",
                marker=".",
                ms=3,
                color=line.get_color(),
                label=label,
            )
        if has_rel:
            draw_rel_l1(axes[2], rs, color=line.get_color(), label=label)
        if has_curv:
            draw_trace(grid_axes[1][0], rs, color=line.get_color(), label=label, ls="--" if perturbed else "-")
        labels[i] = label
    if has_curv:
        thr = [float(t) for t in (threshold if isinstance(threshold, Sequence) else [threshold])]
        _curvature_row(grid_axes[1], {i: by_lane[i] for i in lanes}, labels, max(thr))
    if has_rel:
        finish_rel_l1_axis(axes[2], lines)
    if constant_loss is not None:
        ax_l.axhline(constant_loss, color="0.5", ls=":", lw=1, label=f"constant predictor {constant_loss:.4f}")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_l.set_title("loss (dotted: first non-finite step)")
    thresholds = [float(t) for t in (threshold if isinstance(threshold, Sequence) else [threshold])]
    for t in thresholds:
        ax_s.axhline(t, color="k", ls="--", lw=1, label=f"threshold {t:g}")
    ax_s.set_xlabel("step")
    ax_s.set_ylabel("normalized sharpness  lr \u00b7 \u03bb_max")  # plain text: mathtext parsing costs ~0.8 s a figure
    values = [r["normalized_sharpness"] for r in lines if r.get("normalized_sharpness") is not None]
    ax_s.set_title("normalized sharpness" + _clip_sharpness_axis(ax_s, values, max(thresholds)))
    for ax in (ax_l, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    eio.save_figure(fig, path, bbox_inches=None)  # laid out already: no second (bbox) render


def draw_rel_l1(ax: Any, rs: Sequence[dict[str, Any]], *, color: Any = None, label: str = "") -> None:
    """RelL1 to the k=1 twin of one lane's lines: raw (thin) and 100-step moving average (thick).

    Examples:
      >>> from matplotlib.figure import Figure
      >>> from eos_jax.plotting import draw_rel_l1
      >>> ax = Figure().add_subplot()
      >>> rs = [{"step": t, "rel_l1_to_k1": 1e-7 * t, "rel_l1_to_k1_ma100": 5e-8 * t} for t in range(4)]
      >>> draw_rel_l1(ax, rs, label="k=0.5")
      >>> len(ax.lines)  # raw and moving average
      2
    """
    pts = [(r["step"], r["rel_l1_to_k1"], r.get(REL_MA_KEY)) for r in rs if "rel_l1_to_k1" in r]
    if not pts:
        return
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.6, alpha=0.45, color=color)
    ax.plot([p[0] for p in pts], [p[2] for p in pts], lw=1.6, color=color, label=label)


def finish_rel_l1_axis(ax: Any, lines: Sequence[dict[str, Any]]) -> None:
    """Log scale when some RelL1 is positive (all zero: k=2, 4 equal their twin bit for bit).

    Examples:
      >>> from matplotlib.figure import Figure
      >>> from eos_jax.plotting import finish_rel_l1_axis
      >>> from eos_jax.plotting import draw_rel_l1
      >>> ax = Figure().add_subplot()
      >>> rs = [{"step": 0, "rel_l1_to_k1": 0.0, "rel_l1_to_k1_ma100": 0.0},
      ...       {"step": 1, "rel_l1_to_k1": 3e-8, "rel_l1_to_k1_ma100": 1.5e-8}]
      >>> draw_rel_l1(ax, rs, label="k=0.5")
      >>> finish_rel_l1_axis(ax, rs)
      >>> ax.get_yscale()
      'symlog'
    """
    if any(r.get("rel_l1_to_k1", 0) > 0 for r in lines):
        ax.set_yscale("symlog", linthresh=1e-9)
    ax.set_xlabel("step")
    ax.set_ylabel("RelL1 to the k=1 twin")
    ax.set_title("RelL1 vs k=1 (thin: raw, thick: 100-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def density_grid(
    series: Sequence[tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]]], num_points: int = 200
) -> tuple[Any, Any]:
    """One eigenvalue grid for every step of a lane, and each step's smoothed density on it.

    ``series``: per step, the Ritz values and Gauss weights of its probes (``(probes, m)`` each,
    :func:`eos_jax.hessian.density`). The grid spans every step's Ritz values, padded by the
    smoothing width ``sigma`` (1 % of their range); each step's density is the probes' mean of
    ``sum_i w_i N(x; theta_i, sigma^2)``, so it integrates to 1 over the grid.

    Returns:
      ``(grid (num_points,), density (steps, num_points))``.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.plotting import density_grid
      >>> grid, dens = density_grid([([[0.0, 1.0]], [[0.5, 0.5]]), ([[0.0, 2.0]], [[0.75, 0.25]])])
      >>> dens.shape, [round(float(np.sum(d) * (grid[1] - grid[0])), 3) for d in dens]
      ((2, 200), [1.0, 1.0])
    """
    import numpy as np

    nodes = [np.asarray(t, np.float64) for t, _ in series]
    lo = min(float(np.min(t)) for t in nodes)
    hi = max(float(np.max(t)) for t in nodes)
    sigma = 0.01 * max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    out = np.stack(
        [np.asarray(smoothed_density(t, w, grid, sigma=sigma)[1], np.float64) for t, (_, w) in zip(nodes, series)]
    )
    return grid, out


def draw_density(ax: Any, rs: Sequence[dict[str, Any]], *, threshold: float = 2.0, label: str = "") -> None:
    """The eigenvalue density of one lane against the step (a heat map, log colour), ``threshold / lr`` marked.

    ``rs``: the lane's metrics lines; those with ``curvature["ritz"]`` are drawn. The line at
    ``threshold / lr`` (``2 / lr`` for gradient descent) is where ``lr * lambda`` reaches the edge.

    Examples:
      >>> from matplotlib.figure import Figure
      >>> from eos_jax.plotting import draw_density
      >>> ax = Figure().add_subplot()
      >>> rs = [{"step": t, "learning_rate": 0.5, "curvature": {"ritz": [[0.0, 1.0 + t]], "weights": [[0.9, 0.1]]}}
      ...       for t in (0, 10, 20)]
      >>> draw_density(ax, rs)
      >>> len(ax.collections), ax.get_ylabel()  # the heat map; the 2/lr line
      (1, 'Hessian eigenvalue')
    """
    import numpy as np

    pts = [(r["step"], r["curvature"]) for r in rs if "ritz" in r.get("curvature", {})]
    if not pts:
        return
    grid, dens = density_grid([(c["ritz"], c["weights"]) for _, c in pts])
    steps = np.array([p[0] for p in pts], np.float64)
    floor = max(float(dens.max()) * 1e-6, 1e-300)
    mesh = ax.pcolormesh(steps, grid, np.log10(np.maximum(dens, floor)).T, shading="nearest", cmap="magma")
    ax.figure.colorbar(mesh, ax=ax, label="log10 density")
    lr = float(rs[0]["learning_rate"])
    if lr > 0:
        ax.axhline(threshold / lr, color="c", ls="--", lw=1, label=f"{threshold:g}/lr = {threshold / lr:.4g}")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title(f"eigenvalue density{': ' + label if label else ''} (SLQ)")


def draw_trace(ax: Any, rs: Sequence[dict[str, Any]], *, color: Any = None, label: str = "", ls: str = "-") -> None:
    """Hutchinson's trace of one lane's Hessian against the step, with a band of two standard errors.

    Examples:
      >>> from matplotlib.figure import Figure
      >>> from eos_jax.plotting import draw_trace
      >>> ax = Figure().add_subplot()
      >>> draw_trace(ax, [{"step": t, "curvature": {"trace": 5.0 + t, "trace_stderr": 0.5}} for t in range(3)])
      >>> len(ax.lines), len(ax.collections)
      (1, 1)
    """
    pts = [
        (r["step"], r["curvature"]["trace"], r["curvature"]["trace_stderr"])
        for r in rs
        if "trace" in r.get("curvature", {})
    ]
    if not pts:
        return
    x = [p[0] for p in pts]
    (line,) = ax.plot(x, [p[1] for p in pts], lw=1, ls=ls, marker=".", ms=3, color=color, label=label)
    lo = [p[1] - 2 * p[2] for p in pts]
    hi = [p[1] + 2 * p[2] for p in pts]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def plot_variants(
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | os.PathLike,
    *,
    threshold: float = 2.0,
    title: str = "",
) -> None:
    """One column per variant (e.g. 1 vs 3 layers): loss on top, normalized sharpness below.

    One colour per setting (learning rate, ...); with several seeds the first seed is drawn
    solid and the others faint, as the paper's Figure 7 draws one run per rate.

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.plotting import plot_variants
      >>> def lines(scale):
      ...     return [{"lane": 0, "step": t, "loss": scale / (t + 1), "normalized_sharpness": 0.6 * t,
      ...              "learning_rate": 0.1, "k": 1.0, "seed": 0, "weight_decay": 0.0} for t in range(3)]
      >>> path = os.path.join(tempfile.mkdtemp(), "variants.png")
      >>> plot_variants([("1 layer", lines(1.0)), ("3 layers", lines(2.0))], path)
      >>> os.path.getsize(path) > 0
      True
    """
    n = max(len(runs), 1)
    fig = Figure(figsize=(5.5 * n, 7))
    axes = fig.subplots(2, n, squeeze=False)
    for col, (name, lines) in enumerate(runs):
        by_lane: dict[int, list[dict[str, Any]]] = {}
        for r in lines:
            by_lane.setdefault(int(r["lane"]), []).append(r)
        seeds = sorted({by_lane[i][0].get("seed", 0) for i in by_lane})
        varying = [k for k in _varying(by_lane) if k not in ("seed", "init_seed")]
        ax_l, ax_s = axes[0, col], axes[1, col]
        colours: dict[tuple, Any] = {}
        for i in sorted(by_lane):
            rs = sorted(by_lane[i], key=lambda r: r["step"])
            key = tuple(rs[0].get(k) for k in varying)
            first = rs[0].get("seed", 0) == seeds[0]  # one seed drawn solid, the others faint
            label = _lane_label(rs[0], varying) + (f" (seed {seeds[0]} solid)" if len(seeds) > 1 else "")
            pts = [(r["step"], r["loss"]) for r in rs if r.get("loss") is not None and r["loss"] > 0]
            (line,) = ax_l.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                lw=1 if first else 0.6,
                alpha=1.0 if first else 0.3,
                label=label if first else None,
                color=colours.get(key),
            )
            colours.setdefault(key, line.get_color())
            sh = [(r["step"], r["normalized_sharpness"]) for r in rs if r.get("normalized_sharpness") is not None]
            if sh:
                ax_s.plot(
                    [p[0] for p in sh],
                    [p[1] for p in sh],
                    lw=1 if first else 0.6,
                    alpha=1.0 if first else 0.3,
                    marker="." if first else None,
                    ms=3,
                    color=line.get_color(),
                )
        ax_l.set_yscale("log")
        ax_l.set_title(f"{name}: loss")
        ax_s.axhline(threshold, color="k", ls="--", lw=1)
        values = [r["normalized_sharpness"] for r in lines if r.get("normalized_sharpness") is not None]
        ax_s.set_title(f"{name}: lr * lambda_max" + _clip_sharpness_axis(ax_s, values, threshold))
        ax_s.set_xlabel("step")
        for ax in (ax_l, ax_s):
            ax.grid(alpha=0.3)
        ax_l.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    eio.save_figure(fig, path, bbox_inches=None)  # laid out already: no second (bbox) render
