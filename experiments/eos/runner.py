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
from eos_jax.stability import CRITERION, is_stable
from experiments.eos.config import EosConfig, build_problem, load_data
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
        old = eio.read_json(run_dir / "metadata.json") if (run_dir / "metadata.json").exists() else {}
        old_name = old.get("dataset", {}).get("name")
        if old_name is not None and old_name != data_info["name"]:
            raise RunDirError(
                f"--resume: {run_dir} was trained on {old_name} but {data_info['name']} would be used now"
            )
    if primary:
        run_dir = eio.open_run_dir(run_dir, config, resume=resume)
    distributed.barrier("experiments.eos.opened")
    run_dir = Path(run_dir)
    lanes = tr.make_lanes(list(cfg.lr), list(cfg.k), list(cfg.seed), list(cfg.weight_decay))
    if resume:
        # Checkpoints of another lane grouping or device count: one line, before metadata.json is rewritten.
        tr.check_resume(problem, lanes, cfg.engine_config(), run_dir, dtype=jnp.dtype(cfg.dtype))
    meta = {
        "runtime": runtime_metadata or runtime.metadata(),
        "dataset": data_info,
        "model": model_info,
        "threshold": problem.threshold,
        "stability_criterion": CRITERION,
        "command": sys.argv,
    }
    if resume and (run_dir / "metadata.json").exists():
        prev = eio.read_json(run_dir / "metadata.json")
        meta["resumed"] = prev.get("resumed", 0) + 1
        meta["started_utc"] = prev.get("started_utc")
    else:
        meta["started_utc"] = _utc_stamp()
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
    for l in results["lanes"]:
        l["stable"] = is_stable(l)
    results["dataset"] = data_info["name"]
    if not primary:
        return run_dir, results
    eio.atomic_write_json(run_dir / "results.json", results)
    lines = tr.read_metrics(run_dir / "metrics.jsonl")
    title = (
        f"{cfg.model} {cfg.layers} layers on {data_info['name']} ({data_info['num_examples_used']} examples, "
        f"{cfg.steps} steps)"
    )
    plotting.plot_run(lines, run_dir / "eos.png", threshold=problem.threshold, title=title)
    if not quiet:
        print(format_summary(results, title, run_dir), file=stream or sys.stdout, flush=True)
    return run_dir, results


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(results: dict[str, Any], title: str, run_dir: Path) -> str:
    """A table of lanes: lr, k, seed, wd, final loss, max lr*lambda, stable."""
    thr = results["summary"]["threshold"]
    rows = [
        f"{title}  ->  {run_dir}",
        f"  {'lr':>9} {'k':>3} {'seed':>4} {'wd':>8} {'final loss':>11} {'max lr*lam':>10} {'>thr at':>7} "
        f"{'spikes':>6} {'late':>5} {'RelL1 vs k=1':>12} {'params sha256':>13}  stable",
    ]
    for l in results["lanes"]:
        status = "yes" if l.get("stable") else (f"DIVERGED@{l['first_nonfinite_step']:d}" if not l["finite"] else "no")
        rows.append(
            f"  {l['learning_rate']:>9.4g} {l['k']:>3} {l['seed']:>4} {l['weight_decay']:>8.2g} "
            f"{_fmt(l['final_loss']):>11} {_fmt(l.get('max_normalized_sharpness')):>10} "
            f"{_fmt(l.get('first_step_above_threshold'), 'd') if l.get('first_step_above_threshold') is not None else '-':>7} "
            f"{l['num_loss_increases_1pct']:>6} {l['num_loss_increases_1pct_late']:>5} "
            f"{('n/a' if l.get('rel_l1_to_k1_missing') else _fmt(l.get('rel_l1_to_k1'), '.3g')):>12} "
            f"{l['params_digest'][:12]:>13}  {status}"
        )
    rows.append(f"  threshold lr*lambda_max = {thr:g}; spikes = loss rises > 1% (late: after the first 10% of steps)")
    rows.append(f"  {CRITERION}")
    for l in results["lanes"]:
        if l.get("rel_l1_to_k1_missing"):
            rows.append(f"  lane {l['lane']} (k={l['k']}): no RelL1 to k=1: {l['rel_l1_to_k1_missing']}")
    if any("rel_l1_to_k1" in l for l in results["lanes"]):
        rows.append(
            "  RelL1 vs k=1: the paper's relative L1 distance of the final parameters to the k=1 lane of the same "
            "lr, seed and weight decay (0 = bitwise equal)"
        )
    return "\n".join(rows)
