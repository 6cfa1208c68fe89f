"""Linearized CNN PDE experiment (Section 5, Table 2 / Table 9, Figure 4): run, findings, plot.

``python -m experiments.pde linear --kernel 16 32 64 --scheme gd --dt 1e-8 --a -0.5 --beta 1
--out runs/linear_gd`` (~3 min). The maths (bounds (14)/(18), operators, schemes, bisection,
extreme eigenvalues) is :mod:`eos_jax.pde.linear`; it computes in float64, so the caller enables
x64 (the entry point :mod:`experiments.pde.__main__` does).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from eos_jax import distributed
from eos_jax.io import atomic_write_json, save_figure
from eos_jax.pde.common import checkerboard
from eos_jax.pde.linear import (
    F64,
    LinearConfig,
    SchemeState,
    alpha_bounds,
    analyze_window,
    checkerboard_window_extremes,
    data_scale,
    image_bar,
    image_spectrum,
    is_unstable,
    loss_from_operator,
    nesterov_coefficients,
    simulate,
    theory_bounds,
    z_bound,
)
from experiments.pde.rundir import start_run


def run_linear(config: LinearConfig, out_dir: str | Path) -> dict[str, Any]:
    """Runs the Table 2 / Table 9 experiment and writes the run directory.

    For each kernel size: theory bounds (periodic, Eq. (14) or (18) exact and as printed),
    the windowed operator's extreme eigenvalues (power iteration) and the thresholds they
    give, the bisection thresholds, and loss curves for alphas inside and outside the
    empirical bounds (``figure4.png``). With several processes every process runs the whole
    analysis; process 0 writes the files.

    Args:
      config: the experiment's configuration.
      out_dir: a new or empty run directory.

    Returns:
      The results dict written to ``results.json``.
    """
    path, _ = start_run("linear", config, out_dir)
    t_start = time.perf_counter()
    image = checkerboard(config.size, square=config.square, dtype=np.float64)
    spec = np.asarray(image_spectrum(image))
    theory = _periodic_theory(image, config)
    results = _image_results(image, spec, config)
    base = jax.random.key(config.seed)
    curves: dict[int, dict[str, Any]] = {}
    for w in config.kernels:
        entry, curves[w] = _kernel_results(image, w, base, theory, config)
        results["kernels"][str(w)] = entry
    results["spectrum_support"] = _spectrum_support(spec)
    results["notes"] = _notes(results, config)
    results["seconds_total"] = time.perf_counter() - t_start
    if distributed.is_primary():  # several processes: each computed the same results; process 0 writes
        _plot(curves, results, config, path / "figure4.png")
        atomic_write_json(path / "results.json", results)
    return results


def _periodic_theory(image: np.ndarray, config: LinearConfig) -> dict[str, float]:
    """The periodic theory bounds on alpha, Eq. (14) or (18): exact and as printed in the paper."""
    th_min, th_max = theory_bounds(
        image,
        scheme=config.scheme,
        dt=config.dt,
        a=config.a,
        beta=config.beta,
        momentum=config.momentum,
        pool=config.pool,
    )
    pa_min, pa_max = theory_bounds(
        image,
        scheme=config.scheme,
        dt=config.dt,
        a=config.a,
        beta=config.beta,
        momentum=config.momentum,
        pool=config.pool,
        form="paper",
    )
    return {
        "alpha_min_theory": th_min,
        "alpha_max_theory": th_max,
        "alpha_min_paper_formula": pa_min,
        "alpha_max_paper_formula": pa_max,
    }


def _image_results(image: np.ndarray, spec: np.ndarray, config: LinearConfig) -> dict[str, Any]:
    """The results that do not depend on the kernel size: image, reading, spectrum, z bounds (``kernels`` empty)."""
    q_per = data_scale(config.pool, spec.size)
    results: dict[str, Any] = {
        "scheme": config.scheme,
        "image": (
            f"{config.size}x{config.size} pixel checkerboard (-1)^(i+j)"
            if config.square == 1
            else f"{config.size}x{config.size} checkerboard of {config.square}x{config.square} squares"
        ),
        "image_sum": float(np.sum(image)),
        "pool": config.pool,
        "ibar": config.ibar,
        "reading": (
            f"data term (K*I)*I {'summed' if config.pool == 'sum' else 'averaged'} over the output positions"
            f"{' as in linear.py' if config.pool == 'sum' else ' (mean pooling; linear.py sums)'}; Ibar = the "
            f"image {config.ibar}"
            f"{' as in linear.py' if config.ibar == 'mean' else ' (the paper text, Eq. (47))'}"
            "; defaults follow the authors' single_layer/linear.py (sunyx523/surprising-instabilities)"
        ),
        "Ibar_used": image_bar(image, config.ibar),
        "periodic_data_scale": q_per,
        "min_abs_I_hat_sq": float(spec.min()),
        "max_abs_I_hat_sq": float(spec.max()),
        "z_bound_exact": z_bound(config.scheme, config.dt, config.momentum),
        "z_bound_paper": z_bound(config.scheme, config.dt, config.momentum, form="paper"),
        "blowup_criterion": is_unstable.__doc__.split("\n\n")[1].strip().replace("\n", " "),
        "bisection_steps": config.bisect_steps,
        "kernels": {},
    }
    if config.scheme == "nesterov":
        d, s = nesterov_coefficients(config.dt, config.momentum)
        results["damping_d"] = d
        results["nesterov_step"] = s
    return results


def _kernel_results(
    image: np.ndarray, w: int, base: jax.Array, theory: dict[str, float], config: LinearConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One kernel size ``w``: its results entry (``theory``: the periodic bounds) and its Figure 4 curves.

    ``K0 ~ N(0, 1)`` and the power-iteration start come from ``fold_in(base, w)``.
    """
    kkey = jax.random.fold_in(base, w)
    kernel0 = jax.random.normal(jax.random.fold_in(kkey, 0), (w, w), F64)
    res = analyze_window(image, w, kernel0, config, jax.random.fold_in(kkey, 1))
    entry = _kernel_entry(res, w, theory, config)
    curves = _figure_curves(res, kernel0, entry, config)
    entry["figure_alphas"] = curves["alphas"]
    return entry, curves


def _kernel_entry(res: dict[str, Any], w: int, theory: dict[str, float], config: LinearConfig) -> dict[str, Any]:
    """Theory, bisection and spectral bounds on alpha for kernel size ``w`` (``res``: its window analysis)."""
    bis = res["bisection"]
    spec_min, spec_max = res["spectral"]
    # The closed form holds for the pixel checkerboard only; the operator is q M.
    closed_form = [res["q"] * x for x in checkerboard_window_extremes(config.size, w)] if config.square == 1 else None
    entry = {
        **theory,
        "alpha_min_empirical": bis["alpha_min"],
        "alpha_max_empirical": bis["alpha_max"],
        "alpha_min_spectral": spec_min,
        "alpha_max_spectral": spec_max,
        "window_mu_min": res["eig"]["mu_min"],
        "window_mu_max": res["eig"]["mu_max"],
        "data_scale_q": res["q"],
        "window_mu_closed_form": closed_form,
        "rel_diff_mu_max_power_vs_closed_form": (
            None if closed_form is None else _rel(res["eig"]["mu_max"], closed_form[1])
        ),
        "abs_diff_mu_min_power_vs_closed_form": (
            None if closed_form is None else abs(res["eig"]["mu_min"] - closed_form[0])
        ),
        "power_iterations": [res["eig"]["iters_min"], res["eig"]["iters_max"]],
        "bisection": {k: v for k, v in bis.items() if k not in ("alpha_min", "alpha_max")},
        "seconds_bisection": res["seconds_bisection"],
        "seconds_spectral": res["seconds_spectral"],
    }
    entry["alpha_max_spectral_paper_formula"] = alpha_bounds(
        res["eig"]["mu_min"],
        res["eig"]["mu_max"],
        scheme=config.scheme,
        dt=config.dt,
        a=config.a,
        beta=config.beta,
        momentum=config.momentum,
        form="paper",
    )[1]
    entry["rel_diff_min_bisection_vs_spectral"] = _rel(bis["alpha_min"], spec_min)
    entry["rel_diff_max_bisection_vs_spectral"] = _rel(bis["alpha_max"], spec_max)
    return entry


def _rel(x: float | None, ref: float) -> float | None:
    """Relative difference ``|x - ref| / |ref|`` (None when x is None)."""
    return None if x is None else abs(x - ref) / abs(ref)


def _figure_curves(
    res: dict[str, Any], kernel0: jax.Array, entry: dict[str, Any], config: LinearConfig
) -> dict[str, Any]:
    """Loss and ||K|| histories for alphas inside and outside the empirical bounds (Figure 4)."""
    lo = entry["alpha_min_empirical"] or entry["alpha_min_spectral"]
    hi = entry["alpha_max_empirical"] or entry["alpha_max_spectral"]
    alphas = [0.9 * lo, 1.1 * lo, math.sqrt(lo * hi) if lo > 0 else 0.5 * (lo + hi), 0.9 * hi, 1.1 * hi]
    op, ibar, step = res["op"], res["ibar"], res["step"]

    def run(alpha: jax.Array) -> jax.Array:
        def record(state: SchemeState) -> jax.Array:
            k = state.kernel
            loss = loss_from_operator(op, k, jnp.asarray(ibar, F64), a=config.a, beta=config.beta, alpha=alpha)
            return jnp.stack([loss, jnp.sqrt(jnp.sum(k * k))])

        return simulate(step, kernel0, alpha, config.plot_steps, record)[1]

    hist = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(alphas, F64)))
    return {"alphas": alphas, "loss": hist[:, :, 0], "norm": hist[:, :, 1]}


def _spectrum_support(spec: np.ndarray, rel: float = 1e-9) -> dict[str, Any]:
    """Where ``|I_hat|^2`` lives: coefficients above ``rel * max`` and the argmax frequency."""
    top = float(spec.max())
    idx = np.unravel_index(int(np.argmax(spec)), spec.shape)
    return {
        "nonzero_coefficients": int(np.sum(spec > rel * top)),
        "total_coefficients": int(spec.size),
        "argmax_frequency": [int(i) for i in idx],
        "max": top,
        "relative_level": rel,
    }


# A closed form and a power iteration "match" when their relative difference is below this
# (power iteration stops at a relative residual of 1e-10; the error of its Rayleigh
# quotient is of the order of the residual squared, far below this level).
MATCH_RTOL = 1e-8


def _notes(results: dict[str, Any], config: LinearConfig) -> list[str]:
    """Findings computed from this run's numbers (each note states the comparison it rests on)."""
    k0 = next(iter(results["kernels"].values()))
    notes = _empty_interval_notes(results, k0, config.size)
    notes += _closed_form_notes(results, k0, config)
    notes += _window_gap_notes(results, k0)
    if config.scheme == "nesterov":
        notes.append(_nesterov_note(results))
    notes += _method_agreement_notes(results)
    return notes


def _empty_interval_notes(results: dict[str, Any], k0: dict[str, Any], n: int) -> list[str]:
    """When the periodic interval (14) of the first kernel entry ``k0`` is empty: why, from the image spectrum."""
    if not (k0["alpha_min_theory"] >= k0["alpha_max_theory"]):  # a NaN bound: no note
        return []
    sup = results["spectrum_support"]
    why = (
        f"|I_hat|^2 has {sup['nonzero_coefficients']} of {sup['total_coefficients']} DFT coefficients above "
        f"{sup['relative_level']:g} x its max {sup['max']:.6g} (= {sup['max'] / float(n) ** 4:.6g} n^4), at "
        f"frequency {tuple(sup['argmax_frequency'])}, so (14) needs alpha above "
        f"{k0['alpha_min_theory']:.6g} and below {k0['alpha_max_theory']:.6g} at once"
    )
    return [
        f"periodic theory gives an EMPTY stable interval: alpha_min={k0['alpha_min_theory']:.6g} >= "
        f"alpha_max={k0['alpha_max_theory']:.6g}: {why}"
    ]


def _closed_form_notes(results: dict[str, Any], k0: dict[str, Any], config: LinearConfig) -> list[str]:
    """Closed-form vs power-iteration mu_max per w; when they match, the largest windowed alpha_min over every w."""
    cf = {w: e for w, e in results["kernels"].items() if e["window_mu_closed_form"] is not None}
    if not cf:
        return []
    diffs = {w: e["rel_diff_mu_max_power_vs_closed_form"] for w, e in cf.items()}
    matched = all(d is not None and d <= MATCH_RTOL for d in diffs.values())
    notes = [
        "windowed mu_max of q M, closed form q (n-w+1)^2 w^2 (pixel checkerboard, valid correlation) vs power "
        "iteration: relative difference "
        + ", ".join(f"w={w}: {d:.2e}" for w, d in diffs.items())
        + (f" -- matched (all <= {MATCH_RTOL:g})" if matched else f" -- NOT matched (tolerance {MATCH_RTOL:g})")
    ]
    if matched and k0["alpha_min_theory"] > 0:
        n = config.size
        # Over all w the closed form peaks at w = (n+1)/2; compare its largest alpha_min with (14).
        best = max(range(1, n + 1), key=lambda w: (n - w + 1) ** 2 * w * w)
        q = data_scale(config.pool, (n - best + 1) ** 2)
        lo_best = alpha_bounds(
            0.0,
            q * (n - best + 1) ** 2 * best * best,
            scheme=config.scheme,
            dt=config.dt,
            a=config.a,
            beta=config.beta,
            momentum=config.momentum,
        )[0]
        notes.append(
            f"largest windowed alpha_min over every w (closed form, at w={best}): {lo_best:.6g} = "
            f"{lo_best / k0['alpha_min_theory']:.4g} x the periodic (14) alpha_min {k0['alpha_min_theory']:.6g}"
            + (": no kernel size reaches (14)" if lo_best < (1 - 0.02) * k0["alpha_min_theory"] else "")
        )
    return notes


def _window_gap_notes(results: dict[str, Any], k0: dict[str, Any]) -> list[str]:
    """Empirical alpha_min over the periodic (14) alpha_min per kernel size, and whether the gap shrinks with w."""
    ws = [w for w, e in results["kernels"].items() if e["alpha_min_empirical"] is not None]
    if not (len(ws) >= 2 and k0["alpha_min_theory"] != 0):
        return []
    gaps = [abs(results["kernels"][w]["alpha_min_empirical"] / k0["alpha_min_theory"] - 1) for w in ws]
    approach = all(g2 < g1 for g1, g2 in zip(gaps, gaps[1:])) and [int(w) for w in ws] == sorted(int(w) for w in ws)
    return [
        "empirical alpha_min / periodic (14) alpha_min per kernel size: "
        + ", ".join(f"w={w}: {results['kernels'][w]['alpha_min_empirical'] / k0['alpha_min_theory']:.4g}" for w in ws)
        + (
            " -- the gap to (14) shrinks as w grows (the paper's Table 2 conjecture)"
            if approach
            else " -- the gap to (14) does NOT shrink monotonically as w grows, unlike the paper's Table 2 conjecture"
        )
    ]


def _nesterov_note(results: dict[str, Any]) -> str:
    """Nesterov: the exact Von Neumann bound of (16)-(17) vs the paper's (18), against the bisection per w."""
    exact, paper = results["z_bound_exact"], results["z_bound_paper"]
    per_w = []
    for w, e in results["kernels"].items():
        if e["alpha_max_empirical"] is None:
            continue
        per_w.append(
            f"w={w}: bisection {e['alpha_max_empirical']:.6g} vs exact {e['alpha_max_spectral']:.6g} "
            f"(rel {_rel(e['alpha_max_empirical'], e['alpha_max_spectral']):.2e}) vs (18) as printed "
            f"{e['alpha_max_spectral_paper_formula']:.6g} "
            f"(rel {_rel(e['alpha_max_empirical'], e['alpha_max_spectral_paper_formula']):.2e})"
        )
    closer = [
        w
        for w, e in results["kernels"].items()
        if e["alpha_max_empirical"] is not None
        and _rel(e["alpha_max_empirical"], e["alpha_max_spectral"])
        < _rel(e["alpha_max_empirical"], e["alpha_max_spectral_paper_formula"])
    ]
    return (
        f"Nesterov upper bound: exact Von Neumann bound of (16)-(17) z < 4/((1+2m) dt^2) = {exact:.6g}, the "
        f"paper's (18) 4/(3 dt^2) = {paper:.6g} (ratio {exact / paper:.6g}); "
        + ("; ".join(per_w) if per_w else "no bisection bound to compare")
        + (
            f" -- the simulation follows the exact bound at w in {closer} (the damping d changes the bound, "
            "contrary to Appendix E.2)"
            if closer and exact != paper
            else ""
        )
    )


def _method_agreement_notes(results: dict[str, Any]) -> list[str]:
    """Per kernel size: bisection without a stable alpha, or bisection and spectral bounds more than 2% apart."""
    notes = []
    for w, e in results["kernels"].items():
        if e["alpha_min_empirical"] is None:
            empty = e["alpha_min_spectral"] >= e["alpha_max_spectral"]
            notes.append(
                f"w={w}: bisection found no stable alpha (its start alpha={e['bisection']['note']}); the "
                f"spectral interval ({e['alpha_min_spectral']:.6g}, {e['alpha_max_spectral']:.6g}) is "
                + ("empty too" if empty else "NOT empty: the two methods disagree")
            )
            continue
        for side in ("min", "max"):
            r = e[f"rel_diff_{side}_bisection_vs_spectral"]
            if r is None or r > 0.02:
                notes.append(f"w={w}: bisection and spectral alpha_{side} disagree by {r} (> 2%)")
    return notes


def _plot(curves: dict[int, dict[str, Any]], results: dict[str, Any], config: LinearConfig, path: Path) -> None:
    """Figure 4: linearized loss (symlog) and ||K|| vs iterations, one column per kernel size."""
    ws = list(curves)
    fig = Figure(figsize=(4.5 * len(ws), 7))
    axes = fig.subplots(2, len(ws), squeeze=False)
    labels = ["0.9 a_min", "1.1 a_min", "inside", "0.9 a_max", "1.1 a_max"]
    for j, w in enumerate(ws):
        c = curves[w]
        it = np.arange(1, c["loss"].shape[1] + 1)
        for i, al in enumerate(c["alphas"]):
            # Clipped (NaN) past 1e100, like the paper's Figure 4 (tick locators overflow near 1e308).
            loss = np.where(np.abs(c["loss"][i]) < 1e100, c["loss"][i], np.nan)
            norm = np.where(np.abs(c["norm"][i]) < 1e100, c["norm"][i], np.nan)
            axes[0, j].plot(it, loss, label=f"{labels[i]}: alpha={al:.4g}")
            axes[1, j].plot(it, norm)
        axes[0, j].set_yscale("symlog")
        axes[1, j].set_yscale("log")
        e = results["kernels"][str(w)]
        fmt = lambda x: "none" if x is None else f"{x:.4g}"  # noqa: E731
        axes[0, j].set_title(
            f"w={w}, {config.scheme}, dt={config.dt:g}\nempirical ({fmt(e['alpha_min_empirical'])}, "
            f"{fmt(e['alpha_max_empirical'])})",
            fontsize=9,
        )
        axes[0, j].set_ylabel("linearized loss (symlog)")
        axes[1, j].set_ylabel("||K||")
        axes[1, j].set_xlabel("iteration")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, bbox_inches=None)  # laid out already: no second (bbox) render


def summarize(results: dict[str, Any]) -> str:
    """A short table of theory vs empirical bounds per kernel size, plus notes."""
    lines = [
        f"scheme={results['scheme']}  image={results['image']}  sum(I)={results['image_sum']:g}",
        f"reading: {results['reading']}",
        f"{'w':>4} {'a_min theory':>13} {'a_max theory':>13} {'a_min emp':>13} {'a_max emp':>13} "
        f"{'a_min spec':>13} {'a_max spec':>13}",
    ]
    f = lambda x: "None" if x is None else f"{x:.6g}"  # noqa: E731
    for w, e in results["kernels"].items():
        lines.append(
            f"{w:>4} {f(e['alpha_min_theory']):>13} {f(e['alpha_max_theory']):>13} "
            f"{f(e['alpha_min_empirical']):>13} {f(e['alpha_max_empirical']):>13} "
            f"{f(e['alpha_min_spectral']):>13} {f(e['alpha_max_spectral']):>13}"
        )
    lines += [f"note: {n}" for n in results["notes"]]
    lines.append(f"total {results['seconds_total']:.1f} s")
    return "\n".join(lines)
