"""One Edge-of-Stability run: trains the sweep of an :class:`~experiments.eos.config.EosConfig`.

:func:`run` validates the config, loads the data, builds the problem, trains every lane
with :func:`eos_jax.train.train` and writes ``metadata.json``, ``results.json`` (with the
stability verdict of :func:`eos_jax.stability.is_stable`), the plot ``eos.png`` and a
printed summary (:func:`format_summary`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from eos_jax import distributed, plotting, runtime
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.errors import RunDirError
from eos_jax.stability import (
    AMPLIFIED_REL_L1,
    CRITERION,
    REGIME_CRITERION,
    constant_loss,
    format_counts,
    is_stable,
    regime,
    regime_counts,
)
from eos_jax.train.config import uniform_threshold
from experiments.eos.config import EosConfig, build_problem, load_data, loss_kind
from experiments.eos.rundir import _utc_stamp, checked_out


def run(
    cfg: EosConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    data_dir: str | None = None,
    runs_root: str | Path = "runs/eos",
    runtime_metadata: dict[str, Any] | None = None,
    stream: Any = None,
) -> tuple[Path, dict[str, Any]]:
    """Trains the sweep of ``cfg`` into a run directory and prints a summary.

    Args:
      cfg: the configuration (validated here).
      out: run directory (default ``runs_root/<UTC timestamp>-<config hash>``; with
        ``resume``, the latest run under ``runs_root`` with this config).
      resume: continue an interrupted run.
      quiet: no progress bar and no summary.
      data_dir: searched first for dataset files.
      runs_root: where default run directories go.
      runtime_metadata: :func:`eos_jax.runtime.configure`'s result (else :func:`eos_jax.runtime.metadata`).
      stream: where warnings and the summary are printed (stderr / stdout by default).

    Returns:
      ``(run_dir, results)``.

    Raises:
      ConfigError, DataError, RunDirError: bad input, before anything is written (a ``--resume``
        whose checkpoints were written with another lane grouping or device count is a
        :class:`~eos_jax.errors.CheckpointMismatchError`, a ConfigError).
      eos_jax.train.TrainingInterrupted: SIGINT/SIGTERM, after a checkpoint.
    """
    cfg.validate()
    config = cfg.to_dict()
    primary = distributed.is_primary()  # with several processes, process 0 writes every file but the checkpoints
    run_dir = checked_out(out, runs_root, config, cfg.short_hash(), resume)
    distributed.barrier("experiments.eos.checked")  # every process checked the directory before process 0 writes
    data, data_info = load_data(cfg, data_dir, stream=sys.stderr)
    problem, model_info = build_problem(cfg, data)
    if resume:
        _check_resumed_dataset(run_dir, data_info["name"])
    if primary:
        run_dir = eio.open_run_dir(run_dir, config, resume=resume)
    distributed.barrier("experiments.eos.opened")
    run_dir = Path(run_dir)
    lanes = cfg.lanes()
    if resume:
        # Checkpoints of another lane grouping or device count: one line, before metadata.json is rewritten.
        tr.check_resume(problem, lanes, cfg.engine_config(), run_dir, dtype=jnp.dtype(cfg.dtype))
    meta = {
        "runtime": runtime_metadata or runtime.metadata(),
        "dataset": data_info,
        "model": model_info,
        "threshold": uniform_threshold(problem.threshold, lanes),
        "stability_criterion": CRITERION,
        "command": sys.argv,
        **_resume_record(run_dir, resume),
    }
    if primary:
        eio.atomic_write_json(run_dir / "metadata.json", meta)
    results = tr.train(
        problem,
        lanes,
        cfg.engine_config(),
        run_dir,
        resume=resume,
        quiet=quiet,
        dtype=jnp.dtype(cfg.dtype),
    )
    results["stable"] = {str(l["lane"]): is_stable(l) for l in results["lanes"]}
    closs = constant_loss(data["y"], loss_kind(cfg, int(data["num_classes"])), int(data["num_classes"]))
    for l in results["lanes"]:
        l["stable"] = is_stable(l)
        l["constant_loss"] = closs
        l["regime"] = regime(l, l["threshold"])
    results["findings"] = run_findings(results["lanes"])
    results["dataset"] = data_info["name"]
    if not primary:
        return run_dir, results
    eio.atomic_write_json(run_dir / "results.json", results)
    lines = tr.read_metrics(run_dir / "metrics.jsonl")
    title = (
        f"{cfg.model} {cfg.layers} layers on {data_info['name']} ({data_info['num_examples_used']} examples, "
        f"{cfg.steps} steps)"
    )
    regimes = {l["lane"]: l["regime"] for l in results["lanes"]}
    thresholds = sorted({l["threshold"] for l in results["lanes"]})
    plotting.plot_run(
        lines, run_dir / "eos.png", threshold=thresholds, title=title, regimes=regimes, constant_loss=closs
    )
    if not quiet:
        print(format_summary(results, title, run_dir), file=stream or sys.stdout, flush=True)
    return run_dir, results


def _check_resumed_dataset(run_dir: Path, name: str) -> None:
    """Refuses to resume a run trained on another dataset than ``name`` (RunDirError)."""
    old = eio.read_json(run_dir / "metadata.json") if (run_dir / "metadata.json").exists() else {}
    old_name = old.get("dataset", {}).get("name")
    if old_name is not None and old_name != name:
        raise RunDirError(f"--resume: {run_dir} was trained on {old_name} but {name} would be used now")


def _resume_record(run_dir: Path, resume: bool) -> dict[str, Any]:
    """metadata.json's ``resumed`` count and ``started_utc`` (kept from the first start when resuming)."""
    if resume and (run_dir / "metadata.json").exists():
        prev = eio.read_json(run_dir / "metadata.json")
        return {"resumed": prev.get("resumed", 0) + 1, "started_utc": prev.get("started_utc")}
    return {"started_utc": _utc_stamp()}


def run_variant(
    cfg: EosConfig,
    vdir: Path,
    *,
    resume: bool,
    quiet: bool,
    data_dir: str | None,
    runtime_metadata: dict[str, Any] | None,
    stream: Any,
    reuse_finished: bool = False,
) -> dict[str, Any]:
    """One variant of a preset or a reading, run into ``vdir``; returns its results.

    With ``resume``, a variant that was started (its ``config.json`` exists) resumes and one that
    was not starts; with ``reuse_finished`` too, a finished one (``results.json``) is read, not rerun.
    """
    if reuse_finished and resume and (vdir / "results.json").exists():
        return eio.read_json(vdir / "results.json")
    vresume = resume and (vdir / "config.json").exists()
    _, res = run(
        cfg, out=vdir, resume=vresume, quiet=quiet, data_dir=data_dir, runtime_metadata=runtime_metadata, stream=stream
    )
    return res


def lane_fields(lanes: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The ``keys`` of each lane record (None where a record lacks one)."""
    return [{k: l.get(k) for k in keys} for l in lanes]


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _cell(l: dict[str, Any]) -> tuple[float, float | None, float]:
    """A lane record's point of the grid but seed and k: (lr, momentum when swept, weight decay)."""
    return (l["learning_rate"], l.get("momentum"), l["weight_decay"])


def run_findings(lanes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the run shows, per (learning rate, momentum, weight decay): regimes over seeds and the perturbation's growth.

    For each (lr, momentum when swept, weight decay, k): the regime of every seed and their counts. For each k != 1:
    the RelL1 of each seed's final weights to its k = 1 twin, and which seeds amplified the
    last-bit perturbation (RelL1 >= :data:`AMPLIFIED_REL_L1`). Computed from the lanes' records.
    """
    out = []
    keys = sorted({_cell(l) for l in lanes}, key=lambda c: tuple(-1.0 if v is None else v for v in c))
    for lr, mom, wd in keys:
        cell = [l for l in lanes if _cell(l) == (lr, mom, wd)]
        entry: dict[str, Any] = {"learning_rate": lr, "weight_decay": wd, "by_k": []}
        if mom is not None:
            entry["momentum"] = mom
        for k in sorted({l["k"] for l in cell}):
            ls = sorted((l for l in cell if l["k"] == k), key=lambda l: l["seed"])
            regs = [l["regime"] for l in ls]
            row: dict[str, Any] = {
                "k": k,
                "seeds": [l["seed"] for l in ls],
                "regimes": regs,
                "counts": regime_counts(regs),
                "text": format_counts(regime_counts(regs), len(regs)),
            }
            if k != 1:
                rel = [l.get("rel_l1_to_k1") for l in ls]
                row["rel_l1_to_k1"] = rel
                row["amplified_seeds"] = [l["seed"] for l, r in zip(ls, rel) if r is not None and r >= AMPLIFIED_REL_L1]
            entry["by_k"].append(row)
        out.append(entry)
    return out


def format_run_findings(found: list[dict[str, Any]], lanes: list[dict[str, Any]]) -> list[str]:
    """The findings of :func:`run_findings` as summary lines."""
    rows = []
    k1 = {(*_cell(l), l["seed"]): l["regime"] for l in lanes if l["k"] == 1}
    for e in found:
        head = f"lr {e['learning_rate']:g}" + (f", momentum {e['momentum']:g}" if "momentum" in e else "")
        head += f", wd {e['weight_decay']:g}" if e["weight_decay"] else ""
        for row in e["by_k"]:
            n = len(row["seeds"])
            rows.append(f"  {head}, k={row['k']}: {row['text']} seed{'s' if n > 1 else ''}")
        for row in e["by_k"]:
            if row["k"] == 1 or "rel_l1_to_k1" not in row:
                continue
            per = []
            for seed, rel in zip(row["seeds"], row["rel_l1_to_k1"]):
                reg = k1.get((e["learning_rate"], e.get("momentum"), e["weight_decay"], seed))
                per.append(f"seed {seed} {_fmt(rel, '.2g')}" + (f" ({reg})" if reg else ""))
            amp = row["amplified_seeds"]
            rows.append(f"  {head}: RelL1(k=1, k={row['k']}) at the end: " + ", ".join(per))
            if amp:
                vals = [r for s_, r in zip(row["seeds"], row["rel_l1_to_k1"]) if s_ in amp]
                rows.append(
                    f"    the last-bit perturbation was amplified (RelL1 >= {AMPLIFIED_REL_L1:g}) in seed"
                    f"{'s' if len(amp) > 1 else ''} {', '.join(map(str, amp))} of {len(row['seeds'])}, to "
                    f"{_fmt(min(vals), '.2g')}-{_fmt(max(vals), '.2g')}"
                )
            else:
                top = max((r for r in row["rel_l1_to_k1"] if r is not None), default=None)
                rows.append(
                    f"    the last-bit perturbation stayed small in every seed (RelL1 at most {_fmt(top, '.2g')} "
                    f"< {AMPLIFIED_REL_L1:g})"
                )
    return rows


def _threshold_text(thr: float | None, lanes: list[dict[str, Any]]) -> str:
    """The threshold, or each lane's (heavy ball: 2 + 2 momentum) when they differ."""
    if thr is not None:
        return f"{thr:g}"
    pairs = sorted({(l.get("momentum"), l["threshold"]) for l in lanes}, key=lambda p: p[1])
    return "2 + 2 momentum: " + ", ".join(f"{t:g} at momentum {m:g}" for m, t in pairs)


def format_summary(results: dict[str, Any], title: str, run_dir: Path) -> str:
    """A table of lanes (lr, k, seed, wd, final loss, max lr*lambda, spikes, RelL1, regime) and the findings."""
    thr = results["summary"]["threshold"]
    mom = any("momentum" in l for l in results["lanes"])
    rows = [
        f"{title}  ->  {run_dir}",
        f"  {'lr':>9}{' momentum' if mom else ''} {'k':>3} {'seed':>4} {'wd':>8} {'final loss':>11} {'max lr*lam':>10} "
        f"{'>thr at':>7} {'spikes':>6} {'late':>5} {'RelL1 vs k=1':>12} {'params sha256':>13}  regime",
    ]
    for l in results["lanes"]:
        status = l.get("regime") or ("stable" if l.get("stable") else "unstable")
        if not l["finite"]:
            status = f"divergent@{l['first_nonfinite_step']:d}"
        rows.append(
            f"  {l['learning_rate']:>9.4g}{format(l['momentum'], '>9.3g') if mom else ''} {l['k']:>3} {l['seed']:>4} "
            f"{l['weight_decay']:>8.2g} "
            f"{_fmt(l['final_loss']):>11} {_fmt(l.get('max_normalized_sharpness')):>10} "
            f"{_fmt(l.get('first_step_above_threshold'), 'd') if l.get('first_step_above_threshold') is not None else '-':>7} "
            f"{l['num_loss_increases_1pct']:>6} {l['num_loss_increases_1pct_late']:>5} "
            f"{('n/a' if l.get('rel_l1_to_k1_missing') else _fmt(l.get('rel_l1_to_k1'), '.3g')):>12} "
            f"{l['params_digest'][:12]:>13}  {status}"
        )
    closs = next((l.get("constant_loss") for l in results["lanes"]), None)
    rows.append(
        f"  threshold lr*lambda_max = {_threshold_text(thr, results['lanes'])}; spikes = loss rises > 1% (late: after the first 10% of steps)"
        + (f"; constant predictor's loss {closs:.4f}" if closs is not None else "")
    )
    rows.append(f"  {CRITERION}; {REGIME_CRITERION}")
    for l in results["lanes"]:
        if l.get("rel_l1_to_k1_missing"):
            rows.append(f"  lane {l['lane']} (k={l['k']}): no RelL1 to k=1: {l['rel_l1_to_k1_missing']}")
    if any("rel_l1_to_k1" in l for l in results["lanes"]):
        rows.append(
            "  RelL1 vs k=1: the paper's relative L1 distance of the final parameters to the k=1 lane of the same "
            "lr, seed and weight decay (0 = bitwise equal)"
        )
    if results.get("findings"):
        rows.append("Findings:")
        rows.extend(format_run_findings(results["findings"], results["lanes"]))
    return "\n".join(rows)
