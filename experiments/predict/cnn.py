"""``python -m experiments.predict cnn``: the regime of every (depth, lr, weight decay, seed), predicted then measured.

``python -m experiments.predict cnn --layers 1 2 --lr 1 2 5 10 20 50 100 --weight-decay 0 5e-4 --out
runs/predict_cnn`` (seeds 0-4, 300 steps: 11 minutes on 2 CPU cores, 95 % of it measuring).
The network is the main job's (:func:`experiments.eos.config.build_problem`: the paper's
single-channel 3x3 Swish CNN, kernels N(0, 1), mean pooling, BCE, full-batch GD, the bundled
Fashion-MNIST 0/1 subset). Per depth:

* predict: one short probe of every lane through the engine (``--probe-steps``, default 5 % of
  the steps, on ``--probe-examples``, default the first quarter of the examples; ``lambda_max``
  at its start and end), ``lambda_max`` and the per-layer bounds at initialization on every
  example, then :func:`eos_jax.predict.training_bounds` and :func:`eos_jax.predict.verdict` per lane;
* measure: the whole sweep, one vmapped :func:`eos_jax.train.fit`, each lane judged by
  :func:`eos_jax.stability.regime` as the main job judges it; or, with ``--measured RUN``, the
  measured regimes of an earlier run of the same grid (:func:`load_measured`), so that a change
  to the prediction is checked against the same measurement in minutes.

The baseline is the classical rule alone: stable below ``2 / lambda_max`` at initialization,
"restrained" (the Edge of Stability) above.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from eos_jax import cli, predict, runtime
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.errors import ConfigError
from eos_jax.metrics import layer_groups
from eos_jax.stability import constant_loss, regime
from experiments.eos.config import AUTO_LANE_CAP, EosConfig, build_problem, default_config, load_data
from experiments.predict.common import ORDER, bound_records, confusion
from experiments.predict.plots import plot_cnn

__all__ = [
    "PredictCnnConfig",
    "add_arguments",
    "config_from_args",
    "load_measured",
    "read_run",
    "run_cnn",
    "summarize_cnn",
]


@dataclasses.dataclass(frozen=True)
class PredictCnnConfig:
    """The grid and schedule of ``python -m experiments.predict cnn``.

    Attributes:
      layers: depths of the paper's CNN.
      lr: learning rates.
      weight_decay: L2 coefficients (Eq. (7)).
      seeds: initialization seeds (a cell is one seed).
      steps: gradient-descent steps of the measured run (the prediction's horizon).
      probe_steps: steps of the probe (0: ``max(2, steps // 20)``).
      probe_iters: Lanczos iterations of the probe's sharpness (at most; tolerance 1e-3).
      probe_examples: training examples of the probe, the first of the measured run's (0: a
        quarter of them, :meth:`num_probe_examples`).
      num_examples: training examples of the bundled subset.
      measured: run directory of an earlier ``predict cnn`` run of the same grid whose measured
        regimes are taken instead of measuring (:func:`load_measured`); None: measure.

    Examples:
      >>> from experiments.predict.cnn import PredictCnnConfig
      >>> PredictCnnConfig().num_probe_steps, PredictCnnConfig(steps=20).num_probe_steps
      (15, 2)
      >>> PredictCnnConfig(lr=(1.0, 1.0)).validate()
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: lr=(1.0, 1.0) has duplicates; expected distinct values
    """

    layers: tuple[int, ...] = (1, 2)
    lr: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    weight_decay: tuple[float, ...] = (0.0, 5e-4)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 300
    probe_steps: int = 0
    probe_iters: int = 10
    probe_examples: int = 0
    num_examples: int = 2000
    measured: str | None = None

    @property
    def num_probe_steps(self) -> int:
        """Steps of the probe."""
        return self.probe_steps or max(2, self.steps // 20)

    def num_probe_examples(self, available: int) -> int:
        """Examples of the probe when the measured run trains on ``available``: a quarter of them by default.

        Examples:
          >>> from experiments.predict.cnn import PredictCnnConfig
          >>> PredictCnnConfig().num_probe_examples(2000), PredictCnnConfig(probe_examples=300).num_probe_examples(200)
          (500, 200)
        """
        return min(self.probe_examples or max(1, available // 4), available)

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        for name in ("layers", "lr", "weight_decay", "seeds"):
            v = getattr(self, name)
            if len(set(v)) != len(v):
                raise ConfigError(f"{name}={v!r} has duplicates; expected distinct values")
        if self.num_probe_steps >= self.steps:
            raise ConfigError(f"probe_steps={self.num_probe_steps}; expected fewer than steps={self.steps}")

    @property
    def lanes_per_group(self) -> int:
        """Lanes per group: the fewest groups of at most ``AUTO_LANE_CAP`` lanes, as equal as they can be.

        Every group of one width is one program; 70 lanes in groups of 14 compile each program once,
        in groups of 16 and a last of 6, twice. One lane at a time (the cnn's ``lane_batch=1``) a
        lane's bits do not depend on its group's width.

        Examples:
          >>> from experiments.predict.cnn import PredictCnnConfig
          >>> PredictCnnConfig().lanes_per_group, PredictCnnConfig(seeds=(0, 1, 2)).lanes_per_group
          (14, 14)
        """
        n = len(self.lr) * len(self.weight_decay) * len(self.seeds)
        return -(-n // -(-n // AUTO_LANE_CAP))

    def eos_config(self, layers: int) -> EosConfig:
        """The main job's configuration of one depth over the whole grid (k = 1 only)."""
        return default_config(
            "cnn",
            layers=layers,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=self.seeds,
            k=(1,),
            steps=self.steps,
            num_examples=self.num_examples,
            checkpoint_every=None,
            max_lanes=self.lanes_per_group,
        )


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Registers the ``cnn`` subcommand."""
    p = subparsers.add_parser(
        "cnn",
        help="the paper's CNN: predict each (depth, lr, weight decay, seed), then measure it with one sweep",
        description="Predicts stable / transient / restrained / collapsed / divergent per cell from the classical "
        "bound along a short probe and the per-layer bounds, then measures every cell with the training engine.",
    )
    p.add_argument("--layers", type=cli.positive_int, nargs="+", default=[1, 2], help="depths")
    p.add_argument("--lr", type=cli.positive_float, nargs="+", required=True, help="learning rates")
    p.add_argument("--weight-decay", type=cli.nonnegative_float, nargs="+", default=[0.0], help="L2 coefficients")
    p.add_argument(
        "--seeds",
        type=cli.nonnegative_int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="initialization seeds (a regime is counted over 5)",
    )
    p.add_argument("--steps", type=cli.positive_int, default=300, help="steps of the measured runs")
    p.add_argument("--probe-steps", type=cli.nonnegative_int, default=0, help="probe steps (0: steps // 20)")
    p.add_argument("--probe-iters", type=cli.positive_int, default=10, help="Lanczos iterations of the probe")
    p.add_argument(
        "--probe-examples",
        type=cli.nonnegative_int,
        default=0,
        help="training examples of the probe, the first of the run's (0: a quarter of them)",
    )
    p.add_argument("--num-examples", type=cli.positive_int, default=2000, help="training examples")
    p.add_argument(
        "--measured",
        default=None,
        metavar="RUN",
        help="take the measured regimes from this earlier run of the same grid instead of measuring",
    )
    p.add_argument("--data-dir", default=None, help="searched first for dataset files")
    p.add_argument("--out", required=True, help="run directory (new or empty)")


def config_from_args(args: argparse.Namespace) -> PredictCnnConfig:
    """The validated config of the parsed flags."""
    config = PredictCnnConfig(
        layers=tuple(args.layers),
        lr=tuple(args.lr),
        weight_decay=tuple(args.weight_decay),
        seeds=tuple(args.seeds),
        steps=args.steps,
        probe_steps=args.probe_steps,
        probe_iters=args.probe_iters,
        probe_examples=args.probe_examples,
        num_examples=args.num_examples,
        measured=args.measured,
    )
    config.validate()
    config.eos_config(config.layers[0]).validate()
    if config.measured is not None:
        load_measured(config.measured, config)  # a bad directory is one line before anything runs
    return config


# What a reused measurement must share with the run that reuses it (the probe may differ).
MEASURED_FIELDS = ("layers", "lr", "weight_decay", "seeds", "steps", "num_examples")


def read_run(run: str | Path, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``config.json`` and ``results.json`` of an earlier ``predict cnn`` run in directory ``run``.

    Raises:
      ConfigError: one line starting with ``label`` when either file is unreadable or the
        directory holds another command's run.
    """
    run = Path(run)
    what = "an earlier `python -m experiments.predict cnn` run"
    try:
        config = eio.read_json(run / "config.json")
        results = eio.read_json(run / "results.json")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{label}: no readable config.json and results.json of {what} there") from e
    command = config.get("command") if isinstance(config, dict) else None
    if command != "predict-cnn" or not isinstance(results, dict) or "cells" not in results:
        raise ConfigError(f"{label}: not {what} (its config.json has command={command!r})")
    return config, results


def load_measured(run: str | Path, config: PredictCnnConfig) -> dict[str, Any]:
    """The measured cells of an earlier ``predict cnn`` run of the same grid, to predict again without measuring.

    Measuring is nearly all of a run's time (training every cell for ``steps``); the prediction
    needs only its probe and the per-layer bounds. An earlier run's ``results.json`` holds each
    cell's measured regime, so a change to the probe or to the rules is judged against the same
    measurement. The earlier run must have the same :data:`MEASURED_FIELDS` (its ``config.json``);
    the dataset is compared once the data is loaded (:func:`run_cnn`).

    Returns:
      ``{"cells": {(layers, lr, weight_decay, seed): {"measured", "max_normalized_sharpness"}},
      "measure_seconds", "dataset", "path"}``.

    Raises:
      ConfigError: one line naming the directory and what is missing or differs.
    """
    run = Path(run)
    old, res = read_run(run, f"--measured {run}")
    for name in MEASURED_FIELDS:
        mine = getattr(config, name)
        mine = list(mine) if isinstance(mine, tuple) else mine
        if old.get(name) != mine:
            raise ConfigError(
                f"--measured {run} was measured with {name}={old.get(name)!r}; this run has {name}={mine!r} "
                f"(a measurement is reused only with the same {', '.join(MEASURED_FIELDS)})"
            )
    cells = {
        (c["layers"], c["lr"], c["weight_decay"], c["seed"]): {
            "measured": c["measured"],
            "max_normalized_sharpness": c.get("max_normalized_sharpness"),
        }
        for c in res["cells"]
    }
    grid = {
        (d, lr, wd, s) for d in config.layers for lr in config.lr for wd in config.weight_decay for s in config.seeds
    }
    if not grid <= cells.keys():
        d, lr, wd, s = min(grid - cells.keys())
        raise ConfigError(
            f"--measured {run}: results.json has no cell layers={d}, lr={lr}, weight_decay={wd}, seed={s}"
        )
    return {"cells": cells, "measure_seconds": res["measure_seconds"], "dataset": res["dataset"], "path": str(run)}


def _probe_engine(cfg: EosConfig, config: PredictCnnConfig) -> tr.EngineConfig:
    """The measured run's engine schedule cut to the probe: sharpness at its first and last step only."""
    p = config.num_probe_steps
    return dataclasses.replace(
        cfg.engine_config(),
        steps=p,
        chunk_steps=p,
        sharpness_every=p,
        sharpness_iters=config.probe_iters,
        sharpness_alternate=False,
    )


def _lane_regimes(hist: tr.History, closs: float, threshold: float) -> list[str]:
    """:func:`eos_jax.stability.regime` of every lane of ``hist``, as the main job judges its lanes."""
    return [regime({**s, "constant_loss": closs}, threshold) for s in hist.lane_summaries]


def _init_curvature_fn(problem: tr.Problem):
    """``(init key, data)`` -> the initialization, the dense Hessian there, and the gradient norm at ``K = 0``.

    One jitted program. The paper's CNN has one 3 x 3 kernel per layer (9 parameters), so its
    dense Hessian (forward over reverse: one vectorized product per parameter) costs fewer
    products than Lanczos solves for the whole Hessian and for each layer's block, compiles one
    product instead of one per solve, and gives every eigenvalue exactly (:func:`_layer_records`).
    """

    def at_init(key: jax.Array, data: Any) -> tuple[Any, jax.Array, jax.Array]:
        params = problem.init_params(key)
        flat, unravel = ravel_pytree(params)
        dense = jax.hessian(lambda v: problem.loss_fn(unravel(v), data))(flat)
        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        g0 = jax.grad(problem.loss_fn)(zero, data)  # the forcing term at K = 0 (training_bounds)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(g0)))
        return params, dense, norm

    return jax.jit(at_init)


def _layer_records(cfg: EosConfig, data: dict[str, Any], problem_data: Any, seed: int, at_init) -> dict[str, Any]:
    """At the initialization of ``seed``: ``lambda_max``, each layer's block sharpness (Thm 5.7), the terms of (14).

    ``at_init``: :func:`_init_curvature_fn` of the problem whose data is ``problem_data``. The
    eigenvalues are the dense Hessian's (symmetrized, float64) and its diagonal blocks', a block
    being a top-level module's leaves (:func:`eos_jax.metrics.layer_groups`, as
    :func:`eos_jax.hessian.layer_sharpness` groups them).
    """
    params, dense, g0 = at_init(tr.lane_init_key(seed), problem_data)
    dense = np.asarray(dense, np.float64)
    dense = (dense + dense.T) / 2
    leaves = jax.tree_util.tree_leaves(params)
    ends = np.cumsum([np.size(x) for x in leaves])
    rows = {i: np.arange(e - np.size(x), e) for i, (x, e) in enumerate(zip(leaves, ends))}
    blocks = {}
    for name, idx in layer_groups(params, 1).items():
        ix = np.concatenate([rows[i] for i in idx])
        blocks[name] = float(np.linalg.eigvalsh(dense[np.ix_(ix, ix)])[-1])
    kernels = [np.asarray(params[f"conv{i}"]["kernel"]) for i in range(cfg.layers)]
    terms = predict.cnn_layer_terms(kernels, data["x"], data["y"], beta=cfg.beta, pool=cfg.pool)
    grams = [(predict.patch_gram(t["images"], 3, t["weights"]), t["scale"]) for t in terms]  # wd-free: once per seed
    return {
        "lambda_max": float(np.linalg.eigvalsh(dense)[-1]),
        "block_sharpness": blocks,
        "grams": grams,
        "revivable": float(g0) > 0,
    }


def _probe_problem(
    problem: tr.Problem, cfg: EosConfig, data: dict[str, Any], config: PredictCnnConfig
) -> tuple[tr.Problem, float]:
    """The problem the probe trains (the first :meth:`PredictCnnConfig.num_probe_examples` examples) and its constant loss.

    The Hessian of the mean loss over a subset is an unbiased estimate of the whole set's, and
    over the probe's few steps full-batch descent on a quarter of the examples follows the same
    catapults, collapses and sharpening (``docs/predict.md`` compares the two): the probe costs a
    quarter of its steps on every example.
    """
    available = int(data["x"].shape[0])
    n = config.num_probe_examples(available)
    sub = data if n == available else {**data, "x": data["x"][:n], "y": data["y"][:n]}
    probe = problem if n == available else build_problem(cfg, sub)[0]
    return probe, constant_loss(sub["y"], "bce", int(data["num_classes"]))


def path_ahead(
    lane: tr.Lane, probe: dict[str, Any], path: tuple[list[float], list[float]], p: int, steps: int
) -> float:
    """The largest sharpness on the path still ahead of ``lane``: from its own probe's end when that was a path sample.

    A lane whose probe stayed stable and below the edge has already run the path up to
    ``lr p`` without harm, so only ``[lr p, lr steps]`` is ahead of it (``path_sharpness``).
    """
    lr = lane.learning_rate
    sampled = probe["regime"] == "stable" and lr * probe["lambda_probe_end"] < 2.0
    return predict.path_sharpness(*path, lr * steps, start=lr * p if sampled else 0.0)


def _cell_bounds(lane: tr.Lane, probe: dict[str, Any], ahead: float, layer: dict[str, Any], cfg: EosConfig) -> list:
    """The bounds of one lane: along the probed path, catapult, weight decay, the probe's outcome, per layer."""
    wd, lr = lane.weight_decay, lane.learning_rate
    per_layer = [
        predict.Bound("layer (Thm 5.7)", predict.classical_lr_max(lam + wd), None, name)
        for name, lam in layer["block_sharpness"].items()
    ]
    for i, (gram, scale) in enumerate(layer["grams"]):  # predict.paper_layer_bounds on the Gram matrices kept
        wb = predict.windowed_bound(gram, alpha=wd, beta=cfg.beta, scale=scale)
        per_layer.append(predict.Bound("transitioning (14), windowed", wb["lr_max"], None, f"layer{i}"))
    per_layer.append(predict.Bound("classical at init", predict.classical_lr_max(probe["lambda_init"]), None))
    return predict.training_bounds(
        lr,
        horizon_sharpness=ahead,
        weight_decay=wd,
        steps=cfg.steps,
        probe_regime=probe["regime"],
        probe_normalized=lr * probe["lambda_probe_end"],
        revivable=layer["revivable"],
        start_sharpness=probe["lambda_init"],
        depth=cfg.layers,
        layers=per_layer,
    )


def _paths(lanes: list[tr.Lane], probes: list[dict[str, Any]], p: int) -> dict[tuple, tuple[list, list]]:
    """Per (seed, weight decay): the gradient-flow path sampled by the probe lanes that stayed stable.

    A lane at ``lr`` whose probe loss never rose (regime "stable") and ended below the edge
    gives the sample ``(lr p, lambda(p))``; every lane gives ``(0, lambda(0))``.
    """
    out: dict[tuple, tuple[list, list]] = {}
    for lane, pr in zip(lanes, probes):
        ts, ls = out.setdefault((lane.seed, lane.weight_decay), ([0.0], [pr["lambda_0"]]))
        if pr["regime"] == "stable" and lane.learning_rate * pr["lambda_probe_end"] < 2.0:
            ts.append(lane.learning_rate * p)
            ls.append(pr["lambda_probe_end"])
    return out


def predict_depth(
    problem: tr.Problem,
    cfg: EosConfig,
    data: dict[str, Any],
    config: PredictCnnConfig,
    timing: dict[str, float],
) -> list[dict[str, Any]]:
    """Every lane's prediction (no full training): the probe, the per-layer terms, the bounds and the verdict.

    Adds the seconds of the probe and of the per-layer bounds to ``timing``.
    """
    lanes = cfg.lanes()
    p = config.num_probe_steps
    t0 = time.perf_counter()
    probe_problem, probe_closs = _probe_problem(problem, cfg, data, config)
    hist = tr.fit(probe_problem, lanes, p, config=_probe_engine(cfg, config))
    timing["probe_seconds"] = timing.get("probe_seconds", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    at_init = _init_curvature_fn(problem)
    layers = {s: _layer_records(cfg, data, problem.data, s, at_init) for s in cfg.seed}
    timing["layer_bounds_seconds"] = timing.get("layer_bounds_seconds", 0.0) + time.perf_counter() - t0
    col = int(np.flatnonzero(hist.step == p)[0])
    probes = [
        {
            "lambda_init": layers[lane.seed]["lambda_max"] + lane.weight_decay,  # the objective's, with its L2
            "lambda_0": float(hist.sharpness[i, 0]),
            "lambda_probe_end": float(hist.sharpness[i, col]),
            "regime": r,
        }
        for i, (lane, r) in enumerate(zip(lanes, _lane_regimes(hist, probe_closs, 2.0)))
    ]
    paths = _paths(lanes, probes, p)
    out = []
    for lane, probe in zip(lanes, probes):
        ahead = path_ahead(lane, probe, paths[(lane.seed, lane.weight_decay)], p, cfg.steps)
        bounds = _cell_bounds(lane, probe, ahead, layers[lane.seed], cfg)
        v = predict.verdict(lane.learning_rate, bounds)
        first = min((b for b in bounds if b.name == "layer (Thm 5.7)"), key=lambda b: b.lr_max)
        out.append(
            {
                **v,
                "probe": probe,
                "path_sharpness": ahead,
                "first_unstable_layer": first.layer,
                "baseline": "stable"
                if lane.learning_rate < predict.classical_lr_max(probe["lambda_init"])
                else "restrained",
                "bounds": bound_records(bounds),
            }
        )
    return out


def measure_depth(problem: tr.Problem, cfg: EosConfig, closs: float) -> list[dict[str, Any]]:
    """The whole sweep of one depth (one vmapped :func:`eos_jax.train.fit`), each lane's regime and sharpness."""
    hist = tr.fit(problem, cfg.lanes(), cfg.steps, config=cfg.engine_config())
    regimes = _lane_regimes(hist, closs, 2.0)
    return [
        {"measured": r, "max_normalized_sharpness": s.get("max_normalized_sharpness")}
        for r, s in zip(regimes, hist.lane_summaries)
    ]


def majority(regimes: list[str]) -> str:
    """The most frequent regime; a tie goes to the most severe of the tied (:data:`~experiments.predict.common.ORDER`).

    Examples:
      >>> from experiments.predict.cnn import majority
      >>> majority(["stable", "restrained", "restrained"]), majority(["transient", "collapsed"])
      ('restrained', 'collapsed')
    """
    counts = {r: regimes.count(r) for r in regimes}
    top = max(counts.values())
    tied = [r for r in counts if counts[r] == top]
    return max(tied, key=lambda r: ORDER.index(r) if r in ORDER else len(ORDER))


def grid_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (layers, lr, weight decay): the majority over seeds of the prediction, baseline and measurement."""
    keys = sorted({(c["layers"], c["lr"], c["weight_decay"]) for c in cells})
    out = []
    for k in keys:
        cs = [c for c in cells if (c["layers"], c["lr"], c["weight_decay"]) == k]
        out.append(
            {
                "layers": k[0],
                "lr": k[1],
                "weight_decay": k[2],
                "seeds": [c["seed"] for c in cs],
                **{f: majority([c[f] for c in cs]) for f in ("predicted", "baseline", "measured")},
            }
        )
    return out


def _agree(cells: list[dict[str, Any]], key: str = "predicted") -> float:
    return float(np.mean([c[key] == c["measured"] for c in cells])) if cells else float("nan")


def accuracy_table(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of the prediction and of the baseline, overall and per depth."""
    depths = sorted({c["layers"] for c in cells})
    return {
        "accuracy": _agree(cells),
        "baseline_accuracy": _agree(cells, "baseline"),
        "per_depth": {
            str(d): {
                "accuracy": _agree([c for c in cells if c["layers"] == d]),
                "baseline_accuracy": _agree([c for c in cells if c["layers"] == d], "baseline"),
                "cells": sum(c["layers"] == d for c in cells),
            }
            for d in depths
        },
    }


def run_cnn(config: PredictCnnConfig, out: str | Path, *, data_dir: str | None = None) -> dict[str, Any]:
    """Predicts and measures every cell of ``config``; writes ``results.json`` and ``predict.png``."""
    config.validate()
    reused = load_measured(config.measured, config) if config.measured is not None else None
    data, info = load_data(config.eos_config(config.layers[0]), data_dir)
    if reused is not None and reused["dataset"] != info["name"]:
        raise ConfigError(
            f"--measured {reused['path']} was measured on {reused['dataset']}; this run has {info['name']}"
        )
    path = eio.open_run_dir(out, {"command": "predict-cnn", **dataclasses.asdict(config)})
    eio.atomic_write_json(path / "metadata.json", {"runtime": runtime.metadata()})
    closs = constant_loss(data["y"], "bce", int(data["num_classes"]))
    cells: list[dict[str, Any]] = []
    t_meas = 0.0
    breakdown: dict[str, float] = {}
    measure_breakdown: dict[str, float] = {}
    cfgs = {layers: config.eos_config(layers) for layers in config.layers}
    problems = {layers: build_problem(cfg, data)[0] for layers, cfg in cfgs.items()}
    preds = {}
    t0 = time.perf_counter()
    with runtime.compile_seconds(breakdown):  # every prediction before any measurement
        for layers, problem in problems.items():
            preds[layers] = predict_depth(problem, cfgs[layers], data, config, breakdown)
    t_pred = time.perf_counter() - t0
    for layers, problem in problems.items():
        cfg = cfgs[layers]
        if reused is None:
            t0 = time.perf_counter()
            with runtime.compile_seconds(measure_breakdown):
                meas = measure_depth(problem, cfg, closs)
            t_meas += time.perf_counter() - t0
        else:
            meas = [reused["cells"][(layers, l.learning_rate, l.weight_decay, l.seed)] for l in cfg.lanes()]
        for lane, p, m in zip(cfg.lanes(), preds[layers], meas):
            cells.append(
                {"layers": layers, "lr": lane.learning_rate, "weight_decay": lane.weight_decay, "seed": lane.seed}
                | p
                | m
            )
    if reused is not None:
        t_meas = reused["measure_seconds"]
    grid = grid_cells(cells)
    results = {
        "cells": cells,
        **accuracy_table(cells),
        "confusion": confusion(cells),
        "baseline_confusion": confusion(cells, "baseline"),
        "grid_cells": grid,
        "grid": accuracy_table(grid),
        "predict_seconds": t_pred,
        "measure_seconds": t_meas,
        "predict_fraction": t_pred / t_meas if t_meas > 0 else None,
        "predict_breakdown": breakdown,
        "measure_breakdown": measure_breakdown if reused is None else None,
        "measured_from": None if reused is None else reused["path"],
        "seeds": list(config.seeds),
        "steps": config.steps,
        "probe_steps": config.num_probe_steps,
        "probe_examples": config.num_probe_examples(int(data["x"].shape[0])),
        "dataset": info["name"],
        "num_examples": info["num_examples_used"],
        "baseline_rule": "stable if lr < 2 / lambda_max at initialization, else restrained",
    }
    plot_cnn(results, path / "predict.png")
    eio.atomic_write_json(path / "results.json", results)
    return results


def summarize_cnn(results: dict[str, Any]) -> str:
    """Per depth: the grid of (lr x weight decay) with predicted / measured majority, then the accuracies."""
    lines = []
    for d, acc in results["per_depth"].items():
        g = results["grid"]["per_depth"][d]
        lines.append(
            f"{d} layer(s): per seed {acc['accuracy']:.3f} (baseline {acc['baseline_accuracy']:.3f}, {acc['cells']} "
            f"cells); majority over seeds {g['accuracy']:.3f} (baseline {g['baseline_accuracy']:.3f}, {g['cells']} cells)"
        )
        for c in results["grid_cells"]:
            if str(c["layers"]) == d:
                lines.append(
                    f"  lr {c['lr']:>6g} wd {c['weight_decay']:<7g} predicted {c['predicted']:>11} "
                    f"baseline {c['baseline']:>10} measured {c['measured']:>15}"
                )
    lines.append(
        f"all: per seed {results['accuracy']:.3f} (baseline {results['baseline_accuracy']:.3f}); majority "
        f"{results['grid']['accuracy']:.3f} (baseline {results['grid']['baseline_accuracy']:.3f}); seeds "
        f"{results['seeds']}, {results['steps']} steps, probe {results['probe_steps']} steps on "
        f"{results['probe_examples']} examples; predict "
        f"{results['predict_seconds']:.1f} s = {100 * results['predict_fraction']:.1f} % of measure "
        f"{results['measure_seconds']:.1f} s"
        + (f" (the measurement of {results['measured_from']})" if results.get("measured_from") else "")
    )
    return "\n".join(lines)
