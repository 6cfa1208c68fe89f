"""``python -m experiments.predict agreement RUN RUN ...``: how far any prediction can agree with a measurement.

The measured regime of a (depth, lr, weight decay) cell varies over initialization seeds, so
the measurement is itself a sample. Given several ``predict cnn`` runs of the same grid on
disjoint seeds, this reports, besides the predictor's own agreement:

* **measurement against measurement**: for every pair of runs, the share of cells whose
  majority regime over the one run's seeds is the majority over the other's. No prediction of
  one regime per cell can expect to agree with a measurement much more often than a second
  measurement does.
* **the best per-configuration prediction, in hindsight**: pool every seed, take each cell's
  most frequent regime (:func:`experiments.predict.cnn.majority`), and count the seed cells it
  matches. A rule that sees only (depth, lr, weight decay) cannot do better per seed on these
  seeds.
* **the expected agreement of that prediction with the majority of ``n`` seeds**: the majority
  over ``n`` seeds drawn without replacement from the pooled ones has the distribution of
  :func:`majority_distribution` (multivariate hypergeometric); a per-configuration prediction
  agrees with it at most with probability ``max_r P(r)`` per cell.

A per-seed prediction can in principle beat the per-configuration bounds; the report shows how
much it must foresee from each seed's initialization to do so.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eos_jax.errors import ConfigError
from experiments.predict.cnn import grid_cells, majority, read_run

__all__ = ["agreement", "load_runs", "majority_distribution", "summarize_agreement"]

GRID_FIELDS = ("layers", "lr", "weight_decay", "steps", "num_examples")
"""What runs must share to be compared (their ``config.json``); the dataset is compared too."""


def majority_distribution(counts: Mapping[str, int], n: int) -> dict[str, float]:
    """The distribution of the majority regime of ``n`` seeds drawn without replacement from a pool.

    The pool holds ``counts[r]`` seeds of regime ``r``. The majority of a draw is
    :func:`experiments.predict.cnn.majority` of its regimes (the most frequent; a tie goes to the
    most severe), so it depends on the draw's counts only, and those are multivariate
    hypergeometric: ``P(c) = prod_r C(counts[r], c_r) / C(N, n)``.

    Args:
      counts: regime -> seeds of the pool with that regime (zero counts are allowed).
      n: seeds drawn, ``1 <= n <= sum(counts)``.

    Returns:
      Regime -> probability of being the majority (only regimes with a non-zero probability), the
      most probable first.

    Examples:
      Of 3 restrained and 2 stable seeds, a draw of 2 ties 1 : 1 (restrained, the more severe)
      with probability 6/10, and is 2 stable with probability 1/10:

      >>> from experiments.predict.agreement import majority_distribution
      >>> {r: round(p, 3) for r, p in majority_distribution({"restrained": 3, "stable": 2}, 2).items()}
      {'restrained': 0.9, 'stable': 0.1}
    """
    regimes = [r for r, k in counts.items() if k > 0]
    total = sum(counts[r] for r in regimes)
    if not 1 <= n <= total:
        raise ConfigError(f"n={n}; expected 1 <= n <= {total} (the seeds in the pool)")
    out: dict[str, float] = {}
    norm = math.comb(total, n)
    for draw in itertools.product(*(range(min(counts[r], n) + 1) for r in regimes)):
        if sum(draw) != n:
            continue
        p = math.prod(math.comb(counts[r], c) for r, c in zip(regimes, draw)) / norm
        m = majority([r for r, c in zip(regimes, draw) for _ in range(c)])
        out[m] = out.get(m, 0.0) + p
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The ``config.json`` and ``results.json`` of ``predict cnn`` runs of one grid on disjoint seeds.

    Raises:
      ConfigError: one line naming the run and what is missing, differs or overlaps.
    """
    if len(paths) < 2:
        raise ConfigError(f"{len(paths)} run(s) given; expected at least 2 `predict cnn` runs to compare")
    runs: list[dict[str, Any]] = []
    owner: dict[int, str] = {}
    for path in map(Path, paths):
        config, results = read_run(path, str(path))
        if runs:
            first = runs[0]
            for name in GRID_FIELDS:
                if config.get(name) != first["config"].get(name):
                    raise ConfigError(
                        f"{path} has {name}={config.get(name)!r}; {first['path']} has "
                        f"{name}={first['config'].get(name)!r} (runs compared must share {', '.join(GRID_FIELDS)})"
                    )
            if results.get("dataset") != first["results"].get("dataset"):
                raise ConfigError(
                    f"{path} was measured on {results.get('dataset')}; {first['path']} on "
                    f"{first['results'].get('dataset')}"
                )
        for seed in results.get("seeds", []):
            if seed in owner:
                raise ConfigError(f"seed {seed} is in {owner[seed]} and in {path}; expected disjoint seeds")
            owner[seed] = str(path)
        runs.append({"path": str(path), "config": config, "results": results})
    return runs


def _key(c: Mapping[str, Any]) -> tuple:
    return (c["layers"], c["lr"], c["weight_decay"])


def _share(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def _same(a: Mapping[tuple, str], b: Mapping[tuple, str], keys: Sequence[tuple]) -> float:
    """The share of ``keys`` where ``a`` and ``b`` name the same regime."""
    return _share(sum(a[k] == b[k] for k in keys), len(keys))


def agreement(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Measurement against measurement, the per-configuration bounds and the predictor, over ``runs``.

    Args:
      runs: :func:`load_runs` of two or more runs.

    Returns:
      ``per_run`` (each run's seeds and the predictor's agreement per seed and per majority cell),
      ``pairs`` (each pair's agreement of measured majorities), ``pooled`` (each cell's counts
      of measured regimes over every seed, its majority and the distribution of the majority
      of ``seeds_per_run`` seeds), and ``depths`` (``"all"`` and each depth):
      ``measured_vs_measured`` (mean / min / max over pairs), ``predictor_majority`` (same,
      over runs), ``predictor_seed`` and ``per_config_seed_ceiling`` (shares of all seed
      cells), ``per_config_majority_ceiling`` (expected share of majority cells) and
      ``predictor_pooled_majority`` (the majority of the predictions over every seed against
      the pooled majority).
    """
    per_run = []
    cells_all: list[Mapping[str, Any]] = []
    measured, predicted = [], []
    for run in runs:
        cells = run["results"]["cells"]
        cells_all.extend(cells)
        grid = grid_cells(cells)
        measured.append({_key(g): g["measured"] for g in grid})
        predicted.append({_key(g): g["predicted"] for g in grid})
        per_run.append({"path": run["path"], "seeds": sorted({c["seed"] for c in cells})})
    depths = sorted({c["layers"] for c in cells_all})
    keys = sorted(measured[0])
    n = min(len(r["seeds"]) for r in per_run)
    pooled_counts = {k: Counter(c["measured"] for c in cells_all if _key(c) == k) for k in keys}
    pooled = {k: majority(list(cnt.elements())) for k, cnt in pooled_counts.items()}
    dist = {k: majority_distribution(cnt, n) for k, cnt in pooled_counts.items()}
    pooled_pred = {_key(g): g["predicted"] for g in grid_cells(cells_all)}

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "count": len(values)}

    by_depth: dict[str, Any] = {}
    for depth in ["all", *depths]:
        ks = [k for k in keys if depth == "all" or k[0] == depth]
        cs = [c for c in cells_all if depth == "all" or c["layers"] == depth]
        pairs = [_same(measured[i], measured[j], ks) for i, j in itertools.combinations(range(len(runs)), 2)]
        own = [_same(predicted[i], measured[i], ks) for i in range(len(runs))]
        by_depth[str(depth)] = {
            "cells": len(ks),
            "seed_cells": len(cs),
            "measured_vs_measured": stats(pairs),
            "predictor_majority": stats(own),
            "predictor_seed": _share(sum(c["predicted"] == c["measured"] for c in cs), len(cs)),
            "per_config_seed_ceiling": _share(sum(c["measured"] == pooled[_key(c)] for c in cs), len(cs)),
            "per_config_majority_ceiling": _share(sum(max(dist[k].values()) for k in ks), len(ks)),
            "predictor_pooled_majority": _same(pooled_pred, pooled, ks),
        }
    for i, r in enumerate(per_run):
        cells = runs[i]["results"]["cells"]
        r["predictor_seed"] = _share(sum(c["predicted"] == c["measured"] for c in cells), len(cells))
        r["predictor_majority"] = _same(predicted[i], measured[i], keys)
    return {
        "per_run": per_run,
        "seeds_per_run": n,
        "pairs": [
            {
                "runs": [per_run[i]["path"], per_run[j]["path"]],
                "agreement": _same(measured[i], measured[j], keys),
            }
            for i, j in itertools.combinations(range(len(runs)), 2)
        ],
        "pooled": [
            {
                "layers": k[0],
                "lr": k[1],
                "weight_decay": k[2],
                "counts": dict(pooled_counts[k].most_common()),
                "majority": pooled[k],
                "predicted_majority": pooled_pred[k],
                "majority_of_n": dist[k],
            }
            for k in keys
        ],
        "depths": by_depth,
    }


def summarize_agreement(report: Mapping[str, Any]) -> str:
    """Per depth and over all: the agreements and the per-configuration bounds, in percent."""
    n, runs = report["seeds_per_run"], len(report["per_run"])
    pooled = sum(len(r["seeds"]) for r in report["per_run"])

    def pct(x: float) -> str:
        return f"{100 * x:.0f} %"

    lines = [f"{runs} runs of {n} or more seeds each, {pooled} seeds in all"]
    for depth, d in report["depths"].items():
        mm, pm = d["measured_vs_measured"], d["predictor_majority"]
        name = "all depths" if depth == "all" else f"{depth} layer(s)"
        lines += [
            f"{name}: majority cells ({d['cells']} per run): measured vs measured {pct(mm['mean'])} "
            f"({pct(mm['min'])} to {pct(mm['max'])}), predictor vs measured {pct(pm['mean'])} ({pct(pm['min'])} "
            f"to {pct(pm['max'])}), best per-configuration prediction {pct(d['per_config_majority_ceiling'])} "
            "expected",
            f"  seed cells ({d['seed_cells']}): predictor {pct(d['predictor_seed'])}, best per-configuration "
            f"prediction in hindsight {pct(d['per_config_seed_ceiling'])}",
            f"  majority over all {pooled} seeds: predictor {pct(d['predictor_pooled_majority'])}",
        ]
    return "\n".join(lines)
