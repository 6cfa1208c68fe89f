"""``python -m experiments.sensitivity``: Table 1 (and Tables 4-8, Figure 3 left) as one command.

Presets give the paper's settings (``paper-*``: a GPU with CIFAR-10 in the data directory) or a
reduced one for a 2-core CPU (``cpu``); any flag given with a preset overrides that field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from eos_jax import cli, distributed, runtime
from eos_jax import train as tr
from eos_jax.errors import ConfigError, EosJaxError
from experiments.sensitivity.run import DATASETS, MODELS, OPTIMIZERS, SCHEDULES, SensitivityConfig, run

_PAPER = dict(
    model="resnet56_authors", activation="relu", beta=5.0, dataset="cifar10", optimizer="nesterov", lr=0.1,
    schedule="step", decay_epochs=40, epochs=200, batch_size=128, weight_decay=5e-4, dtype="float32", augment=True,
    ks=(1, 3, 5, 7, 9, 11), seeds=(0, 1, 2, 3, 4, 5), init_seed=7,
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # Table 1: ResNet-56 (ReLU), CIFAR-10, main6.py's settings.
    "paper-resnet56": dict(_PAPER),
    # Table 6 (left): the same with Swish (the authors' beta 5, resnet_swish.py).
    "paper-swish": dict(_PAPER, activation="swish"),
    # Table 6 (right): VGG16-BN with Swish (beta 1), CIFAR-10 (--dataset fashion_mnist for the other row).
    "paper-vgg16bn": dict(_PAPER, model="vgg16_bn", activation="swish", beta=1.0),
    # Table 7: ResNet-56 with Swish and Adam (lr 1e-3, Adam's default; the paper does not give it).
    "paper-adam": dict(_PAPER, activation="swish", optimizer="adam", lr=1e-3),
    # Table 8: ResNet-56 (ReLU), float64.
    "paper-float64": dict(_PAPER, dtype="float64"),
    # A 2-core CPU in under 15 minutes: a narrow three-stage VGG with batch norm on 4,000
    # Fashion-MNIST images, 6 k x 3 batch-order seeds, constant lr, no augmentation.
    "cpu": dict(
        model="vgg_small_bn",
        activation="relu",
        dataset="fashion_mnist",
        num_train=4000,
        num_test=2000,
        optimizer="nesterov",
        lr=0.1,
        schedule="constant",
        epochs=4,
        batch_size=128,
        weight_decay=5e-4,
        dtype="float32",
        augment=False,
        ks=(1, 3, 5, 7, 9, 11),
        seeds=(0, 1, 2),
        init_seed=7,
        lane_batch=1,
    ),  # fmt: skip
}
LIBRARY_ARGUMENTS = {
    "data_dir": "--data-dir",
    "resume": "--resume",
    "max_lanes": "--max-lanes",
    "lane_batch": "--lane-batch",
    **cli.DISTRIBUTED_FLAGS,
}


def _k(text: str) -> int:
    """An integer k >= 1 (the perturbation factor)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected an integer k >= 1") from None
    if v < 1 or str(v) != text.strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected an integer k >= 1")
    return v


def _bool(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected on or off")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m experiments.sensitivity",
        description="Floating-point sensitivity of SGD (Section 4): final test accuracy over k and batch-order "
        "seeds (Table 1), RelL1 to k=1 (Figure 3, left), determinism (Tables 4-5), footnote 5.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="the paper's settings, or 'cpu' (reduced)")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--activation", choices=("relu", "swish"))
    p.add_argument("--beta", type=cli.positive_float, help="Swish beta")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--num-train", type=cli.positive_int, help="first n training images (default all)")
    p.add_argument("--num-test", type=cli.positive_int, help="first n test images (default all)")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--lr", type=cli.positive_float)
    p.add_argument("--schedule", choices=SCHEDULES, help="step: lr / 10 every --decay-epochs (main6.py)")
    p.add_argument("--decay-epochs", type=cli.positive_int)
    p.add_argument("--epochs", type=cli.positive_int)
    p.add_argument("--batch-size", type=cli.positive_int)
    p.add_argument("--weight-decay", type=cli.nonnegative_float)
    p.add_argument("--dtype", choices=("float32", "float64"))
    p.add_argument("--augment", type=_bool, metavar="{on,off}", help="random crop (padding 4) and flip")
    p.add_argument("--k", type=_k, nargs="+", help="perturbation factors (default 1 3 5 7 9 11); 1 is required")
    p.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", help="batch-order seeds")
    p.add_argument("--init-seed", type=cli.nonnegative_int, help="the initialization, fixed across the table")
    p.add_argument(
        "--max-lanes",
        type=cli.positive_int,
        help="lanes per vmapped program (default: as many as fit in memory, whole seeds, at most 64)",
    )
    p.add_argument(
        "--lane-batch",
        type=cli.lane_batch_arg,
        help="lanes the training step runs at a time inside a program; all: every lane at once; auto (default): "
        "all at once unless on a CPU that needs over 2 GiB of temporaries per call; the cpu preset: 1. Changes the "
        "bits, not the comparison; runs started before auto existed resume with all",
    )
    p.add_argument(
        "--final-epochs",
        type=cli.positive_int,
        default=None,
        help="Table 1 averages the test accuracy of the last n epochs (default: epochs/20, at least 1, at most 10: "
        "the authors' last 10 of 200)",
    )
    p.add_argument("--data-dir", help="searched first for dataset files")
    p.add_argument("--out", help="run directory (default runs/sensitivity/<UTC time>-<hash>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    cli.add_distributed_arguments(p)
    return p


_FIELDS = {
    "model", "activation", "beta", "dataset", "num_train", "num_test", "optimizer", "lr", "schedule",
    "decay_epochs", "epochs", "batch_size", "weight_decay", "dtype", "augment", "init_seed", "max_lanes",
    "lane_batch",
}  # fmt: skip


def config_from_args(args: argparse.Namespace) -> SensitivityConfig:
    base: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    for name in _FIELDS:
        v = getattr(args, name)
        if v is not None:
            base[name] = cli.lane_batch_value(v) if name == "lane_batch" else v
    if args.k is not None:
        base["ks"] = tuple(args.k)
    if args.seeds is not None:
        base["seeds"] = tuple(args.seeds)
    cfg = SensitivityConfig(**base)
    cfg.validate()
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    # Before anything touches a device: several processes join here (and freed host memory is kept).
    try:
        dist = cli.distributed_config(args)
        if not dist.single and args.out is None:
            parser.error("--out is required with several processes: every process must name the same run directory")
        distributed.join(dist)
    except EosJaxError as e:
        raise cli.name_flags(e, LIBRARY_ARGUMENTS) from None
    meta = runtime.configure()
    try:
        distributed.check_joined(dist)
        run(
            cfg,
            out=args.out,
            resume=args.resume,
            quiet=args.quiet,
            data_dir=args.data_dir,
            runtime_metadata=meta,
            final_epochs=args.final_epochs,
        )
    except EosJaxError as e:
        raise cli.name_flags(e, LIBRARY_ARGUMENTS) from None
    except tr.TrainingInterrupted as e:
        print(f"{parser.prog}: {cli.as_flags(str(e), LIBRARY_ARGUMENTS)}", file=sys.stderr)
        return 128 + int(e.signum)
    return 0


__all__ = ["PRESETS", "build_parser", "config_from_args", "main"]
