"""Figure 7 under every candidate reading of its setting (``--preset fig7-readings``).

The paper's code for Figure 7 is not released; :data:`READINGS` are the readings of initialization x
pooling x inputs x two-class loss (the preset runs :data:`PRESET_READINGS`). :func:`run_readings`
runs the 1- and 3-layer nets under each, over seeds as lanes; :func:`matches_paper_fig7` counts the
seeds that show the figure (1 layer stable, 3 layers not, at lr 5) and :func:`choose_reading` picks
the reading with the most (the default when none does).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eos_jax import data as edata
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.errors import ConfigError
from eos_jax.stability import format_counts, regime_counts
from experiments.eos.config import FIG7_PAPER_LRS, default_config
from experiments.eos.rundir import checked_out
from experiments.eos.runner import _fmt, lane_fields, run_variant

# The candidate readings of the paper's Figure 7 setting (its code is not released): the kernels'
# initialization (N(0, 1) as Sec. 5.3 states and the authors' single_layer/PySun.py draws with
# np.random.randn, vs PyTorch's default U(-1/3, 1/3) that Cohen et al. use), pooling of the last
# feature map (the authors' AvgPooling vs the Riemann sum of Eq. (6)), inputs (raw pixels in [0, 1] vs
# standardized with the training set's mean and std, as Cohen et al. prepare their data in src/cifar.py),
# and the two-class loss (one logit + BCE, Eq. (20), vs a linear head with two outputs + softmax
# cross-entropy, Cohen et al.'s src/archs.py + CrossEntropyLoss). The first reading is the default;
# the order decides ties.
READINGS = tuple(
    {"init": i, "pool": p, "standardize": z, "binary": b}
    for i in ("normal", "pytorch")
    for p in ("mean", "sum")
    for z in (False, True)
    for b in ("bce", "softmax")
)
# What --preset fig7-readings runs: both initializations under the authors' pooling and raw inputs,
# with either loss (the sum-pooled and standardized readings under PyTorch's init showed no Figure 7).
PRESET_READINGS = tuple(r for r in READINGS if r["pool"] == "mean" and not r["standardize"])
READINGS_STEPS = 200
READINGS_SHARPNESS_EVERY = 25
READINGS_SEEDS = (0, 1, 2, 3, 4)


def reading_name(r: dict[str, Any]) -> str:
    return f"{r['init']}-{r['pool']}-{'std' if r['standardize'] else 'raw'}-{r['binary']}"


def matches_paper_fig7(variants: dict[str, dict[str, Any]], lr: float = 5.0) -> dict[str, Any]:
    """Per seed, whether a reading shows Figure 7 at ``lr``: the 1-layer net stable, the 3-layer one not.

    Args:
      variants: ``{"layers1": entry, "layers3": entry}`` with per-lane ``regime`` and ``seed``.

    Returns:
      ``{"lr", "seeds", "layers1": [regime per seed], "layers3": [...], "matching_seeds": seeds with
      the 1-layer net stable and the 3-layer net unstable, "restrained_seeds": of those, the
      3-layer net restrained, "matches": restrained in the majority of the seeds}``.
    """

    def at(v: str) -> dict[int, str]:
        return {l.get("seed", 0): l["regime"] for l in variants[v]["lanes"] if l["learning_rate"] == lr}

    r1, r3 = at("layers1"), at("layers3")
    seeds = sorted(set(r1) & set(r3))
    matching = [s for s in seeds if r1[s] == "stable" and r3[s] != "stable"]
    return {
        "lr": lr,
        "seeds": seeds,
        "layers1": [r1[s] for s in seeds],
        "layers3": [r3[s] for s in seeds],
        "matching_seeds": len(matching),
        "restrained_seeds": sum(1 for s in matching if r3[s] == "restrained"),
        "matches": bool(seeds) and 2 * sum(1 for s in matching if r3[s] == "restrained") > len(seeds),
    }


def choose_reading(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The reading under which the 1-layer net is stable and the 3-layer net restrained at lr 5 in the most seeds.

    Restrained, not merely unstable: Figure 7 shows restrained instabilities, and a collapse to
    the constant predictor (:func:`eos_jax.stability.regime`) is not one. Ties go to the first
    reading in the table's order (:data:`READINGS`: the paper's Sec. 5.3 N(0, 1) kernels, which
    the authors' code draws, before PyTorch's default). With no seed restrained anywhere, the
    first reading (the default) stays.
    """
    names = list(table)
    if not names:
        raise ConfigError("fig7-readings: no reading was run")
    best = max(names, key=lambda n: (table[n]["match"]["restrained_seeds"], -names.index(n)))
    m = table[best]["match"]
    matching = [n for n in names if table[n]["match"]["matches"]]
    if m["restrained_seeds"] == 0:
        return {
            "reading": names[0],
            "matching": matching,
            "why": f"no reading shows the 1-layer net stable and the 3-layer net restrained at lr 5 in any seed; "
            f"the default stays the first reading ({names[0]})",
        }
    n = len(m["seeds"])
    tied = [x for x in names if table[x]["match"]["restrained_seeds"] == m["restrained_seeds"] and x != best]
    return {
        "reading": best,
        "matching": matching,
        "tied_with": tied,
        "why": f"{best} shows the 1-layer net stable and the 3-layer net restrained at lr 5 in the most seeds "
        f"({m['restrained_seeds']}/{n}; unstable in {m['matching_seeds']}/{n})"
        + (f", tied with {', '.join(tied)} and first in the readings' order (the paper's text first)" if tied else ""),
    }


def format_readings(table: dict[str, dict[str, Any]], choice: dict[str, Any], steps: int) -> str:
    """The Markdown table of the readings: per lr, the regimes counted over seeds, lr*lambda and final loss ranges."""
    rows = [
        f"# Figure 7 readings ({steps} steps; regimes of the seeds per lr)",
        "",
        "| reading | layers | 2/lambda at step 0 (seeds) | lr | regimes over seeds | max lr*lambda | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for rname, t in table.items():
        for vname, entry in t["variants"].items():
            th = [x for x in entry.get("lr_threshold_step0") or [] if x is not None]
            ths = f"{min(th):.3g}-{max(th):.3g}" if th else "-"
            for lr in sorted({l["learning_rate"] for l in entry["lanes"]}):
                ls = [l for l in entry["lanes"] if l["learning_rate"] == lr]
                regs = [l["regime"] for l in ls]
                mx = [l["max_normalized_sharpness"] for l in ls if l["max_normalized_sharpness"] is not None]
                fl = [l["final_loss"] for l in ls if l["final_loss"] is not None]
                rows.append(
                    f"| {rname} | {vname[6:]} | {ths} | {lr:g} | {format_counts(regime_counts(regs), len(regs))} | "
                    f"{_fmt(min(mx, default=None), '.3g')}-{_fmt(max(mx, default=None), '.3g')} | "
                    f"{_fmt(min(fl, default=None), '.3g')}-{_fmt(max(fl, default=None), '.3g')} |"
                )
    rows += [
        "",
        "| reading | 1 layer at lr 5 | 3 layers at lr 5 | 1 layer stable, 3 layers unstable | of them restrained |",
        "|---|---|---|---|---|",
    ]
    for rname, t in table.items():
        m = t["match"]
        n = len(m["seeds"])
        rows.append(
            f"| {rname} | {format_counts(regime_counts(m['layers1']), n)} | "
            f"{format_counts(regime_counts(m['layers3']), n)} | {m['matching_seeds']}/{n} | {m['restrained_seeds']}/{n} |"
        )
    rows += ["", f"Chosen: {choice['reading']}: {choice['why']}."]
    return "\n".join(rows)


def _reading_runs(overrides: dict[str, Any], readings: Sequence[dict[str, Any]]) -> list[tuple[str, int, Any]]:
    """``(reading name, layers, EosConfig)`` of every run of the readings preset, each validated."""
    ov = dict(overrides)
    for f in ("init", "pool", "standardize", "binary", "model", "layers"):
        if f in ov:
            raise ConfigError(
                f"--preset fig7-readings varies the model, initialization, pooling, inputs and loss itself; drop --{f}"
            )
    base = {
        "lr": FIG7_PAPER_LRS,
        "steps": READINGS_STEPS,
        "sharpness_every": READINGS_SHARPNESS_EVERY,
        "seed": READINGS_SEEDS,
        "k": (1,),
        **ov,
    }
    runs = [(reading_name(r), n, default_config("cnn", **{**base, **r, "layers": n})) for r in readings for n in (1, 3)]
    for _, _, c in runs:
        c.validate()
    return runs


# What readings.json keeps of each lane record.
READING_LANE_FIELDS = (
    "learning_rate",
    "seed",
    "finite",
    "first_nonfinite_step",
    "final_loss",
    "max_normalized_sharpness",
    "final_normalized_sharpness",
    "num_loss_increases_1pct",
    "num_loss_increases_1pct_late",
    "max_rel_loss_increase",
    "stable",
    "regime",
)


def _reading_variant(c: Any, vdir: Path, res: dict[str, Any]) -> dict[str, Any]:
    """One depth of one reading: its dataset, lambda_max and 2/lambda_max at step 0 per seed, and its lanes."""
    lines = tr.read_metrics(vdir / "metrics.jsonl")
    lam0 = {r["lane"]: r["sharpness"] for r in lines if r["step"] == 0 and r.get("sharpness") is not None}  # per lane
    thr = res["summary"]["threshold"]
    seeds0 = {l["seed"]: l["lane"] for l in res["lanes"] if l["learning_rate"] == min(c.lr)}
    return {
        "dataset": res.get("dataset"),
        "lambda_max_step0": [lam0.get(seeds0[s]) for s in sorted(seeds0)],
        "lr_threshold_step0": [
            (thr / lam0[seeds0[s]]) if lam0.get(seeds0[s]) and lam0[seeds0[s]] > 0 else None for s in sorted(seeds0)
        ],
        "lanes": lane_fields(res["lanes"], READING_LANE_FIELDS),
    }


def run_readings(
    *,
    overrides: dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    data_dir: str | None = None,
    runs_root: str | Path = "runs/eos",
    runtime_metadata: dict[str, Any] | None = None,
    stream: Any = None,
    readings: Sequence[dict[str, Any]] = PRESET_READINGS,
) -> tuple[Path, dict[str, Any]]:
    """Runs Figure 7's two depths under every reading and writes readings.md / readings.json.

    ``--preset fig7-readings``: each reading's 1- and 3-layer runs go to
    ``out/<reading>/layers{1,3}``; the table (lr x max/last ``lr * lambda_max``, spikes,
    final loss, regime) and the reading chosen by :func:`choose_reading` are printed and
    written. Runs :data:`READINGS_STEPS` steps (fewer than fig7's 300) unless ``--steps``.
    """
    stream = stream or sys.stdout
    runs = _reading_runs(overrides or {}, readings)
    config = {"preset": "fig7-readings", "runs": {f"{r}/layers{n}": c.to_dict() for r, n, c in runs}}
    tag = "fig7-readings-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    root = checked_out(out, runs_root, config, tag, resume)
    edata.load_first_available(list(runs[0][2].dataset), "train", data_dir=data_dir)
    root = eio.open_run_dir(root, config, resume=resume)
    table: dict[str, dict[str, Any]] = {}
    for rname, n, c in runs:
        vdir = root / rname / f"layers{n}"
        res = run_variant(
            c,
            vdir,
            resume=resume,
            quiet=True,
            data_dir=data_dir,
            runtime_metadata=runtime_metadata,
            stream=stream,
            reuse_finished=True,
        )
        variant = _reading_variant(c, vdir, res)
        table.setdefault(rname, {"variants": {}})["variants"][f"layers{n}"] = variant
        if not quiet:
            by_lr: dict[float, list[str]] = {}
            for l in variant["lanes"]:
                by_lr.setdefault(l["learning_rate"], []).append(l["regime"])
            print(
                f"  {rname} layers{n}: "
                + "; ".join(f"lr {lr:g}: {format_counts(regime_counts(r), len(r))}" for lr, r in by_lr.items()),
                file=stream,
                flush=True,
            )
    for t in table.values():
        t["match"] = matches_paper_fig7(t["variants"])
    choice = choose_reading(table)
    steps = runs[0][2].steps
    text = format_readings(table, choice, steps)
    findings = {
        "preset": "fig7-readings",
        "steps": steps,
        "readings": table,
        "choice": choice,
        "regimes": "see eos_jax.stability.regime",
        "note": f"{steps} steps (fig7 runs 300), seeds {', '.join(map(str, READINGS_SEEDS))} as lanes",
    }
    eio.atomic_write_json(root / "readings.json", findings)
    eio.atomic_write_text(root / "readings.md", text + "\n")
    print(text, file=stream, flush=True)
    return root, findings
