"""Figure 7 under every candidate reading of its setting (``--preset fig7-readings``).

The paper's code for Figure 7 is not released; :data:`READINGS` are the readings of pooling x
inputs x two-class loss. :func:`run_readings` runs the 1- and 3-layer nets under each,
:func:`matches_paper_fig7` says which show the figure (1 layer stable, 3 layers restrained at
lr 5) and :func:`choose_reading` picks one (the default when none does).
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
from eos_jax.stability import regime
from experiments.eos.config import FIG7_PAPER_LRS, default_config
from experiments.eos.rundir import checked_out
from experiments.eos.runner import _fmt, run

# The candidate readings of the paper's Figure 7 setting (its code is not released): pooling of the
# last feature map (the authors' AvgPooling in single_layer/PySun.py vs the Riemann sum of Eq. (6)),
# inputs (raw pixels in [0, 1] vs standardized with the training set's mean and std, as Cohen et al.
# prepare their data in src/cifar.py), and the two-class loss (one logit + BCE, Eq. (20), vs a linear
# head with two outputs + softmax cross-entropy, Cohen et al.'s src/archs.py + CrossEntropyLoss).
# The first reading is the default; the order decides ties.
READINGS = tuple(
    {"pool": p, "standardize": z, "binary": b}
    for p in ("mean", "sum")
    for z in (False, True)
    for b in ("bce", "softmax")
)
READINGS_STEPS = 200  # fewer than fig7's 300: eight readings x two depths on a shared 2-core CPU
READINGS_SHARPNESS_EVERY = 25


def reading_name(r: dict[str, Any]) -> str:
    return f"{r['pool']}-{'std' if r['standardize'] else 'raw'}-{r['binary']}"


def matches_paper_fig7(variants: dict[str, dict[str, Any]], lr: float = 5.0) -> dict[str, Any]:
    """Whether a reading shows Figure 7: the 1-layer net stable at ``lr``, the 3-layer one restrained there.

    Args:
      variants: ``{"layers1": entry, "layers3": entry}`` with per-lane ``regime``.

    Returns:
      ``{"matches": bool, "layers1": regime at lr, "layers3": regime at lr}`` (None when lr was not run).
    """

    def at(v: str) -> str | None:
        return next((l["regime"] for l in variants[v]["lanes"] if l["learning_rate"] == lr), None)

    r1, r3 = at("layers1"), at("layers3")
    return {"lr": lr, "layers1": r1, "layers3": r3, "matches": r1 == "stable" and r3 == "restrained"}


def choose_reading(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The first reading (in :data:`READINGS` order, the default first) that matches Figure 7, if any."""
    matching = [n for n, t in table.items() if t["match"]["matches"]]
    if matching:
        return {
            "reading": matching[0],
            "matching": matching,
            "why": f"{matching[0]} is the first reading (default first) under which the 1-layer net is stable "
            "and the 3-layer net restrained at lr 5",
        }
    default = reading_name(READINGS[0])
    return {
        "reading": default,
        "matching": [],
        "why": f"no reading shows the 1-layer net stable and the 3-layer net restrained at lr 5; the default "
        f"stays the authors' code ({default})",
    }


def format_readings(table: dict[str, dict[str, Any]], choice: dict[str, Any], steps: int) -> str:
    """The Markdown table of the readings: lr x (max / last lr*lambda, late spikes, final loss, regime)."""
    rows = [
        f"# Figure 7 readings ({steps} steps; regime per lr)",
        "",
        "| reading | layers | 2/lambda at step 0 | lr | max lr*lambda | last lr*lambda | spikes (late) | "
        "final loss | regime |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rname, t in table.items():
        for vname, entry in t["variants"].items():
            for l in entry["lanes"]:
                rows.append(
                    f"| {rname} | {vname[6:]} | {_fmt(entry.get('lr_threshold_step0'))} | {l['learning_rate']:g} | "
                    f"{_fmt(l['max_normalized_sharpness'], '.3g')} | "
                    f"{_fmt(l.get('final_normalized_sharpness'), '.3g')} | {l['num_loss_increases_1pct']} "
                    f"({l['num_loss_increases_1pct_late']}) | {_fmt(l['final_loss'], '.3g')} | {l['regime']} |"
                )
    rows += ["", "| reading | 1 layer at lr 5 | 3 layers at lr 5 | matches Figure 7 |", "|---|---|---|---|"]
    for rname, t in table.items():
        m = t["match"]
        rows.append(f"| {rname} | {m['layers1']} | {m['layers3']} | {'yes' if m['matches'] else 'no'} |")
    rows += ["", f"Chosen: {choice['reading']}: {choice['why']}."]
    return "\n".join(rows)


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
    readings: Sequence[dict[str, Any]] = READINGS,
) -> tuple[Path, dict[str, Any]]:
    """Runs Figure 7's two depths under every reading and writes readings.md / readings.json.

    ``--preset fig7-readings``: each reading's 1- and 3-layer runs go to
    ``out/<reading>/layers{1,3}``; the table (lr x max/last ``lr * lambda_max``, spikes,
    final loss, regime) and the reading chosen by :func:`choose_reading` are printed and
    written. Runs :data:`READINGS_STEPS` steps (fewer than fig7's 300) unless ``--steps``.
    """
    stream = stream or sys.stdout
    ov = dict(overrides or {})
    for f in ("pool", "standardize", "binary", "model", "layers"):
        if f in ov:
            raise ConfigError(f"--preset fig7-readings varies the model, pooling, inputs and loss itself; drop --{f}")
    base = {"lr": FIG7_PAPER_LRS, "steps": READINGS_STEPS, "sharpness_every": READINGS_SHARPNESS_EVERY, **ov}
    runs = [(reading_name(r), n, default_config("cnn", **{**base, **r, "layers": n})) for r in readings for n in (1, 3)]
    for _, _, c in runs:
        c.validate()
    config = {"preset": "fig7-readings", "runs": {f"{r}/layers{n}": c.to_dict() for r, n, c in runs}}
    tag = "fig7-readings-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    root = checked_out(out, runs_root, config, tag, resume)
    edata.load_first_available(list(runs[0][2].dataset), "train", data_dir=data_dir)
    root = eio.open_run_dir(root, config, resume=resume)
    table: dict[str, dict[str, Any]] = {}
    for rname, n, c in runs:
        vdir = root / rname / f"layers{n}"
        vresume = resume and (vdir / "results.json").exists()
        if vresume:
            res = eio.read_json(vdir / "results.json")
        else:
            vresume = resume and (vdir / "config.json").exists()
            _, res = run(
                c,
                out=vdir,
                resume=vresume,
                quiet=True,
                data_dir=data_dir,
                runtime_metadata=runtime_metadata,
                stream=stream,
            )
        thr = res["summary"]["threshold"]
        lines = tr.read_metrics(vdir / "metrics.jsonl")
        lam0 = next((r["sharpness"] for r in lines if r["step"] == 0 and r.get("sharpness") is not None), None)
        lanes = []
        for l in res["lanes"]:
            keep = {
                k: l.get(k)
                for k in (
                    "learning_rate",
                    "finite",
                    "first_nonfinite_step",
                    "final_loss",
                    "max_normalized_sharpness",
                    "final_normalized_sharpness",
                    "num_loss_increases_1pct",
                    "num_loss_increases_1pct_late",
                    "max_rel_loss_increase",
                    "stable",
                )
            }
            keep["regime"] = regime(l, thr)
            lanes.append(keep)
        entry = table.setdefault(rname, {"variants": {}})
        entry["variants"][f"layers{n}"] = {
            "dataset": res.get("dataset"),
            "lambda_max_step0": lam0,
            "lr_threshold_step0": (thr / lam0) if lam0 and lam0 > 0 else None,
            "lanes": lanes,
        }
        if not quiet:
            print(
                f"  {rname} layers{n}: " + ", ".join(f"lr {l['learning_rate']:g} {l['regime']}" for l in lanes),
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
        "note": f"{steps} steps (fig7 runs 300)",
    }
    eio.atomic_write_json(root / "readings.json", findings)
    eio.atomic_write_text(root / "readings.md", text + "\n")
    print(text, file=stream, flush=True)
    return root, findings
