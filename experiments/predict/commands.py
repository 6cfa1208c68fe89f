"""The command line of ``python -m experiments.predict``: ``pde``, ``cnn``, ``cfl`` and ``agreement``.

Flags are parsed and validated (one line on stderr, exit code 2, nothing written) before the
runtime is configured (:func:`eos_jax.runtime.configure`, handed in by
:mod:`experiments.predict.__main__`) and anything runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from eos_jax import cli
from eos_jax import io as eio
from eos_jax.errors import ConfigError
from eos_jax.pde.nonlinear import NonlinearConfig
from experiments.predict import agreement, cfl, cnn, pde


def _add_pde(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pde",
        help="non-linear one-layer PDE (9): Table 3's bounds per dt against the simulation",
        description="Predicts stable / restrained / divergent per dt from Table 3's bounds (closed forms), then "
        "measures it with the simulation of `python -m experiments.pde nonlinear`.",
    )
    p.add_argument("--dt", type=cli.positive_float, nargs="+", required=True, help="step sizes")
    p.add_argument("--steps", type=cli.positive_int, default=2000, help="simulated gradient-descent steps")
    p.add_argument("--pool", choices=("mean", "sum"), default="mean", help="global pooling of the one-layer cnn")
    p.add_argument("--alpha", type=cli.nonnegative_float, default=20.0, help="weight decay alpha (in the loss)")
    p.add_argument("--size", type=cli.positive_int, default=256, help="checkerboard side n")
    p.add_argument("--kernel", type=cli.positive_int, default=32, help="kernel side w")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of K ~ N(0, 1)")
    p.add_argument("--out", required=True, help="run directory (new or empty)")
    p.set_defaults(handler=_run_pde)


def _pde_config(args: argparse.Namespace) -> NonlinearConfig:
    config = NonlinearConfig(
        dts=tuple(args.dt),
        steps=args.steps,
        pool=args.pool,
        alpha=args.alpha,
        size=args.size,
        kernel=args.kernel,
        seed=args.seed,
    )
    config.validate()
    return config


def _add_cfl(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cfl",
        help="cfl_scale against plain GD and a global c / lambda_max rule (3-layer CNN, fc-tanh)",
        description="Trains plain GD, GD + cfl_scale (per layer) and GD + the global cap at the same nominal rate, "
        "with k = 1 and k = 3; reports RelL1(k=1, k=3) at the end, the final loss and the wall time.",
    )
    p.add_argument("--cnn-lr", type=cli.positive_float, default=5.0, help="learning rate of the 3-layer CNN")
    p.add_argument("--cnn-steps", type=cli.nonnegative_int, default=200, help="steps of the CNN (0: leave out)")
    p.add_argument("--fc-steps", type=cli.nonnegative_int, default=600, help="steps of the fc-tanh net (0: leave out)")
    p.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", default=[0, 1], help="initialization seeds")
    p.add_argument("--fraction", type=cli.positive_float, default=0.5, help="cap: this fraction of the stable step")
    p.add_argument("--iters-per-step", type=cli.positive_int, default=1, help="power-iteration steps per update")
    p.add_argument("--num-examples", type=cli.positive_int, default=1000, help="training examples")
    p.add_argument("--data-dir", default=None, help="searched first for dataset files")
    p.add_argument("--out", required=True, help="run directory (new or empty)")


def _cfl_config(args: argparse.Namespace) -> cfl.CflConfig:
    if args.fraction > 1:
        raise ConfigError(f"fraction={args.fraction!r}; expected 0 < fraction <= 1")
    if not (args.cnn_steps or args.fc_steps):
        raise ConfigError("--cnn-steps and --fc-steps are both 0; nothing to run")
    return cfl.CflConfig(
        cnn_lr=args.cnn_lr,
        cnn_steps=args.cnn_steps,
        fc_steps=args.fc_steps,
        seeds=tuple(args.seeds),
        fraction=args.fraction,
        iters_per_step=args.iters_per_step,
        num_examples=args.num_examples,
    )


def _run_cfl(args: argparse.Namespace, config: Any) -> int:
    print(cfl.summarize_cfl(cfl.run_cfl(config, args.out, data_dir=args.data_dir)), flush=True)
    return 0


def _add_agreement(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "agreement",
        help="several `predict cnn` runs on disjoint seeds: measurement against measurement, and the best "
        "per-configuration prediction",
        description="Reads two or more `predict cnn` runs of one grid on disjoint seeds and reports how often "
        "their measured majorities agree with each other, how often the predictor agrees with each, and the "
        "most that a prediction of one regime per (depth, lr, weight decay) can agree (experiments.predict."
        "agreement). Trains nothing.",
    )
    p.add_argument("runs", nargs="+", help="run directories of `python -m experiments.predict cnn`")
    p.add_argument("--out", required=True, help="run directory (new or empty) for agreement.json")


def _agreement_config(args: argparse.Namespace) -> list[dict[str, Any]]:
    return agreement.load_runs(args.runs)


def _run_agreement(args: argparse.Namespace, config: Any) -> int:
    report = agreement.agreement(config)
    path = eio.open_run_dir(args.out, {"command": "predict-agreement", "runs": [r["path"] for r in config]})
    eio.atomic_write_json(path / "agreement.json", report)
    print(agreement.summarize_agreement(report), flush=True)
    return 0


def _run_pde(args: argparse.Namespace, config: Any) -> int:
    print(pde.summarize_pde(pde.run_pde(config, args.out)), flush=True)
    return 0


def _run_cnn(args: argparse.Namespace, config: Any) -> int:
    print(cnn.summarize_cnn(cnn.run_cnn(config, args.out, data_dir=args.data_dir)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser with both subcommands."""
    parser = cli.ArgumentParser(
        prog="python -m experiments.predict",
        description="Predict the regime (stable / restrained / collapsed / divergent) before training, then measure it.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    cnn.add_arguments(subparsers)
    _add_pde(subparsers)
    _add_cfl(subparsers)
    _add_agreement(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, *, configure: Callable[[], Any] | None = None) -> int:
    """Parses ``argv``, validates the config (exit 2 on a bad flag), configures the runtime and runs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _CONFIGS[args.command](args)
    except ConfigError as e:
        parser.error(str(e))
    if configure is not None:
        configure()
    return _HANDLERS[args.command](args, config)


_CONFIGS = {"pde": _pde_config, "cnn": cnn.config_from_args, "cfl": _cfl_config, "agreement": _agreement_config}
_HANDLERS = {"pde": _run_pde, "cnn": _run_cnn, "cfl": _run_cfl, "agreement": _run_agreement}
