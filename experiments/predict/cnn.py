"""``python -m experiments.predict cnn``: the regime of every (depth, lr, weight decay, seed), predicted then measured.

``python -m experiments.predict cnn --layers 1 2 --lr 1 2 5 10 20 50 100 --weight-decay 0 5e-4 --out
runs/predict_cnn`` (seeds 0-2, 300 steps; with seeds 0-4, 10 minutes on 2 CPU cores, nearly all of it
measuring).
The network is the main job's (:func:`experiments.eos.config.build_problem`: the paper's
single-channel 3x3 Swish CNN, kernels N(0, 1), mean pooling, BCE, full-batch GD, the bundled
Fashion-MNIST 0/1 subset). Per depth:

* predict: one short probe of every lane through the engine (``--probe-steps``, default 5 % of
  the steps; ``lambda_max`` at its start and end), the per-layer bounds at initialization,
  then :func:`eos_jax.predict.training_bounds` and :func:`eos_jax.predict.verdict` per lane;
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

from eos_jax import cli, hessian, predict, runtime
from eos_jax import io as eio
from eos_jax import train as tr
from eos_jax.errors import ConfigError
from eos_jax.stability import constant_loss, regime
from experiments.eos.config import AUTO_LANE_CAP, EosConfig, build_problem, default_config, load_data
from experiments.predict.common import ORDER, bound_records, confusion
from experiments.predict.plots import plot_cnn

__all__ = [
    "PredictCnnConfig",
    "add_arguments",
    "config_from_args",
    "load_measured",
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
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    probe_steps: int = 0
    probe_iters: int = 10
    num_examples: int = 2000
    measured: str | None = None

    @property
    def num_probe_steps(self) -> int:
        """Steps of the probe."""
        return self.probe_steps or max(2, self.steps // 20)

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
          >>> PredictCnnConfig(seeds=(0, 1, 2, 3, 4)).lanes_per_group, PredictCnnConfig().lanes_per_group
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
    p.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", default=[0, 1, 2], help="initialization seeds")
    p.add_argument("--steps", type=cli.positive_int, default=300, help="steps of the measured runs")
    p.add_argument("--probe-steps", type=cli.nonnegative_int, default=0, help="probe steps (0: steps // 20)")
    p.add_argument("--probe-iters", type=cli.positive_int, default=10, help="Lanczos iterations of the probe")
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
    what = "an earlier `python -m experiments.predict cnn` run"
    try:
        old = eio.read_json(run / "config.json")
        res = eio.read_json(run / "results.json")
    except (OSError, ValueError) as e:
        raise ConfigError(f"--measured {run}: no readable config.json and results.json of {what} there") from e
    command = old.get("command") if isinstance(old, dict) else None
    if command != "predict-cnn" or not isinstance(res, dict) or "cells" not in res:
        raise ConfigError(f"--measured {run}: not {what} (its config.json has command={command!r})")
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


def _block_sharpness_fn(problem: tr.Problem, iters: int):
    """``(params, data)`` -> each layer's block sharpness (:func:`eos_jax.hessian.layer_sharpness`), jitted once."""

    def blocks(params: Any, data: Any) -> tuple[dict[str, jax.Array], jax.Array]:
        found = hessian.layer_sharpness(problem.loss_fn, params, data, num_iters=iters)
        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        g0 = jax.grad(problem.loss_fn)(zero, data)  # the forcing term at K = 0 (training_bounds)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(g0)))
        return {n: r.eigenvalue for n, r in found.items()}, norm

    return jax.jit(blocks)


def _layer_records(problem: tr.Problem, cfg: EosConfig, data: dict[str, Any], seed: int, blocks) -> dict[str, Any]:
    """At the initialization of ``seed``: each layer's block sharpness (Thm 5.7) and the terms of (14) per layer."""
    params = problem.init_params(tr.lane_init_key(seed))
    found, g0 = blocks(params, problem.data)
    kernels = [np.asarray(params[f"conv{i}"]["kernel"]) for i in range(cfg.layers)]
    terms = predict.cnn_layer_terms(kernels, data["x"], data["y"], beta=cfg.beta, pool=cfg.pool)
    grams = [(predict.patch_gram(t["images"], 3, t["weights"]), t["scale"]) for t in terms]  # wd-free: once per seed
    return {"block_sharpness": {n: float(v) for n, v in found.items()}, "grams": grams, "revivable": float(g0) > 0}


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
    per_layer.append(predict.Bound("classical at init", predict.classical_lr_max(probe["lambda_0"]), None))
    return predict.training_bounds(
        lr,
        horizon_sharpness=ahead,
        weight_decay=wd,
        steps=cfg.steps,
        probe_regime=probe["regime"],
        probe_normalized=lr * probe["lambda_probe_end"],
        revivable=layer["revivable"],
        start_sharpness=probe["lambda_0"],
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
    closs: float,
    timing: dict[str, float],
) -> list[dict[str, Any]]:
    """Every lane's prediction (no full training): the probe, the per-layer terms, the bounds and the verdict.

    Adds the seconds of the probe and of the per-layer bounds to ``timing``.
    """
    lanes = cfg.lanes()
    p = config.num_probe_steps
    t0 = time.perf_counter()
    hist = tr.fit(problem, lanes, p, config=_probe_engine(cfg, config))
    timing["probe_seconds"] = timing.get("probe_seconds", 0.0) + time.perf_counter() - t0
    col = int(np.flatnonzero(hist.step == p)[0])
    regimes = _lane_regimes(hist, closs, 2.0)
    probes = [
        {"lambda_0": float(hist.sharpness[i, 0]), "lambda_probe_end": float(hist.sharpness[i, col]), "regime": r}
        for i, r in enumerate(regimes)
    ]
    paths = _paths(lanes, probes, p)
    t0 = time.perf_counter()
    blocks = _block_sharpness_fn(problem, config.probe_iters)
    layers = {s: _layer_records(problem, cfg, data, s, blocks) for s in cfg.seed}
    timing["layer_bounds_seconds"] = timing.get("layer_bounds_seconds", 0.0) + time.perf_counter() - t0
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
                if lane.learning_rate < predict.classical_lr_max(probe["lambda_0"])
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
    t_pred = t_meas = 0.0
    breakdown: dict[str, float] = {}
    measure_breakdown: dict[str, float] = {}
    for layers in config.layers:
        cfg = config.eos_config(layers)
        problem, _ = build_problem(cfg, data)
        t0 = time.perf_counter()
        with runtime.compile_seconds(breakdown):
            preds = predict_depth(problem, cfg, data, config, closs, breakdown)
        t_pred += time.perf_counter() - t0
        if reused is None:
            t0 = time.perf_counter()
            with runtime.compile_seconds(measure_breakdown):
                meas = measure_depth(problem, cfg, closs)
            t_meas += time.perf_counter() - t0
        else:
            meas = [reused["cells"][(layers, l.learning_rate, l.weight_decay, l.seed)] for l in cfg.lanes()]
        for lane, p, m in zip(cfg.lanes(), preds, meas):
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
        f"{results['seeds']}, {results['steps']} steps, probe {results['probe_steps']} steps; predict "
        f"{results['predict_seconds']:.1f} s = {100 * results['predict_fraction']:.1f} % of measure "
        f"{results['measure_seconds']:.1f} s"
        + (f" (the measurement of {results['measured_from']})" if results.get("measured_from") else "")
    )
    return "\n".join(lines)
