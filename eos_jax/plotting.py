"""Figures of a training run: loss and normalized sharpness against steps, threshold drawn.

Everything is drawn from the lines of ``metrics.jsonl`` (so a plot can be redrawn
from a finished or interrupted run) with the non-interactive Agg backend, and saved
atomically with :func:`eos_jax.io.save_figure`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eos_jax import io as eio  # noqa: E402


def _clip_sharpness_axis(ax: Any, values: list[float], threshold: float) -> str:
    """Caps the y-axis at 5x the threshold when larger values (e.g. at initialization) would hide the edge."""
    cap = 5.0 * threshold
    if values and max(values) > cap:
        ax.set_ylim(top=cap, bottom=min(min(values), 0.0) - 0.05 * cap)
        return f" (clipped at {cap:g})"
    return ""


def _lane_label(r: dict[str, Any], varying: Sequence[str]) -> str:
    names = {"learning_rate": "lr", "k": "k", "seed": "seed", "weight_decay": "wd"}
    parts = [f"{names[k]}={r[k]:g}" for k in varying]
    return ", ".join(parts) if parts else f"lane {r['lane']}"


def plot_run(
    lines: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    threshold: float = 2.0,
    title: str = "",
    max_lanes: int = 16,
) -> None:
    """Two panels, loss (log scale) and normalized sharpness ``lr * lambda_max`` against steps.

    Args:
      lines: metrics records (``lane``, ``step``, ``loss``, optional ``normalized_sharpness``
        and the lane's hyperparameters).
      path: output file (PNG).
      threshold: the optimizer's stability threshold, drawn as a dashed line.
      title: figure title.
      max_lanes: lanes drawn at most (the first ones).
    """
    by_lane: dict[int, list[dict[str, Any]]] = {}
    for r in lines:
        by_lane.setdefault(int(r["lane"]), []).append(r)
    lanes = sorted(by_lane)[:max_lanes]
    varying = [k for k in ("learning_rate", "k", "seed", "weight_decay") if len({by_lane[i][0][k] for i in by_lane}) > 1]
    fig, (ax_l, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    for i in lanes:
        rs = sorted(by_lane[i], key=lambda r: r["step"])
        label = _lane_label(rs[0], varying)
        pts = [(r["step"], r["loss"]) for r in rs if r.get("loss") is not None and r["loss"] > 0]
        (line,) = ax_l.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=label)
        diverged = [r["step"] for r in rs if not r.get("finite", True)]
        if diverged:
            ax_l.axvline(diverged[0], color=line.get_color(), ls=":", lw=1)
        sh = [(r["step"], r["normalized_sharpness"]) for r in rs if r.get("normalized_sharpness") is not None]
        if sh:
            ax_s.plot([p[0] for p in sh], [p[1] for p in sh], lw=1, marker=".", ms=3, color=line.get_color(), label=label)
    ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_l.set_title("loss (dotted: first non-finite step)")
    ax_s.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax_s.set_xlabel("step")
    ax_s.set_ylabel(r"normalized sharpness  lr $\cdot\,\lambda_{max}$")
    values = [r["normalized_sharpness"] for r in lines if r.get("normalized_sharpness") is not None]
    ax_s.set_title("normalized sharpness" + _clip_sharpness_axis(ax_s, values, threshold))
    for ax in (ax_l, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    eio.save_figure(fig, path)
    plt.close(fig)


def plot_variants(
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | os.PathLike,
    *,
    threshold: float = 2.0,
    title: str = "",
) -> None:
    """One column per variant (e.g. 1 vs 3 layers): loss on top, normalized sharpness below."""
    n = max(len(runs), 1)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 7), squeeze=False)
    for col, (name, lines) in enumerate(runs):
        by_lane: dict[int, list[dict[str, Any]]] = {}
        for r in lines:
            by_lane.setdefault(int(r["lane"]), []).append(r)
        varying = [k for k in ("learning_rate", "k", "seed", "weight_decay") if len({by_lane[i][0][k] for i in by_lane}) > 1]
        ax_l, ax_s = axes[0, col], axes[1, col]
        for i in sorted(by_lane):
            rs = sorted(by_lane[i], key=lambda r: r["step"])
            label = _lane_label(rs[0], varying)
            pts = [(r["step"], r["loss"]) for r in rs if r.get("loss") is not None and r["loss"] > 0]
            (line,) = ax_l.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=label)
            sh = [(r["step"], r["normalized_sharpness"]) for r in rs if r.get("normalized_sharpness") is not None]
            if sh:
                ax_s.plot([p[0] for p in sh], [p[1] for p in sh], lw=1, marker=".", ms=3, color=line.get_color())
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
    eio.save_figure(fig, path)
    plt.close(fig)
