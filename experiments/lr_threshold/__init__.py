"""The learning-rate threshold of Section 4.2 (Figure 3 right, Figure 10): below some learning rate the
last-bit perturbation of (PERTURBED SGD) is attenuated, above it amplified.

Fixed learning rates ``lr0 / n`` for a list of ``n``; the run of ``n`` trains ``iterations * n`` steps
(the learning rate times the number of iterations is the same for every run, as in the paper), k = 1
and k = 3 as two lanes of one program (the same batches). The RelL1 of the k = 3 weights to the
k = 1 weights is recorded at every step (by the engine, inside the program) and plotted against the
scaled iteration ``step / n``; the test accuracy of both lanes at the end of each run is Figure 10's
check that a stable rate is not stuck.

Rule (printed with the result): a run *amplifies* the perturbation when the largest RelL1 over the
last tenth of its steps exceeds :data:`eos_jax.stability.AMPLIFIED_FACTOR` times the first nonzero RelL1 (the size of
the perturbation when it first reached the weights), else it *attenuates* it (a RelL1 that stays 0:
the two lanes never differed). The reported threshold is the largest learning rate that attenuates,
and whether every smaller rate attenuates too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from eos_jax import cli, runtime
from eos_jax import data as edata
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.errors import ConfigError, EosJaxError
from eos_jax.stability import AMPLIFIED_FACTOR, AMPLIFIED_REL_L1
from eos_jax.stability import perturbation_verdict as classify
from experiments.eos import presets as eos_presets
from experiments.eos import runner as eos_runner
from experiments.eos.config import default_config
from experiments.eos.config import load_data as eos_load_data
from experiments.eos.rundir import checked_out
from experiments.sensitivity.run import (
    DATASETS,
    MODELS,
    OPTIMIZERS,
    SensitivityConfig,
    build_problem,
    load_data,
)

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
# The paper's own network (Section 6.2, Figure 7's 3-layer single-channel Swish CNN, N(0, 1) kernels, full-batch
# GD on the Fashion-MNIST 0/1 data the main job uses): rates lr0 / n = 10 ... 0.25 spanning its edge (2/lambda_max
# at initialization, printed beside), seeds 0-4, every rate for the same `iterations` steps (lr x steps constant
# would give the smallest rate 40x the steps), all rates, seeds and k = 1, 3 as lanes of one engine run.
CNN_PRESET = dict(layers=3, lr0=10.0, ns=(1, 2, 5, 10, 20, 40), iterations=200, seeds=(0, 1, 2, 3, 4))


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
    p.add_argument(
        "--preset",
        choices=sorted([*PRESETS, "cnn"]),
        default=None,
        help="cpu (default): the sensitivity experiment's VGG; paper: ResNet-56 on CIFAR-10; cnn: the paper's "
        "3-layer CNN of Figure 7 (N(0, 1) kernels, full-batch GD, seeds 0-4, the same steps at every rate)",
    )
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
    p.add_argument(
        "--seed", type=cli.nonnegative_int, nargs="+", default=None, help="batch order (default 0; cnn: seeds 0-4)"
    )
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
    if args.seed is not None and len(args.seed) != 1:
        raise ConfigError(f"--seed {' '.join(map(str, args.seed))}: this preset runs one seed; give one value")
    seed = args.seed[0] if args.seed is not None else 0
    cfg = SensitivityConfig(
        **base, lr=lr0, schedule="constant", ks=(1, 3), seeds=(seed,), init_seed=args.init_seed, epochs=1
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


def cnn_settings(args: argparse.Namespace) -> tuple[Any, list[float]]:
    """The ``cnn`` preset's :class:`~experiments.eos.config.EosConfig` (one sweep) and its rates ``lr0 / n``."""
    for name in ("model", "dataset", "num_train", "num_test", "optimizer", "batch_size", "weight_decay"):
        if getattr(args, name) is not None:
            raise ConfigError(
                f"--{name.replace('_', '-')} does not apply to --preset cnn (the paper's CNN, full-batch GD)"
            )
    lr0 = args.lr0 if args.lr0 is not None else CNN_PRESET["lr0"]
    ns = tuple(args.n) if args.n is not None else CNN_PRESET["ns"]
    if len(set(ns)) != len(ns):
        raise ConfigError(f"--n {' '.join(map(str, ns))}: the values must be distinct")
    lrs = sorted(lr0 / n for n in ns)
    cfg = default_config(
        "cnn",
        layers=CNN_PRESET["layers"],
        lr=tuple(lrs),
        k=(1, 3),
        seed=tuple(args.seed) if args.seed is not None else CNN_PRESET["seeds"],
        steps=args.iterations if args.iterations is not None else CNN_PRESET["iterations"],
        sharpness_every=None,
        checkpoint_every=None,
    )
    cfg.validate()
    return cfg, lrs


def run_cnn(
    cfg: Any,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    data_dir: str | None = None,
    runtime_metadata: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The ``cnn`` preset: one engine sweep (rates x seeds x k = 1, 3), each k = 3 lane's verdict by the rule.

    Writes ``out/sweep/`` (the ``experiments.eos`` run directory), ``lr_threshold.json`` (per rate: each
    seed's RelL1 series verdict, end value and growth; the counts; 2/lambda_max at initialization per
    seed and their median) and ``lr_threshold.png``.
    """
    config = {"cnn": cfg.to_dict()}
    digest = hashlib.sha256(json.dumps(eio.to_jsonable(config), sort_keys=True).encode()).hexdigest()[:8]
    root = checked_out(out, "runs/lr_threshold", config, digest, resume)
    root = eio.open_run_dir(root, config, resume=resume)
    data, data_info = eos_load_data(cfg, data_dir, stream=io.StringIO())  # the sweep's run prints the warnings
    init = eos_presets.initial_sharpness(cfg, data, seeds=cfg.seed)
    sub = root / "sweep"
    _, res = eos_runner.run(
        cfg,
        out=sub,
        resume=resume and (sub / "config.json").exists(),
        quiet=True,
        data_dir=data_dir,
        runtime_metadata=runtime_metadata,
    )
    lines = tr.read_metrics(sub / "metrics.jsonl")
    runs = [_cnn_rate(lr, cfg.steps, _cnn_seed_verdicts(lr, res, lines)) for lr in sorted(set(cfg.lr))]
    thr = threshold(runs)
    macro = [r["lr"] for r in runs if 2 * r["macroscopic_seeds"] >= r["num_seeds"]]
    summary = {
        "config": config,
        "dataset": data_info,
        "runs": runs,
        "threshold": thr,
        "rate_rule": "a rate amplifies when the rule amplifies in at least half of its seeds",
        "macroscopic": {
            "rule": f"RelL1(k=1, k=3) at the end >= {AMPLIFIED_REL_L1:g} in at least half of a rate's seeds",
            "smallest_lr": min(macro) if macro else None,
            "rates": macro,
        },
        "initial_sharpness": init,
    }
    eio.atomic_write_json(root / "lr_threshold.json", summary)
    _plot_cnn(runs, root / "lr_threshold.png", f"cnn {cfg.layers} layers on {data_info['name']}: first seed solid")
    if not quiet:
        print(format_cnn_summary(summary, root), flush=True)
    return root, summary


def _cnn_seed_verdicts(lr: float, res: dict[str, Any], lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The k = 3 lanes of rate ``lr`` in seed order: each one's RelL1 series to its k = 1 twin (from the
    metrics ``lines``), its end value, whether that is macroscopic, and the rule's verdict."""
    per_seed = []
    for l in sorted((l for l in res["lanes"] if l["learning_rate"] == lr and l["k"] == 3), key=lambda l: l["seed"]):
        if l.get("rel_l1_to_k1_missing"):  # its twin ran in another program (--max-lanes too small)
            raise ConfigError(f"lr {lr:g} seed {l['seed']}: {l['rel_l1_to_k1_missing']}")
        ls = sorted((r for r in lines if r["lane"] == l["lane"]), key=lambda r: r["step"])
        rel = np.array([r["rel_l1_to_k1"] for r in ls])
        end = l["rel_l1_to_k1"]
        per_seed.append(
            {
                "seed": l["seed"],
                "rel_l1_end": end,
                "macroscopic": end >= AMPLIFIED_REL_L1,
                "rel_l1": rel.tolist(),
                **classify(rel),
            }
        )
    return per_seed


def _cnn_rate(lr: float, steps: int, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One rate's entry of ``lr_threshold.json``: its seeds, the counts of amplified and macroscopic
    seeds, and the rate's verdict (the majority of its seeds; ties: amplified)."""
    amp = sum(1 for r in per_seed if r["verdict"] == "amplified")
    macro = sum(1 for r in per_seed if r["macroscopic"])
    return {
        "lr": lr,
        "steps": steps,
        "seeds": per_seed,
        "amplified_seeds": amp,
        "macroscopic_seeds": macro,
        "num_seeds": len(per_seed),
        # the rate's verdict: the majority of its seeds (ties: amplified)
        "verdict": "amplified" if 2 * amp >= len(per_seed) else "attenuated",
    }


def _plot_cnn(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """RelL1(k=1, k=3) per step of every rate: the first seed solid, the other seeds faint in its colour."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for r in runs:
        (line,) = ax.plot(
            r["seeds"][0]["rel_l1"], lw=1, label=f"lr {r['lr']:g} ({r['amplified_seeds']}/{r['num_seeds']} amplified)"
        )
        for s_ in r["seeds"][1:]:
            ax.plot(s_["rel_l1"], lw=0.6, alpha=0.3, color=line.get_color())
    ax.set_yscale("symlog", linthresh=1e-8)
    ax.set(xlabel="step", ylabel="RelL1(k=1, k=3)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    eio.save_figure(fig, path, dpi=110, bbox_inches=None)


def format_cnn_summary(summary: dict[str, Any], root: Path) -> str:
    """Per rate: the verdict of each seed and its end RelL1; where amplification starts, beside 2/lambda_max."""
    rows = [f"learning-rate threshold of the paper's CNN  ->  {root}"]
    for r in summary["runs"]:
        per = ", ".join(f"seed {s['seed']} {s['rel_l1_end']:.2g} ({s['verdict'][:3]})" for s in r["seeds"])
        rows.append(
            f"  lr {r['lr']:<6g} {r['steps']} steps: amplified in {r['amplified_seeds']}/{r['num_seeds']} seeds, "
            f"RelL1 >= {AMPLIFIED_REL_L1:g} in {r['macroscopic_seeds']}/{r['num_seeds']}; RelL1 at the end: {per}"
        )
    t = summary["threshold"]
    init = summary["initial_sharpness"]
    ths = [p["lr_threshold"] for p in init["per_seed"] if p["lr_threshold"]]
    amp = t["smallest_amplifying_lr"]
    rows.append(
        f"  amplification starts at lr {'(none of these)' if amp is None else format(amp, 'g')} (largest attenuating "
        f"{'none' if t['largest_attenuating_lr'] is None else format(t['largest_attenuating_lr'], 'g')}"
        f"{'' if t['monotone'] else '; not monotone: a smaller rate amplifies'}); 2/lambda_max at initialization: "
        f"median {init['lr_threshold']:.3g} over the seeds ({min(ths):.3g}-{max(ths):.3g})"
    )
    m = summary["macroscopic"]
    rows.append(
        f"  macroscopic amplification (RelL1 >= {AMPLIFIED_REL_L1:g} in at least half of the seeds) from lr "
        f"{'(none of these)' if m['smallest_lr'] is None else format(m['smallest_lr'], 'g')}"
    )
    rows.append(f"  rule: {t['rule']}; {summary['rate_rule']}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        edata.check_data_dir(args.data_dir)  # before anything is written
        if args.preset == "cnn":
            cfg, _ = cnn_settings(args)
            job = lambda meta: run_cnn(cfg, out=args.out, resume=args.resume, quiet=args.quiet,  # noqa: E731
                                       data_dir=args.data_dir, runtime_metadata=meta)  # fmt: skip
        else:
            scfg, lr0, ns, iterations = settings(args)
            job = lambda meta: run(scfg, lr0, ns, iterations, out=args.out, resume=args.resume,  # noqa: E731
                                   quiet=args.quiet, data_dir=args.data_dir, runtime_metadata=meta)  # fmt: skip
    except ConfigError as e:
        parser.error(cli.as_flags(str(e), ["data_dir"]))
    meta = runtime.configure()
    try:
        job(meta)
    except EosJaxError as e:
        raise cli.name_flags(e, {"data_dir": "--data-dir", "resume": "--resume"}) from None
    except tr.TrainingInterrupted as e:
        print(f"{parser.prog}: {cli.as_flags(str(e), {'resume': '--resume'})}", file=sys.stderr)
        return 128 + int(e.signum)
    return 0
