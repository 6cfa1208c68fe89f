"""``python -m experiments.predict cfl``: the ``cfl_scale`` step against plain GD and a global ``c / lambda_max`` rule.

``python -m experiments.predict cfl --out runs/predict_cfl`` trains, at the same nominal learning
rate, three optimizers on each network, each with k = 1 and k = 3 (the last-bit perturbation)
as lanes of one vmapped :func:`eos_jax.train.fit`:

* ``gd``: plain gradient descent (:func:`eos_jax.optim.sgd`);
* ``cfl``: the same, then :func:`eos_jax.optim_cfl.cfl_scale` (each layer's step capped at
  ``fraction`` of its stable step);
* ``global``: the same cap with the whole network as one block (``lr <= c / lambda_max``,
  ``c = 2 fraction``).

Networks: the main job's 3-layer CNN at lr 5 (``--cnn-steps``) and Figure 8's 2-layer fc-tanh
at its preset rate (``--fc-steps``). Reported per network and optimizer: RelL1(k=1, k=3) at the
end, the final loss of the k = 1 lanes and the wall time.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import optax

from eos_jax import io as eio
from eos_jax import optim, runtime
from eos_jax import train as tr
from eos_jax.optim_cfl import cfl_scale
from experiments.eos.config import EosConfig, build_problem, default_config, load_data
from experiments.eos.presets import FIG8_DEFAULT_LR, FIG8_LRS

OPTIMIZERS = ("gd", "cfl", "global")


@dataclasses.dataclass(frozen=True)
class CflConfig:
    """The settings of ``python -m experiments.predict cfl``.

    Attributes:
      cnn_lr: learning rate of the 3-layer CNN.
      cnn_steps, fc_steps: steps per network (0 leaves the network out).
      seeds: initialization seeds.
      fraction: ``cfl_scale``'s fraction of the stable step.
      iters_per_step: power-iteration steps per layer and update.
      num_examples: training examples of each network.
    """

    cnn_lr: float = 5.0
    cnn_steps: int = 200
    fc_steps: int = 600
    seeds: tuple[int, ...] = (0, 1)
    fraction: float = 0.5
    iters_per_step: int = 1
    num_examples: int = 1000

    def networks(self, fc_lr: float) -> list[tuple[str, EosConfig]]:
        """The networks run: ``(name, config)`` with k = 1 and 3 over the seeds."""
        common = dict(k=(1, 3), seed=self.seeds, num_examples=self.num_examples, checkpoint_every=None)
        out = []
        if self.cnn_steps:
            out.append(("cnn3", default_config("cnn", layers=3, lr=(self.cnn_lr,), steps=self.cnn_steps, **common)))
        if self.fc_steps:
            out.append(("fc-tanh2", default_config("fc", layers=2, lr=(fc_lr,), steps=self.fc_steps, **common)))
        return out


def _problem(base: tr.Problem, kind: str, config: CflConfig) -> tr.Problem:
    """``base`` with the optimizer ``kind`` (gd, cfl or global)."""

    def make(hp: tr.HParams) -> optax.GradientTransformation:
        gd = optim.sgd(hp.learning_rate, k=hp.k)
        if kind == "gd":
            return gd
        cap = cfl_scale(
            base.loss_fn,
            None,  # each step's batch comes with the update (an argument of the step, not a constant in it)
            hp.learning_rate,
            fraction=config.fraction,
            iters_per_step=config.iters_per_step,
            per_layer=kind == "cfl",
        )
        return optax.chain(gd, cap)

    return dataclasses.replace(base, make_optimizer=make, name=f"{base.name}-{kind}")


def run_network(cfg: EosConfig, data: dict[str, Any], config: CflConfig) -> dict[str, Any]:
    """Every optimizer on one network: RelL1(k=1, k=3) at the end per seed, final loss per seed, wall time."""
    base, _ = build_problem(cfg, data)
    out = {}
    for kind in OPTIMIZERS:
        lanes = cfg.lanes()
        t0 = time.perf_counter()
        hist = tr.fit(_problem(base, kind, config), lanes, cfg.steps, config=cfg.engine_config())
        wall = time.perf_counter() - t0
        rel = [float(hist.rel_l1[i, -1]) for i, l in enumerate(lanes) if l.k != 1]
        loss = [float(hist.loss[i, -1]) for i, l in enumerate(lanes) if l.k == 1]
        out[kind] = {
            "rel_l1_end": rel,
            "final_loss": loss,
            "max_normalized_sharpness": [s.get("max_normalized_sharpness") for s in hist.lane_summaries],
            "finite": [bool(s["finite"]) for s in hist.lane_summaries],
            "wall_seconds": wall,
        }
    return out


def run_cfl(config: CflConfig, out: str | Path, *, data_dir: str | None = None) -> dict[str, Any]:
    """Runs every network and optimizer; writes ``results.json``."""
    path = eio.open_run_dir(out, {"command": "predict-cfl", **dataclasses.asdict(config)})
    eio.atomic_write_json(path / "metadata.json", {"runtime": runtime.metadata()})
    results: dict[str, Any] = {"seeds": list(config.seeds), "fraction": config.fraction, "networks": {}}
    for name, cfg in config.networks(FIG8_DEFAULT_LR):
        data, info = load_data(cfg, data_dir)
        if name.startswith("fc") and info["name"] in FIG8_LRS:
            cfg = dataclasses.replace(cfg, lr=(FIG8_LRS[info["name"]],))
        res = run_network(cfg, data, config)
        results["networks"][name] = {"lr": cfg.lr[0], "steps": cfg.steps, "dataset": info["name"], **res}
    eio.atomic_write_json(path / "results.json", results)
    return results


def summarize_cfl(results: dict[str, Any]) -> str:
    """One line per network and optimizer, from ``results``."""
    lines = []
    for name, net in results["networks"].items():
        lines.append(f"{name} (lr {net['lr']:g}, {net['steps']} steps, {net['dataset']}):")
        for kind in OPTIMIZERS:
            r = net[kind]
            rel = ", ".join(format(x, ".2g") for x in r["rel_l1_end"])
            loss = ", ".join(format(x, ".4g") for x in r["final_loss"])
            lines.append(
                f"  {kind:>6}: RelL1(k=1, k=3) at the end {rel}; final loss {loss}; {r['wall_seconds']:.1f} s"
                f"; finite {all(r['finite'])}; max lr*lambda {np.nanmax(np.array(r['max_normalized_sharpness'], float)):.3g}"
            )
    return "\n".join(lines)
