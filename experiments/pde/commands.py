"""The command line of ``python -m experiments.pde``: one subcommand per analysis.

Each subcommand parses its flags into the library's frozen config dataclass and calls the
experiment's ``run_*(config, out_dir)`` (:mod:`experiments.pde.heat`, ``.beltrami``,
``.linear``, ``.nonlinear``), then prints its summary. The process's numerical settings
(x64, matmul precision, deterministic GPU flags) are set by the entry point,
:mod:`experiments.pde.__main__` (it hands :func:`eos_jax.runtime.configure` to :func:`main`),
never here.

Several processes: every subcommand takes the coordinator flags of
:func:`eos_jax.cli.add_distributed_arguments` (``--coordinator HOST:PORT --num-processes N
--process-id I``, ``--join-timeout``, ``--heartbeat-timeout``, or ``$EOS_JAX_*``). What runs
where: ``nonlinear``'s ``dt x k`` lanes are sharded over the devices of every process by the
training engine; everything else (heat, Beltrami, the linearized PDE, theory, classification,
notes) runs whole and identically in every process; only process 0 writes the run directory
and prints the summary and progress. Without the flags: one process, as before.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from eos_jax import cli, distributed
from eos_jax.errors import EosJaxError
from eos_jax.pde.beltrami import BeltramiConfig
from eos_jax.pde.heat import HeatConfig
from eos_jax.pde.linear import LinearConfig
from eos_jax.pde.nonlinear import NonlinearConfig
from experiments.pde import beltrami, heat, linear, nonlinear

_DESCRIPTION = "PDE stability toolkit: heat, Beltrami, linearized and non-linear CNN gradient-descent PDEs."

_Handler = Callable[[argparse.Namespace], int]


def _add_command(
    subparsers: argparse._SubParsersAction, name: str, handler: _Handler, *, help: str, description: str
) -> argparse.ArgumentParser:
    """Registers subcommand ``name`` that runs ``handler(args)``; returns its parser for its own flags.

    Every subcommand's own flags are followed by ``--out`` and the coordinator flags, which
    :func:`_build_parser` adds to all of them.
    """
    p = subparsers.add_parser(name, help=help, description=description)
    p.set_defaults(handler=handler)
    return p


def _run_and_print(
    run: Callable[..., dict[str, Any]],
    summarize: Callable[[dict[str, Any]], str],
    config: Any,
    out: str,
    **kwargs: Any,
) -> int:
    """Runs one analysis, ``run(config, out, **kwargs)``, prints its summary in process 0 and returns 0."""
    results = run(config, out, **kwargs)
    _print(summarize(results))
    return 0


def _add_heat(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``heat``: forward-Euler heat equation (2) with Dirichlet ends."""
    p = _add_command(
        subparsers,
        "heat",
        _run_heat,
        help="heat equation, scheme (2): simulation, amplifier A(omega), CFL bound, per-mode growth",
        description="Forward-Euler / central-difference heat equation (2) on [0, L] with Dirichlet ends and a "
        "triangle initial condition, at each r = kappa*dt/dx^2; compares measured per-mode growth with A(omega).",
    )
    p.add_argument("--ratio", type=cli.positive_float, nargs="+", default=[0.4, 0.8], help="r = kappa*dt/dx^2 values")
    p.add_argument("--points", type=cli.positive_int, default=29, help="interior grid points K")
    p.add_argument("--length", type=cli.positive_float, default=30.0, help="domain length L")
    p.add_argument("--steps", type=cli.positive_int, default=200, help="time steps per run")
    p.add_argument(
        "--cross-factor",
        type=cli.positive_float,
        default=10.0,
        help="a mode grows when its coefficient exceeds this times the largest initial one",
    )


def _run_heat(args: argparse.Namespace) -> int:
    """Builds the heat config, runs it and prints the summary."""
    config = HeatConfig(
        ratios=tuple(args.ratio),
        points=args.points,
        length=args.length,
        steps=args.steps,
        cross_factor=args.cross_factor,
    )
    return _run_and_print(heat.run_heat, heat.summarize, config, args.out)


def _add_beltrami(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``beltrami``: gradient descent on the Beltrami loss (4)."""
    p = _add_command(
        subparsers,
        "beltrami",
        _run_beltrami,
        help="Beltrami reaction-diffusion (4): gradient descent at multiples of the CFL step bound",
        description="Gradient descent on the discretized Beltrami loss of a piecewise-constant noisy signal, at "
        "multiples of the strict CFL step bound; each run is classified stable / restrained / divergent.",
    )
    p.add_argument(
        "--multiples",
        type=cli.positive_float,
        nargs="+",
        default=[1.0, 10.0, 100.0, 1000.0],
        help="step sizes as multiples of the strict bound",
    )
    p.add_argument("--points", type=cli.positive_int, default=256, help="grid points of the signal")
    p.add_argument("--steps", type=cli.positive_int, default=50000, help="gradient-descent steps")
    p.add_argument("--record-every", type=cli.positive_int, default=50, help="history stride")
    p.add_argument("--lam", type=cli.positive_float, default=1000.0, help="data-fidelity weight lambda")
    p.add_argument("--delta", type=cli.positive_float, default=0.1, help="Beltrami regularizer delta")
    p.add_argument("--noise", type=cli.nonnegative_float, default=0.1, help="noise standard deviation")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="noise seed")


def _run_beltrami(args: argparse.Namespace) -> int:
    """Builds the Beltrami config, runs it and prints the summary."""
    config = BeltramiConfig(
        multiples=tuple(args.multiples),
        points=args.points,
        steps=args.steps,
        lam=args.lam,
        delta=args.delta,
        noise=args.noise,
        seed=args.seed,
        record_every=args.record_every,
    )
    return _run_and_print(beltrami.run_beltrami, beltrami.summarize, config, args.out)


def _add_linear(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``linear``: the linearized CNN PDE (10), schemes (11) and (16)-(17)."""
    p = _add_command(
        subparsers,
        "linear",
        _run_linear,
        help="linearized CNN PDE (10): theory bounds (14)/(18) vs empirical bounds on weight decay alpha",
        description="Linearized one-layer CNN gradient-descent PDE (10) with constant a on a +1/-1 checkerboard; "
        "forward Euler (11) or semi-implicit Nesterov (16)-(17). For each kernel size: theory bounds on alpha, "
        "empirical bounds by bisection and by the spectrum of the windowed operator, and a plot like Figure 4.",
    )
    p.add_argument("--kernel", type=cli.positive_int, nargs="+", default=[16, 32, 64], help="kernel sizes w")
    p.add_argument("--scheme", choices=("gd", "nesterov"), default="gd", help="time discretization")
    p.add_argument("--dt", type=cli.positive_float, required=True, help="step size dt")
    p.add_argument("--a", type=float, default=-0.5, help="constant a of the linearization")
    p.add_argument("--beta", type=cli.positive_float, default=1.0, help="beta of Eq. (10)")
    p.add_argument(
        "--momentum",
        type=cli.positive_float,
        default=0.9,
        help="Nesterov momentum (2 - d dt)/(2 + d dt), in (0, 1); nesterov only",
    )
    p.add_argument("--size", type=cli.positive_int, default=256, help="checkerboard side")
    p.add_argument(
        "--square",
        type=cli.positive_int,
        default=1,
        help="checkerboard square side in pixels (1: (-1)^(i+j); the paper does not say)",
    )
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of K ~ N(0, 1)")
    p.add_argument(
        "--pool",
        choices=("sum", "mean"),
        default="sum",
        help="data term (K*I)*I summed over the output positions (default, as the authors' "
        "single_layer/linear.py does) or averaged (mean pooling: M -> M/(n-w+1)^2)",
    )
    p.add_argument(
        "--ibar",
        choices=("mean", "sum"),
        default="mean",
        help="Ibar of (10): the image mean (default, as in linear.py) or its sum (the paper's Eq. (47))",
    )
    p.add_argument("--bisect-steps", type=cli.positive_int, default=400, help="iterations per bisection run")
    p.add_argument("--rel-tol", type=cli.positive_float, default=1e-4, help="bisection relative bracket width")
    p.add_argument("--plot-steps", type=cli.positive_int, default=1000, help="iterations of the Figure-4 runs")


def _run_linear(args: argparse.Namespace) -> int:
    """Builds the linear-PDE config, runs it and prints the summary."""
    config = LinearConfig(
        kernels=tuple(args.kernel),
        scheme=args.scheme,
        dt=args.dt,
        a=args.a,
        beta=args.beta,
        momentum=args.momentum,
        size=args.size,
        square=args.square,
        seed=args.seed,
        pool=args.pool,
        ibar=args.ibar,
        bisect_steps=args.bisect_steps,
        rel_tol=args.rel_tol,
        plot_steps=args.plot_steps,
    )
    return _run_and_print(linear.run_linear, linear.summarize, config, args.out)


def _add_nonlinear(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``nonlinear``: the one-layer CNN gradient-descent PDE (9), Figures 5 and 6."""
    p = _add_command(
        subparsers,
        "nonlinear",
        _run_nonlinear,
        help="non-linear one-layer CNN PDE (9): loss, RelL1(k=1,k=3), Table 3 regimes, dt*lambda_max per dt",
        description="Gradient descent on the one-layer cnn (Swish, global mean or sum, BCE, weight decay alpha in the "
        "loss) over a +1/-1 checkerboard, every dt with k=1 and k=3 as one vmapped program; classifies each dt "
        "stable / restrained / divergent and prints Table 3's bounds beside the simulation (Figures 5-6).",
    )
    p.add_argument(
        "--dt",
        type=cli.positive_float,
        nargs="+",
        default=[0.01, 0.03, 0.05, 0.07, 0.09, 0.11],
        help="step sizes (learning rates)",
    )
    p.add_argument("--steps", type=cli.positive_int, default=2000, help="gradient-descent steps")
    p.add_argument("--k", type=cli.positive_int, default=3, help="perturbation factor of the second lane (>= 2)")
    p.add_argument(
        "--pool",
        choices=("mean", "sum"),
        default="mean",
        help="global pooling over the (n-w+1)^2 output positions: mean (the authors' AvgPooling, "
        "single_layer/PySun.py) or sum",
    )
    p.add_argument("--alpha", type=cli.nonnegative_float, default=20.0, help="weight decay alpha (in the loss)")
    p.add_argument("--beta", type=cli.positive_float, default=1.0, help="Swish beta")
    p.add_argument("--label", type=int, choices=(0, 1), default=1, help="label y")
    p.add_argument("--size", type=cli.positive_int, default=256, help="checkerboard side n")
    p.add_argument("--square", type=cli.positive_int, default=1, help="checkerboard square side (1: (-1)^(i+j))")
    p.add_argument("--kernel", type=cli.positive_int, default=32, help="kernel side w")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of K ~ N(0, 1)")
    p.add_argument("--sharpness-every", type=cli.positive_int, default=10, help="steps between dt*lambda_max")
    p.add_argument("--sharpness-iters", type=cli.positive_int, default=20, help="Lanczos iterations per sharpness")
    p.add_argument(
        "--regime-tol",
        type=cli.positive_float,
        default=0.05,
        help="transitioning regime: |r'(x) - (1/2 + beta x/2)| <= tol",
    )
    p.add_argument(
        "--conv-impl", choices=("auto", "lax", "fft", "shifted"), default="auto", help="convolution of the cnn model"
    )
    p.add_argument(
        "--window", type=cli.nonnegative_int, default=0, help="records used by the classification (0: steps // 10)"
    )
    p.add_argument("--osc-level", type=cli.positive_float, default=1e-3, help="oscillation level (restrained)")
    p.add_argument("--rel-l1-level", type=cli.positive_float, default=1e-3, help="RelL1 amplification level")
    p.add_argument(
        "--growth-factor", type=cli.positive_float, default=10.0, help="divergent: loss above this x initial"
    )
    p.add_argument(
        "--rel-l1-window",
        type=cli.positive_int,
        default=100,
        help="steps of the trailing RelL1 moving average (100, as the authors plot)",
    )


def _run_nonlinear(args: argparse.Namespace) -> int:
    """Builds the non-linear PDE config, runs it and prints the summary."""
    config = NonlinearConfig(
        dts=tuple(args.dt),
        steps=args.steps,
        k=args.k,
        pool=args.pool,
        alpha=args.alpha,
        beta=args.beta,
        label=args.label,
        size=args.size,
        square=args.square,
        kernel=args.kernel,
        seed=args.seed,
        sharpness_every=args.sharpness_every,
        sharpness_iters=args.sharpness_iters,
        regime_tol=args.regime_tol,
        conv_impl=args.conv_impl,
        window=args.window,
        osc_level=args.osc_level,
        rel_l1_level=args.rel_l1_level,
        growth_factor=args.growth_factor,
        rel_l1_window=args.rel_l1_window,
    )
    config.validate()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if distributed.is_primary() else None
    return _run_and_print(nonlinear.run_nonlinear, nonlinear.summarize, config, args.out, log=log)


def _build_parser() -> cli.ArgumentParser:
    """The top-level parser with one subparser per analysis."""
    parser = cli.ArgumentParser(prog="python -m experiments.pde", description=_DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    _add_heat(subparsers)
    _add_beltrami(subparsers)
    _add_linear(subparsers)
    _add_nonlinear(subparsers)
    for sub in subparsers.choices.values():  # after each subcommand's own flags, in --help too
        sub.add_argument("--out", required=True, help="run directory (new or empty)")
        cli.add_distributed_arguments(sub)  # after the subcommand: python -m experiments.pde heat --coordinator ...
    return parser


def _print(text: str) -> None:
    """Prints a summary in process 0 only (every process computed it)."""
    if distributed.is_primary():
        print(text)


def main(argv: Sequence[str] | None = None, *, configure: Callable[[], Any] | None = None) -> int:
    """Parses ``argv``, joins the other processes (if any) and runs one subcommand (its ``run_*`` writes the run).

    Args:
      argv: the command line after ``python -m experiments.pde`` (default ``sys.argv[1:]``).
      configure: the entry point's runtime set-up (:func:`eos_jax.runtime.configure`):
        ``python -m experiments.pde`` passes it, and then, in this order, this process keeps
        freed host memory and joins the others (:func:`eos_jax.distributed.join`: before
        anything touches a device), ``configure()`` runs, and the processes compare their
        counts (:func:`eos_jax.distributed.check_joined`). In-process callers (tests, a
        notebook) set the runtime themselves and pass None: one process changes no
        process-wide setting; coordinator flags still join (:func:`eos_jax.distributed.initialize`).
        The linearized-PDE analysis refuses to run without x64.

    Raises:
      EosJaxError: bad coordinator settings (named by their flags: ``--process-id 2 ...``),
        a refused run directory, a config the library rejects; before anything is written.
    """
    args = _build_parser().parse_args(argv)
    try:
        dist = cli.distributed_config(args)
        if configure is not None:
            distributed.join(dist)
            configure()
        else:
            distributed.initialize(dist)
        distributed.check_joined(dist)
    except EosJaxError as e:
        raise cli.name_flags(e, cli.DISTRIBUTED_FLAGS) from None  # "process_id=2" -> "--process-id 2"
    return int(args.handler(args) or 0)
