"""``python -m experiments.predict pde``: the regime of the non-linear one-layer PDE (9) per dt, predicted then measured.

``python -m experiments.predict pde --dt 0.01 0.03 0.05 0.07 0.09 0.11 --out runs/predict_pde``
(about 4 minutes on 2 CPU cores, nearly all of it the measuring simulation). The prediction
is Table 3's bounds (:func:`eos_jax.predict.pde_bounds` on
:func:`eos_jax.pde.nonlinear.theory`: closed forms, no training); the measurement is the
simulation of ``python -m experiments.pde nonlinear`` (:func:`experiments.pde.nonlinear_sim.simulate`)
classified by :func:`eos_jax.pde.nonlinear.classify`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from eos_jax import predict
from eos_jax.io import atomic_write_json
from eos_jax.pde.nonlinear import NonlinearConfig, classify, dt_key
from experiments.pde.nonlinear import config_theory
from experiments.pde.nonlinear_sim import simulate
from experiments.pde.rundir import start_run
from experiments.predict.common import bound_records, confusion, plot_pde

__all__ = ["predict_pde", "run_pde", "summarize_pde"]


def predict_pde(config: NonlinearConfig) -> dict[str, Any]:
    """Table 3's bounds for ``config`` and the verdict per dt; no training.

    Returns:
      ``{"bounds": [...], "verdicts": {dt key: verdict}, "threshold": lowest deciding bound}``.
    """
    th = config_theory(config)
    bounds = predict.pde_bounds(th, alpha=config.alpha)
    deciding = [b.lr_max for b in bounds if b.effect is not None]
    return {
        "bounds": bound_records(bounds),
        "verdicts": {dt_key(dt): predict.verdict(dt, bounds) for dt in config.dts},
        "threshold": min(deciding) if deciding else None,
    }


def measure_pde(config: NonlinearConfig) -> dict[str, str]:
    """The simulated regime per dt: :func:`~experiments.pde.nonlinear_sim.simulate`, then :func:`classify`."""
    sim = simulate(config)
    return {
        dt_key(dt): classify(sim["loss"][:, i, :], sim["rel_l1"][:, i], sim["first_nonfinite"][i], config)[0]
        for i, dt in enumerate(config.dts)
    }


def measured_bracket(dts: tuple[float, ...], measured: dict[str, str]) -> list[float | None]:
    """``[largest stable dt, smallest non-stable dt]`` of the measured grid (None where there is none).

    Examples:
      >>> from experiments.predict.pde import measured_bracket
      >>> measured_bracket((0.01, 0.03, 0.05), {"0.01": "stable", "0.03": "stable", "0.05": "restrained"})
      [0.03, 0.05]
    """
    stable = [dt for dt in dts if measured[dt_key(dt)] == "stable"]
    other = [dt for dt in dts if measured[dt_key(dt)] != "stable"]
    return [max(stable) if stable else None, min(other) if other else None]


def run_pde(config: NonlinearConfig, out_dir: str | Path) -> dict[str, Any]:
    """Predicts every dt of ``config``, measures it, writes ``results.json`` and ``predict.png``."""
    path, _ = start_run("predict-pde", config, out_dir)
    t0 = time.perf_counter()
    pred = predict_pde(config)
    t_pred = time.perf_counter() - t0
    t0 = time.perf_counter()
    measured = measure_pde(config)
    t_meas = time.perf_counter() - t0
    cells = []
    for dt in config.dts:
        v = pred["verdicts"][dt_key(dt)]
        cells.append({"dt": dt, "measured": measured[dt_key(dt)], **v})
    agree = [c["predicted"] == c["measured"] for c in cells]
    bracket = measured_bracket(config.dts, measured)
    results = {
        "cells": cells,
        "accuracy": float(np.mean(agree)),
        "confusion": confusion(cells),
        "threshold": {
            "predicted": pred["threshold"],
            "measured_bracket": bracket,
            "inside": bool(
                pred["threshold"] is not None
                and (bracket[0] is None or bracket[0] < pred["threshold"])
                and (bracket[1] is None or pred["threshold"] <= bracket[1])
            ),
        },
        "bounds": pred["bounds"],
        "predict_seconds": t_pred,
        "measure_seconds": t_meas,
        "measured_by": "experiments.pde.nonlinear_sim.simulate + eos_jax.pde.nonlinear.classify",
    }
    plot_pde(results, path / "predict.png")
    atomic_write_json(path / "results.json", results)
    return results


def summarize_pde(results: dict[str, Any]) -> str:
    """A table of the cells, then accuracy, threshold and timing (computed from ``results``)."""
    lines = [f"{'dt':>8} {'predicted':>11} {'measured':>11} {'conf':>5}  deciding"]
    for c in results["cells"]:
        lines.append(f"{c['dt']:>8g} {c['predicted']:>11} {c['measured']:>11} {c['confidence']:>5.2f}  {c['deciding']}")
    th = results["threshold"]
    lo, hi = th["measured_bracket"]
    lines.append(
        f"accuracy {results['accuracy']:.3f} ({sum(c['predicted'] == c['measured'] for c in results['cells'])}"
        f"/{len(results['cells'])}); predicted threshold {th['predicted']:.4g}, measured between "
        f"{'-' if lo is None else format(lo, 'g')} and {'-' if hi is None else format(hi, 'g')} "
        f"({'inside' if th['inside'] else 'outside'}); predict {results['predict_seconds']:.2f} s, "
        f"measure {results['measure_seconds']:.1f} s"
    )
    return "\n".join(lines)
