"""The learning-rate threshold of Section 4.2 (Figure 3 right, Figure 10): below some learning rate the
last-bit perturbation of (PERTURBED SGD) is attenuated, above it amplified.

Fixed learning rates ``lr0 / n`` for a list of ``n``; the run of ``n`` trains ``iterations * n`` steps
(the learning rate times the number of iterations is the same for every run, as in the paper), k = 1
and k = 3 as two lanes of one program (the same batches). The RelL1 of the k = 3 weights to the
k = 1 weights is recorded at every step (by the engine, inside the program) and plotted against the
scaled iteration ``step / n``; the test accuracy of both lanes at the end of each run is Figure 10's
check that a stable rate is not stuck.

Rule (printed with the result): a run *amplifies* the perturbation when the largest RelL1 over the
last tenth of its steps exceeds :data:`AMPLIFIED_FACTOR` times the first nonzero RelL1 (the size of
the perturbation when it first reached the weights), else it *attenuates* it (a RelL1 that stays 0:
the two lanes never differed). The reported threshold is the largest learning rate that attenuates,
and whether every smaller rate attenuates too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from eos_jax import cli, runtime
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.errors import ConfigError, EosJaxError
from experiments.eos.rundir import checked_out
from experiments.sensitivity.run import (
    DATASETS,
    MODELS,
    OPTIMIZERS,
    SensitivityConfig,
    build_problem,
    load_data,
)

AMPLIFIED_FACTOR = 10.0
PRESETS: dict[str, dict[str, Any]] = {
    # Figure 3 (right): ResNet-56 (the authors'), CIFAR-10, main6.py's optimizer at fixed rates
    # 0.1 / n down to Figure 10's 3.125e-6 (= 0.1 / 32000); 100 iterations at lr0.
    "paper": dict(
        base=dict(model="resnet56_authors", dataset="cifar10", optimizer="nesterov", augment=True),
        lr0=0.1,
        ns=(1, 10, 100, 1000, 32000),
        iterations=100,
    ),  # fmt: skip
    # A 2-core CPU in a few minutes: the sensitivity cpu preset's network on 1,000 Fashion-MNIST images.
    "cpu": dict(
        base=dict(
            model="vgg_small_bn",
            dataset="fashion_mnist",
            num_train=1000,
            num_test=1000,
            optimizer="sgd",
            batch_size=32,
            augment=False,
            weight_decay=0.0,
        ),
        lr0=0.5,
        ns=(1, 16, 256),
        iterations=4,
    ),  # fmt: skip
}


def classify(rel: np.ndarray) -> dict[str, Any]:
    """Amplified or attenuated, by the rule of the module docstring, from one run's RelL1 series (per step)."""
    rel = np.asarray(rel, np.float64)
    nz = np.flatnonzero(rel > 0)
    tail = rel[int(len(rel) * 0.9) :] if len(rel) >= 10 else rel[-1:]
    end = float(np.max(tail)) if len(tail) else 0.0
    if nz.size == 0:
        return {"verdict": "attenuated", "first_nonzero": None, "first_nonzero_step": None, "end": end, "growth": 0.0}
    first = float(rel[nz[0]])
    growth = end / first
    return {
        "verdict": "amplified" if growth > AMPLIFIED_FACTOR else "attenuated",
        "first_nonzero": first,
        "first_nonzero_step": int(nz[0]),
        "end": end,
        "growth": growth,
    }


def threshold(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest learning rate that attenuates, and whether every smaller one does too."""
    att = [r["lr"] for r in runs if r["verdict"] == "attenuated"]
    amp = [r["lr"] for r in runs if r["verdict"] == "amplified"]
    largest = max(att) if att else None
    return {
        "largest_attenuating_lr": largest,
        "smallest_amplifying_lr": min(amp) if amp else None,
        "monotone": largest is None or all(lr > largest for lr in amp),
        "rule": f"amplified when max RelL1 over the last tenth of a run > {AMPLIFIED_FACTOR:g} x its first nonzero RelL1",
    }


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m experiments.lr_threshold",
        description="Figure 3 (right) / Figure 10: RelL1(k=1, k=3) at fixed learning rates lr0/n, "
        "iterations x n steps each; the largest rate that attenuates the perturbation.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--num-train", type=cli.positive_int)
    p.add_argument("--num-test", type=cli.positive_int)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--batch-size", type=cli.positive_int)
    p.add_argument("--weight-decay", type=cli.nonnegative_float)
    p.add_argument("--lr0", type=cli.positive_float)
    p.add_argument("--n", type=cli.positive_int, nargs="+", help="divisors of lr0 (runs lr0/n for iterations*n steps)")
    p.add_argument("--iterations", type=cli.positive_int, help="steps of the lr0 run")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="batch order")
    p.add_argument("--init-seed", type=cli.nonnegative_int, default=7)
    p.add_argument("--data-dir")
    p.add_argument("--out", help="output directory (default runs/lr_threshold/<UTC time>-<hash>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def settings(args: argparse.Namespace) -> tuple[SensitivityConfig, float, tuple[int, ...], int]:
    preset = PRESETS[args.preset or "cpu"]
    base = dict(preset["base"])
    for name in ("model", "dataset", "num_train", "num_test", "optimizer", "batch_size", "weight_decay"):
        v = getattr(args, name)
        if v is not None:
            base[name] = v
    lr0 = args.lr0 if args.lr0 is not None else preset["lr0"]
    ns = tuple(args.n) if args.n is not None else tuple(preset["ns"])
    iterations = args.iterations if args.iterations is not None else preset["iterations"]
    if len(set(ns)) != len(ns):
        raise ConfigError(f"--n {' '.join(map(str, ns))}: the values must be distinct")
    cfg = SensitivityConfig(
        **base, lr=lr0, schedule="constant", ks=(1, 3), seeds=(args.seed,), init_seed=args.init_seed, epochs=1
    )
    cfg.validate()
    return cfg, float(lr0), ns, int(iterations)


def run(
    cfg: SensitivityConfig,
    lr0: float,
    ns: Sequence[int],
    iterations: int,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    data_dir: str | None = None,
    runtime_metadata: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """One engine run per ``n`` (lanes k = 1, 3 at ``lr0 / n`` for ``iterations * n`` steps), then the verdicts."""
    config = {"sensitivity": cfg.to_dict(), "lr0": lr0, "n": list(ns), "iterations": iterations}
    digest = hashlib.sha256(json.dumps(eio.to_jsonable(config), sort_keys=True).encode()).hexdigest()[:8]
    root = checked_out(out, "runs/lr_threshold", config, digest, resume)
    root = eio.open_run_dir(root, config, resume=resume)
    data, data_info = load_data(cfg, data_dir)
    runs = []
    for n in ns:
        lr = lr0 / n
        c = dataclasses.replace(cfg, lr=lr)
        problem, _ = build_problem(c, data)
        steps = iterations * n
        ecfg = tr.EngineConfig(
            steps=steps,
            batch_size=c.batch_size,
            chunk_steps=min(iterations, 50),  # one chunk program for every n
            log_every=1,
            sharpness_every=None,
            checkpoint_every=max(steps // 4, 1),
            eval_every=steps,
        )
        lanes = [
            tr.Lane(lr, k=k, seed=cfg.seeds[0], weight_decay=c.weight_decay, init_seed=c.init_seed) for k in (1, 3)
        ]
        sub = eio.open_run_dir(root / f"n{n}", {**config, "run_n": n}, resume=resume and (root / f"n{n}").exists())
        if resume and (sub / "results.json").exists():
            res = eio.read_json(sub / "results.json")
        else:
            res = tr.train(problem, lanes, ecfg, sub, resume=resume and (sub / "checkpoints").exists(), quiet=quiet,
                           dtype=jnp.dtype(c.dtype))  # fmt: skip
        lines = [l for l in tr.read_metrics(sub / "metrics.jsonl") if l["k"] == 3]
        lines.sort(key=lambda l: l["step"])
        rel = np.array([l.get("rel_l1_to_k1", 0.0) for l in lines])
        acc = {l["k"]: l["final_eval"]["test_accuracy"] for l in res["lanes"]}
        runs.append({"n": n, "lr": lr, "steps": steps, "rel_l1": rel.tolist(), "test_accuracy": acc, **classify(rel)})
    thr = threshold(runs)
    summary = {"config": config, "dataset": data_info, "runs": runs, "threshold": thr}
    eio.atomic_write_json(root / "lr_threshold.json", summary)
    plot(runs, root / "lr_threshold.png", f"{cfg.model} on {cfg.dataset}, {cfg.optimizer}, lr0 {lr0:g}")
    if not quiet:
        print(format_summary(summary, root), flush=True)
    return root, summary


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for r in runs:
        x = np.arange(len(r["rel_l1"])) / r["n"]
        ax.plot(x, r["rel_l1"], label=f"lr {r['lr']:.3g} ({r['verdict']})")
    ax.set_yscale("symlog", linthresh=1e-8)
    ax.set(xlabel="iterations x lr / lr0", ylabel="RelL1(k=1, k=3)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    eio.save_figure(fig, path, dpi=110, bbox_inches=None)  # laid out already: no second render


def format_summary(summary: dict[str, Any], root: Path) -> str:
    rows = [f"learning-rate threshold  ->  {root}"]
    for r in summary["runs"]:
        rows.append(
            f"  lr {r['lr']:<10.4g} {r['steps']:>7} steps  RelL1 first nonzero {r['first_nonzero'] or 0:.3g}, "
            f"end {r['end']:.3g} (x{r['growth']:.3g}): {r['verdict']}; test accuracy k=1 "
            f"{r['test_accuracy'].get('1', r['test_accuracy'].get(1)):.2f} %, k=3 "
            f"{r['test_accuracy'].get('3', r['test_accuracy'].get(3)):.2f} %"
        )
    t = summary["threshold"]
    lr = t["largest_attenuating_lr"]
    rows.append(
        f"  largest attenuating lr: {'none of these' if lr is None else format(lr, '.4g')}"
        f"{'' if t['monotone'] else ' (not monotone: a smaller rate amplifies)'}; rule: {t['rule']}"
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg, lr0, ns, iterations = settings(args)
    except ConfigError as e:
        parser.error(str(e))
    meta = runtime.configure()
    try:
        run(cfg, lr0, ns, iterations, out=args.out, resume=args.resume, quiet=args.quiet, data_dir=args.data_dir,
            runtime_metadata=meta)  # fmt: skip
    except EosJaxError as e:
        raise cli.name_flags(e, {"data_dir": "--data-dir", "resume": "--resume"}) from None
    except tr.TrainingInterrupted as e:
        print(f"{parser.prog}: {cli.as_flags(str(e), {'resume': '--resume'})}", file=sys.stderr)
        return 128 + int(e.signum)
    return 0
