"""Command line of ``python -m experiments.eos``: flags -> :class:`~experiments.eos.config.EosConfig` overrides -> a run or a preset."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from eos_jax import cli, distributed, runtime
from eos_jax import train as tr
from eos_jax.errors import EosJaxError
from eos_jax.train.config import TRACKED
from experiments.eos.config import EosConfig, default_config
from experiments.eos.presets import run_preset
from experiments.eos.runner import run

# Library arguments whose names appear in library errors, with a flag of the same name here.
LIBRARY_ARGUMENTS = ("data_dir", "resume", "coordinator", "num_processes", "process_id")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m experiments.eos",
        description="Edge-of-Stability experiments (Sun et al. 2024, Section 6) with sharpness tracking.",
    )
    p.add_argument(
        "--preset",
        choices=("fig7", "fig8", "fig9", "fig7-readings"),
        default=None,
        help="run a figure of the paper (explicit flags below override its settings); fig7-readings "
        "compares the candidate readings of Figure 7's setting (pooling x inputs x loss)",
    )
    _add_model_flags(p)
    _add_sweep_flags(p)
    _add_data_flags(p)
    _add_engine_flags(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default=None, help="working dtype (default float32)")
    p.add_argument("--out", default=None, help="run directory (default runs/eos/<UTC time>-<config hash>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out, or the latest run under runs/eos/ with the same config",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary (for scripts)")
    cli.add_distributed_arguments(p)
    return p


def _add_model_flags(p: cli.ArgumentParser) -> None:
    """The model: architecture, activation, convolution, pooling, binary head, initialization."""
    p.add_argument("--model", choices=("cnn", "fc"), default=None, help="cnn (default) or fc (tanh, width 200)")
    p.add_argument(
        "--layers",
        type=cli.positive_int,
        default=None,
        help="conv layers (cnn, default 3) or hidden layers (fc, default 2)",
    )
    p.add_argument("--width", type=cli.positive_int, default=None, help="fc hidden width (default 200)")
    p.add_argument(
        "--activation", choices=("swish", "tanh", "relu"), default=None, help="default swish (cnn, beta=1) / tanh (fc)"
    )
    p.add_argument(
        "--conv-impl",
        choices=("auto", "lax", "shifted", "fft"),
        default=None,
        help="cnn convolution implementation (default auto: direct sums; fft is faster, rounds differently)",
    )
    p.add_argument(
        "--pool",
        choices=("mean", "sum"),
        default=None,
        help="cnn pooling over output positions (default mean: the authors' AvgPooling, "
        "single_layer/PySun.py; sum: the Riemann sum of Eq. (6))",
    )
    p.add_argument(
        "--binary",
        choices=("bce", "softmax"),
        default=None,
        help="two classes with --loss ce: one logit + binary cross-entropy (default, Eq. (20)) or a "
        "linear head with two outputs + softmax cross-entropy (Cohen et al.'s archs)",
    )
    p.add_argument(
        "--init",
        choices=("normal", "pytorch"),
        default=None,
        help="kernel initialization: normal, N(0, init_std^2) (cnn default: the paper's Sec. 5.3 and the authors' "
        "np.random.randn kernels), or pytorch, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fc default: Cohen et al.)",
    )
    p.add_argument(
        "--init-std",
        type=cli.positive_float,
        default=None,
        help="standard deviation of --init normal (default 1)",
    )


def _add_sweep_flags(p: cli.ArgumentParser) -> None:
    """The lane axes (learning rate, k, seed, weight decay, momentum) and the optimizer's schedule."""
    p.add_argument(
        "--lr",
        type=cli.positive_float,
        nargs="+",
        default=None,
        help="learning rate(s); several run as one vmapped sweep (default 5 for cnn, 2/150 for fc)",
    )
    p.add_argument(
        "--k",
        type=cli.positive_int,
        nargs="+",
        default=None,
        help="perturbation factor(s) of Section 4.1 (default 1 3 for cnn: plain GD beside the last-bit "
        "perturbation; 1 for fc)",
    )
    p.add_argument(
        "--seed", type=cli.nonnegative_int, nargs="+", default=None, help="seed(s) (default 0-4 for cnn, 0 for fc)"
    )
    p.add_argument(
        "--weight-decay",
        type=cli.nonnegative_float,
        nargs="+",
        default=None,
        help="L2 weight decay alpha of Eq. (7) (default 0)",
    )
    p.add_argument(
        "--momentum",
        type=cli.nonnegative_float,
        nargs="+",
        default=None,
        help="heavy-ball momentum (default 0); several values are a lane axis, like --lr",
    )
    p.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=None,
        help="minibatch SGD with this batch size (default: full-batch GD)",
    )
    p.add_argument("--steps", type=cli.positive_int, default=None, help="optimizer steps (default 200)")
    p.add_argument(
        "--loss-goal",
        type=cli.positive_float,
        default=None,
        help="stop a lane once its training loss falls below this (Cohen et al.'s gd.py); the sweep ends when "
        "every lane has stopped, or at --steps",
    )
    p.add_argument(
        "--acc-goal",
        type=cli.nonnegative_float,
        default=None,
        help="stop a lane once its training accuracy exceeds this (a fraction in [0, 1))",
    )


def _add_data_flags(p: cli.ArgumentParser) -> None:
    """The training data and the loss."""
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset name (no fallback when given); default: mnist01 -> fashion_mnist01 -> "
        "fashion_mnist01_bundled -> digits01 (cnn) or cifar10_5k -> fashion_mnist -> mnist -> "
        "fashion_mnist01_bundled -> digits01 (fc)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory searched first for dataset files (subfolders mnist/, fashion_mnist/, ... or "
        "the published MNIST/Fashion-MNIST files directly in it)",
    )
    p.add_argument(
        "--num-examples",
        type=cli.positive_int,
        default=None,
        help="use exactly the first N training examples (an error if the dataset has fewer); "
        "default: up to 2000 for cnn, 5000 for fc",
    )
    p.add_argument("--all-examples", action="store_true", help="use every training example")
    p.add_argument("--loss", choices=("ce", "mse"), default=None, help="cross-entropy (default) or squared loss")
    p.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="standardize pixels with the training set's per-channel mean and std "
        "(default: off for cnn, as pixels in [0, 1]; on for the fig8 preset)",
    )


def _add_engine_flags(p: cli.ArgumentParser) -> None:
    """Sharpness tracking, checkpoints and how the lanes are grouped and batched."""
    p.add_argument(
        "--sharpness-every",
        type=cli.nonnegative_int,
        default=None,
        help="steps between sharpness evaluations (default 20; 0 turns tracking off); with an even value every "
        "other sample is one step later (0, 21, 40, 61, ...) unless --no-sharpness-alternate",
    )
    p.add_argument(
        "--sharpness-alternate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="alternate the parity of the sharpness steps, so both phases of a period-2 orbit are sampled (default on)",
    )
    p.add_argument("--sharpness-iters", type=cli.positive_int, default=None, help="Lanczos iterations (default 20)")
    p.add_argument(
        "--sharpness-method",
        choices=("lanczos", "power"),
        default=None,
        help="eigensolver (default lanczos; power: cheaper to compile)",
    )
    p.add_argument(
        "--sharpness-stop",
        choices=("eigenvalue", "residual"),
        default=None,
        help="what the solver's tolerance of 1e-3 bounds: eigenvalue (default with lanczos: the estimated relative "
        "error of each estimate) or residual (its relative residual: stricter, more products; the rule of runs "
        "made before this flag, which resume with it; the default with --sharpness-method power)",
    )
    p.add_argument(
        "--sharpness-twin-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start each k != 1 lane's sharpness estimate from its k=1 twin's new eigenvector (default on with "
        "--lane-batch 1 and several k; --no-sharpness-twin-start: every lane from its own, as runs made before "
        "this flag, which resume with it)",
    )
    p.add_argument(
        "--track",
        type=_track_arg,
        default=None,
        metavar="NAMES",
        help="also measure, at every sharpness step, the Hessian's trace (Hutchinson) and/or eigenvalue density "
        "(stochastic Lanczos quadrature): a comma-separated list of trace, density",
    )
    p.add_argument(
        "--trace-probes", type=cli.positive_int, default=None, help="Rademacher probes of the trace (default 8)"
    )
    p.add_argument(
        "--density-probes", type=cli.positive_int, default=None, help="random starts of the density (default 1)"
    )
    p.add_argument(
        "--density-steps", type=cli.positive_int, default=None, help="Lanczos steps per density probe (default 20)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=cli.nonnegative_int,
        default=None,
        help="steps between checkpoints (default 100; 0: only at the end and on a signal)",
    )
    p.add_argument("--chunk-steps", type=cli.positive_int, default=None, help="steps per lax.scan chunk (default 50)")
    p.add_argument(
        "--max-lanes",
        type=cli.positive_int,
        default=None,
        help="lanes per vmapped program (default: as many as fit in memory, at most 16)",
    )
    p.add_argument(
        "--lane-batch",
        type=cli.lane_batch_arg,
        default=None,
        help="inside a program, train this many lanes at a time, one batch after another (default 1: the "
        "warm-started sharpness solver then stops for each lane on its own); all: every lane at once; auto: all "
        "at once unless, on a CPU, that needs over 2 GiB of temporaries per call. A lane's bits depend on it; "
        "runs started before auto existed resume with all",
    )


def _track_arg(text: str) -> tuple[str, ...]:
    """``--track``: comma-separated names from :data:`eos_jax.train.config.TRACKED`, each once."""
    names = tuple(t.strip() for t in text.split(","))
    for t in names:
        if t not in TRACKED:
            raise argparse.ArgumentTypeError(f"{t!r} is not allowed; a comma-separated list of {', '.join(TRACKED)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names one twice; a comma-separated list of {', '.join(TRACKED)}")
    return names


# EosConfig fields that a flag gives as a list (a sweep axis) and those a flag of 0 turns off.
_LIST_FIELDS = ("lr", "k", "seed", "weight_decay", "momentum")
_ZERO_IS_OFF = ("sharpness_every", "checkpoint_every")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The EosConfig fields given explicitly on the command line (absent keys keep defaults).

    Every flag named like a field of :class:`~experiments.eos.config.EosConfig` (``--lane-batch``
    for ``lane_batch``) overrides it when given; ``--model`` picks the defaults instead
    (:func:`~experiments.eos.config.default_config`). A value of None is meaningful here:
    ``--all-examples`` sets ``num_examples=None``, ``--sharpness-every 0`` and
    ``--checkpoint-every 0`` turn those schedules off.
    """
    ov: dict = {}
    for field in dataclasses.fields(EosConfig):
        value = getattr(args, field.name, None)
        if value is None or field.name == "model":
            continue
        if field.name in _LIST_FIELDS:
            value = tuple(value)
        elif field.name == "dataset":
            value = (value,)
        elif field.name == "lane_batch":
            value = cli.lane_batch_value(value)
        elif field.name in _ZERO_IS_OFF:
            value = value or None
        ov[field.name] = value
    if args.num_examples is not None:
        ov["num_examples_exact"] = True  # explicit: fewer examples is an error, not "up to"
    if args.all_examples:
        ov["num_examples"] = None
    return ov


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.all_examples and args.num_examples is not None:
        parser.error("--all-examples and --num-examples exclude each other")
    if args.preset and args.model is not None:
        parser.error(f"--model cannot be combined with --preset {args.preset} (the preset fixes the model)")
    # The only place of the EoS experiments that changes process-wide state (x64, matmul precision,
    # XLA_FLAGS): before any array exists (importing the modules above starts no backend).
    try:
        dist = cli.distributed_config(args)
        if not dist.single and args.out is None:
            parser.error("--out is required with several processes: every process must name the same run directory")
        if not dist.single and args.preset:
            parser.error(f"--preset {args.preset} runs on one process only; run its variants one by one with --out")
        distributed.join(dist)
    except EosJaxError as e:
        raise cli.name_flags(e, LIBRARY_ARGUMENTS) from None
    meta = runtime.configure()
    ov = overrides_from_args(args)
    try:
        distributed.check_joined(dist)
        if args.preset:
            run_preset(
                args.preset,
                overrides=ov,
                out=args.out,
                resume=args.resume,
                quiet=args.quiet,
                data_dir=args.data_dir,
                runtime_metadata=meta,
            )
        else:
            cfg = default_config(args.model or "cnn", **ov)
            run(cfg, out=args.out, resume=args.resume, quiet=args.quiet, data_dir=args.data_dir, runtime_metadata=meta)
    except EosJaxError as e:
        raise cli.name_flags(e, LIBRARY_ARGUMENTS) from None  # "data_dir=DIR" -> "--data-dir DIR"
    except tr.TrainingInterrupted as e:
        print(f"{parser.prog}: {cli.as_flags(str(e), LIBRARY_ARGUMENTS)}", file=sys.stderr)
        return 128 + int(e.signum)
    return 0
