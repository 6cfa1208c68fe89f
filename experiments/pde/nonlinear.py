"""Non-linear one-layer CNN PDE experiment (Section 6.1, Eq. (9), Figures 5-6, Table 3): run and results.

``python -m experiments.pde nonlinear --dt 0.01 0.03 0.05 0.07 0.09 0.11 --steps 2000
--out runs/nonlinear``. The maths (Swish regimes, the cnn loss, classification,
checkerboard closed forms and theory) is :mod:`eos_jax.pde.nonlinear`; the k=1 / k=3 lanes run
through the training engine (:mod:`experiments.pde.nonlinear_sim`); this module assembles the
results, the findings (:mod:`experiments.pde.nonlinear_notes`) and the plots
(:mod:`experiments.pde.nonlinear_plots`) into the run directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from eos_jax import distributed
from eos_jax.io import atomic_write_json
from eos_jax.pde.common import checkerboard
from eos_jax.pde.linear import alpha_bounds
from eos_jax.pde.nonlinear import (
    REGIMES,
    NonlinearConfig,
    checkerboard_orbit,
    chi,
    classification_rule,
    classify,
    dt_key,
    kernel_of,
    moving_average,
    num_positions,
    theory,
)
from experiments.pde.nonlinear_notes import notes
from experiments.pde.nonlinear_plots import plot_figure5, plot_figure6, plot_regimes
from experiments.pde.nonlinear_sim import simulate
from experiments.pde.rundir import start_run

__all__ = ["build_results", "notes", "run_nonlinear", "summarize"]


def run_nonlinear(
    config: NonlinearConfig, out_dir: str | Path, *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Runs the Figure 5 / Figure 6 experiment and writes the run directory.

    Writes ``config.json`` and ``metadata.json`` first (refusing a used directory), then
    ``results.json`` (histories, classification per ``dt`` with the rule, theory, notes),
    ``figure5.png`` (loss; RelL1), ``figure6.png`` (loss; normalized sharpness with the
    line at 2) and ``regimes.png`` (Table 3 fractions), each atomically.

    Several processes (``jax.distributed``): the lanes are sharded over the devices of every
    process (:func:`~experiments.pde.nonlinear_sim.simulate`), whose histories come back to
    every process; theory, classification and notes run in each; process 0 writes the files.

    Args:
      config: the experiment's configuration.
      out_dir: a new or empty run directory.
      log: optional progress callback (one line per chunk).

    Returns:
      The results dict written to ``results.json``.
    """
    path, meta = start_run("nonlinear", config, out_dir)
    t_start = time.perf_counter()
    sim = simulate(config, log=log)
    t_sim = time.perf_counter() - t_start
    th = config_theory(config)
    results = build_results(config, sim, th)
    meta = dict(meta, model_info=sim["model_info"], timing=dict(sim["timing"], simulate_s=t_sim))
    if distributed.is_primary():  # several processes: each holds the same results; process 0 writes
        plot_figure5(results, config, path / "figure5.png")
        plot_figure6(results, config, path / "figure6.png")
        plot_regimes(results, config, path / "regimes.png")
        meta["timing"]["total_s"] = time.perf_counter() - t_start
        atomic_write_json(path / "results.json", results)
        atomic_write_json(path / "metadata.json", meta)
    return results


def config_theory(config: NonlinearConfig) -> dict[str, Any]:
    """The closed-form analysis (:func:`eos_jax.pde.nonlinear.theory`) of ``config``'s checkerboard, kernel and dts."""
    image = checkerboard(config.size, square=config.square, dtype=np.float64)
    return theory(
        image,
        config.kernel,
        alpha=config.alpha,
        beta=config.beta,
        label=config.label,
        dts=config.dts,
        pool=config.pool,
        square=config.square,
    )


def build_results(config: NonlinearConfig, sim: dict[str, Any], th: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able results: per dt histories, classification and evidence, theory, notes."""
    per_dt: dict[str, Any] = {}
    for i, dt in enumerate(config.dts):
        per_dt[dt_key(dt)] = _dt_results(config, sim, th, i, dt)
    c0 = (
        float(np.sum(np.asarray(sim["initial_kernel"], np.float64) * chi(config.kernel)))
        if config.square == 1
        else None
    )
    results = {
        "setting": _setting(config),
        "regime_threshold_eps": sim["eps"],
        "regime_rule": (
            f"activated: K*I > eps, transitioning: |K*I| <= eps, not activated: K*I < -eps, "
            f"eps={sim['eps']:.6g}: where |r'(x) - (1/2 + beta x/2)| (Eq. (46)) reaches "
            f"{config.regime_tol:g}"
        ),
        "record_index": "record t of every history is the iterate K_t (before update t); t = 0..steps-1",
        "classification_rule": classification_rule(config),
        "sharpness_steps": sim["sharpness_steps"],
        "rel_l1_moving_average_rule": (
            f"trailing mean over {config.rel_l1_window} consecutive steps, value j "
            f"averaging steps j..j+{config.rel_l1_window - 1} (as the authors smooth "
            "Figure 5 right, instability/compute_one_layer.m)"
        ),
        "initial_c": c0,
        "checkerboard_orbit": _checkerboard_orbit(config, c0) if c0 is not None else None,
        "theory": {k: v for k, v in th.items() if k != "per_dt"},
        "per_dt": per_dt,
    }
    results["notes"] = notes(results, config)
    return results


def _dt_results(config: NonlinearConfig, sim: dict[str, Any], th: dict[str, Any], i: int, dt: float) -> dict[str, Any]:
    """One step size's entry (lane ``i`` of the sweep): classification, evidence, histories, theory."""
    cls, ev = classify(sim["loss"][:, i, :], sim["rel_l1"][:, i], sim["first_nonfinite"][i], config)
    norm = dt * sim["sharpness"][:, i, :]
    k1 = norm[:, 0]
    ev.update(_sharpness_evidence(config, sim, i, k1))
    th_dt = _theory_at_last_a(config, sim, th, i, dt)
    ev.update(_window_evidence(config, sim, i))
    rel = np.asarray(sim["rel_l1"][:, i], np.float64)
    rel_avg = moving_average(rel, config.rel_l1_window)
    ev.update(_rel_l1_evidence(rel, rel_avg))
    ev["last_normalized_sharpness"] = float(k1[np.isfinite(k1)][-1]) if np.any(np.isfinite(k1)) else None
    if config.square == 1:
        # c = <K, chi>: the one coordinate the pixel checkerboard sees (checkerboard_loss_1d).
        kern = np.asarray(kernel_of(jax.tree_util.tree_map(lambda x: x[i, 0], sim["final_params"])), np.float64)
        ev["final_c"] = float(np.sum(kern * chi(config.kernel)))
    return {
        "dt": dt,
        "classification": cls,
        "evidence": ev,
        "rel_l1": sim["rel_l1"][:, i],
        "rel_l1_moving_average": {
            "window": config.rel_l1_window,
            "first_step": config.rel_l1_window - 1,
            "values": rel_avg,
        },
        "lanes": _lane_histories(config, sim, i, norm),
        "theory": th_dt,
    }


def _sharpness_evidence(config: NonlinearConfig, sim: dict[str, Any], i: int, k1: np.ndarray) -> dict[str, Any]:
    """The k=1 lane's normalized sharpness ``k1 = dt * lambda_max``: maxima, fractions above 2, last lambda_max."""
    late = sim["sharpness_steps"] >= config.steps - config.num_window
    fin = k1[np.isfinite(k1)]
    lam = sim["sharpness"][:, i, 0]
    return {
        "max_normalized_sharpness": _nanmax(k1),
        "window_max_normalized_sharpness": _nanmax(k1[late]),
        "window_fraction_above_2": float(np.mean(k1[late] > 2.0)) if np.any(np.isfinite(k1[late])) else None,
        "fraction_above_2": float(np.mean(fin > 2.0)) if fin.size else None,
        "last_lambda_max": float(lam[np.isfinite(lam)][-1]) if np.any(np.isfinite(lam)) else None,
    }


def _theory_at_last_a(
    config: NonlinearConfig, sim: dict[str, Any], th: dict[str, Any], i: int, dt: float
) -> dict[str, Any]:
    """The theory of step size ``dt``, with the windowed bounds (14) at the k=1 lane's last ``a = y_hat - y``."""
    last_logit = sim["logit"][:, i, 0][np.isfinite(sim["logit"][:, i, 0])]
    a_last = float(0.5 * (1.0 + np.tanh(0.5 * float(last_logit[-1]))) - config.label) if last_logit.size else None
    th_dt = dict(th["per_dt"][dt_key(dt)])
    if a_last is not None:
        # Eq. (14) on the windowed spectrum with the run's last a = y_hat - y instead of s(0) - y.
        lo, hi = _alpha_bounds_gd(*th["window_mu_scaled"], dt=dt, a=a_last, beta=config.beta)
        th_dt.update(
            a_last=a_last, transitioning_window_alpha_min_at_a_last=lo, transitioning_window_alpha_max_at_a_last=hi
        )
    return th_dt


def _window_evidence(config: NonlinearConfig, sim: dict[str, Any], i: int) -> dict[str, Any]:
    """Over the classification window of the k=1 lane: the range of ``a = y_hat - y`` and mean regime fractions."""
    w = config.num_window
    logit = np.asarray(sim["logit"][-w:, i, 0], np.float64)
    a = 0.5 * (1.0 + np.tanh(0.5 * logit[np.isfinite(logit)])) - config.label  # a = y_hat - y of Eq. (8)
    fr = sim["fractions"][-w:, i, 0, :]
    return {
        "window_a_range": [float(a.min()), float(a.max())] if a.size else None,
        "window_mean_fractions": {r: _nanmean(fr[:, j]) for j, r in enumerate(REGIMES)},
    }


def _rel_l1_evidence(rel: np.ndarray, rel_avg: np.ndarray) -> dict[str, Any]:
    """Last value and peak of RelL1 (``rel``) and of its trailing moving average (``rel_avg``)."""
    return {
        "rel_l1_last": float(rel[-1]) if np.isfinite(rel[-1]) else None,
        "rel_l1_peak": _nanmax(rel),
        "rel_l1_peak_step": int(np.nanargmax(rel)) if np.any(np.isfinite(rel)) else None,
        "rel_l1_avg_last": float(rel_avg[-1]) if rel_avg.size and np.isfinite(rel_avg[-1]) else None,
        "rel_l1_avg_peak": _nanmax(rel_avg) if rel_avg.size else None,
    }


def _lane_histories(config: NonlinearConfig, sim: dict[str, Any], i: int, norm: np.ndarray) -> dict[str, Any]:
    """The histories of the k=1 and k=k lanes of step size ``i`` (``norm``: their ``dt * lambda_max``)."""
    lanes = {}
    for j, kk in enumerate((1, config.k)):
        lanes[f"k{kk}"] = {
            "loss": sim["loss"][:, i, j],
            "data_loss": sim["data_loss"][:, i, j],
            "logit": sim["logit"][:, i, j],
            "fractions": {r: sim["fractions"][:, i, j, m] for m, r in enumerate(REGIMES)},
            "sharpness": sim["sharpness"][:, i, j],
            "normalized_sharpness": norm[:, j],
            "first_nonfinite_step": sim["first_nonfinite"][i][j],
        }
    return lanes


def _setting(config: NonlinearConfig) -> dict[str, Any]:
    """The experiment's setting in words: image, kernel, model, loss, optimizer, dtypes, sharpness."""
    return {
        "image": f"{config.size}x{config.size} checkerboard of +1/-1, squares of {config.square} px",
        "kernel": (
            f"{config.kernel}x{config.kernel}, K0 ~ N(0, 1) from the JAX key fold_in(key({config.seed}), 0) "
            "(same K0 in every lane); the authors draw np.random.randn after np.random.seed(7) "
            "(single_layer/PySun.py), a stream JAX does not reproduce"
        ),
        "model": (
            f"cnn: valid cross-correlation, Swish(beta), global {config.pool} over the "
            f"{num_positions(config.size, config.kernel)} output positions, sigmoid in the BCE (Eq. (6))"
            + (
                "; the authors' AvgPooling (single_layer/PySun.py)"
                if config.pool == "mean"
                else "; the authors pool with the mean (single_layer/PySun.py)"
            )
        ),
        "pool": config.pool,
        "loss": "BCE(s(g), y) + (alpha/2)||K||^2 (Eq. (7)); weight decay in the loss, not in the optimizer",
        "optimizer": f"eos_jax.optim.sgd(dt, k) -- k=1 and k={config.k}: K - (dt/k)(k grad) (Section 4.1)",
        "dtype": "float32 (model, kernel, loss, optimizer); theory in float64",
        "sharpness": f"largest algebraic Hessian eigenvalue of the loss in K, Lanczos with "
        f"{config.sharpness_iters} HVPs warm-started, every {config.sharpness_every} steps",
    }


def _checkerboard_orbit(config: NonlinearConfig, c0: float) -> dict[str, dict[str, Any]]:
    """The 1-D map of ``c = <K, chi>`` on the pixel checkerboard from the run's ``c0``, per step size."""
    return checkerboard_orbit(
        c0,
        config.dts,
        steps=config.steps,
        window=config.num_window,
        sample_every=config.sharpness_every,
        size=config.size,
        kernel=config.kernel,
        alpha=config.alpha,
        beta=config.beta,
        label=config.label,
        pool=config.pool,
    )


def _alpha_bounds_gd(mu_min: float, mu_max: float, *, dt: float, a: float, beta: float) -> tuple[float, float]:
    """Eq. (14) for forward Euler with a spectrum ``[mu_min, mu_max]`` (any sign of ``a``)."""
    return alpha_bounds(mu_min, mu_max, scheme="gd", dt=dt, a=a, beta=beta)


def _nanmax(x: np.ndarray) -> float | None:
    """max over finite values, None if there are none."""
    x = np.asarray(x, np.float64)
    return float(np.max(x[np.isfinite(x)])) if np.any(np.isfinite(x)) else None


def _nanmean(x: np.ndarray) -> float | None:
    """mean over finite values, None if there are none."""
    x = np.asarray(x, np.float64)
    return float(np.mean(x[np.isfinite(x)])) if np.any(np.isfinite(x)) else None


def summarize(results: dict[str, Any]) -> str:
    """A table of classification, evidence and theory per dt, then the notes."""
    lines = [
        f"regimes: {results['regime_rule']}",
        f"rule: {results['classification_rule']}",
        f"{'dt':>6} {'class':>10} {'nonfinite':>9} {'final loss':>11} {'win RelL1':>10} {'osc':>9} "
        f"{'max dt*lam':>11} {'last dt*lam':>11} {'RelL1 last':>10} {'peak':>9} {'avg last':>9} {'avg peak':>9} "
        f"{'th: not-act':>11} {'act':>5} {'trans(win)':>10}",
    ]
    f = lambda x, spec=".3g": "-" if x is None else format(x, spec)  # noqa: E731
    for key, v in results["per_dt"].items():
        ev, th = v["evidence"], v["theory"]
        lines.append(
            f"{key:>6} {v['classification']:>10} {f(ev['first_nonfinite_step'], 'd'):>9} {f(ev['final_loss']):>11} "
            f"{f(ev.get('window_max_rel_l1')):>10} {f(ev.get('oscillation')):>9} "
            f"{f(ev.get('max_normalized_sharpness')):>11} {f(ev.get('last_normalized_sharpness')):>11} "
            f"{f(ev.get('rel_l1_last')):>10} {f(ev.get('rel_l1_peak')):>9} {f(ev.get('rel_l1_avg_last')):>9} "
            f"{f(ev.get('rel_l1_avg_peak')):>9} "
            f"{'stable' if th['not_activated_stable'] else 'unst.':>11} {'st' if th['activated_stable'] else 'un':>5} "
            f"{'stable' if th['transitioning_window_stable'] else 'unst.':>10}"
        )
    lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines)
