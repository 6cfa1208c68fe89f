"""Accuracy of the sharpness tracking that ``python -m experiments.eos`` runs by default.

The default stops the warm-started Lanczos solver on the estimated error of the eigenvalue
(``sharpness_stop="eigenvalue"``, :func:`eos_jax.eigen.ritz_errors`) instead of its residual, and starts
each k = 3 lane's estimate from its k = 1 twin's new eigenvector (``sharpness_twin_start``). Here the
paper's 3-layer CNN runs through Edge-of-Stability dynamics (progressive sharpening past ``2 / lr``,
period-2 oscillations of ``lr * lambda_max`` around 2, and a swap of the two top eigenvalues between two
samples), and every tracked estimate is compared with the top eigenvalue of the dense Hessian at the
same parameters: each must be within the tolerance, 1e-3 relative.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from eos_jax import hessian
from eos_jax import train as tr
from eos_jax.eigen import lanczos_pairs
from eos_jax.errors import ConfigError
from experiments import eos
from experiments.eos import cli as eos_cli

TOL = 1e-3


def _tracked_run():
    """The default tracking on 64 digits images, lr 2 and 5, k 1 and 3, seeds 0 and 1: sharpness every 4 steps (alternating)."""
    cfg = eos.default_config(
        "cnn",
        layers=3,
        lr=(2.0, 5.0),
        seed=(0, 1),
        k=(1, 3),
        dataset=("digits01",),
        num_examples=64,
        steps=60,
        sharpness_every=4,
        checkpoint_every=None,
        max_lanes=8,  # one group, as sizing would choose (without compiling its probes)
    )
    data, _ = eos.load_data(cfg)
    prob, _ = eos.build_problem(cfg, data)
    # The parameters before every step's update: those the sharpness of that step is taken at.
    prob = dataclasses.replace(prob, step_metrics=lambda p, b: {"flat": ravel_pytree(p)[0]})
    return cfg, prob, tr.fit(prob, cfg.lanes(), config=cfg.engine_config())


def test_default_tracking_is_within_tol_of_the_dense_hessian_through_eos_dynamics():
    cfg, prob, hist = _tracked_run()
    ec = cfg.engine_config()
    assert ec.sharpness_stop == "eigenvalue" and ec.sharpness_tol == TOL and ec.sharpness_twin_start
    # The reference: the dense Hessian of the same loss through lax.conv (another implementation).
    ref, _ = eos.build_problem(dataclasses.replace(cfg, conv_impl="lax"), eos.load_data(cfg)[0])
    _, unravel = ravel_pytree(prob.init_params(jax.random.key(0)))
    dense = jax.jit(jax.hessian(lambda f, b: ref.loss_fn(unravel(f), b)))
    errors, normalized = [], []
    for i, lane in enumerate(hist.lanes):
        for t in np.flatnonzero(hist.measured[i]):
            h = np.asarray(dense(jnp.asarray(hist.aux["flat"][i, t]), ref.data), np.float64)
            top = float(np.linalg.eigvalsh(0.5 * (h + h.T))[-1])
            errors.append(abs(float(hist.sharpness[i, t]) - top) / abs(top))
            normalized.append(lane.learning_rate * top)
    assert len(errors) == 8 * 16  # steps 0, 5, 8, 13, ..., 56 and the last one, per lane
    assert max(normalized) > 2.5 and min(normalized) < 1.0  # through the edge and back
    assert max(errors) <= TOL, sorted(errors)[-5:]


def test_eigenvalue_stop_takes_fewer_products_for_the_same_tolerance():
    """Warm-started from a perturbed top eigenvector of ``diag(1, ..., 30)``: both rules meet 1e-3 relative
    on the eigenvalue; the eigenvalue rule stops first."""
    n = 30
    d = jnp.arange(1.0, n + 1.0)
    v0 = jnp.zeros(n).at[-1].set(1.0) + 0.05 * jnp.sin(jnp.arange(float(n)))
    out = {}
    for stop in ("residual", "eigenvalue"):
        solve = jax.jit(lambda v: lanczos_pairs(lambda x: d * x, v, jax.random.key(0), 20, TOL, 1, stop=stop))
        r = solve(v0 / jnp.linalg.norm(v0))
        assert abs(float(r.theta[0]) - n) <= TOL * n and float(r.error[0]) <= TOL * n, stop
        out[stop] = int(r.num_hvps)
    assert out["eigenvalue"] < out["residual"], out


def test_stop_options_are_checked_and_old_configs_keep_their_hash():
    with pytest.raises(ConfigError, match="needs method='lanczos'"):
        hessian.top_eigenvalue(
            lambda p, b: jnp.sum(p * p), jnp.ones(2), None, method="power", tol=TOL, stop="eigenvalue"
        )
    with pytest.raises(ConfigError, match="sharpness_stop='eigenvalue' needs sharpness_method='lanczos'"):
        tr.EngineConfig(steps=1, sharpness_method="power", sharpness_stop="eigenvalue").validate()
    with pytest.raises(ConfigError, match="sharpness_stop="):
        tr.EngineConfig(steps=1, sharpness_stop="ritz").validate()
    with pytest.raises(ConfigError, match="--sharpness-stop eigenvalue is not allowed with --sharpness-method power"):
        eos.default_config("cnn", sharpness_method="power", sharpness_stop="eigenvalue").validate()
    # The residual rule is the config of runs made before the option (same config.json, same hash);
    # power iteration, which has no Ritz gap, keeps it by default.
    old = eos.default_config("cnn", sharpness_stop="residual").to_dict()
    assert "sharpness_stop" not in old and eos.default_config("cnn").to_dict()["sharpness_stop"] == "eigenvalue"
    power = eos.default_config("cnn", sharpness_method="power")
    power.validate()
    assert power.engine_config().sharpness_stop == "residual" and "sharpness_stop" not in power.to_dict()
    parser = eos_cli.build_parser()
    ov = eos_cli.overrides_from_args(parser.parse_args(["--sharpness-stop", "residual"]))
    assert eos.default_config("cnn", **ov).to_dict() == old
    ov = eos_cli.overrides_from_args(parser.parse_args(["--sharpness-stop", "eigenvalue"]))
    assert eos.default_config("cnn", **ov).short_hash() == eos.default_config("cnn").short_hash()


def test_twin_start_options_are_checked_and_old_configs_keep_their_hash():
    with pytest.raises(ConfigError, match="sharpness_twin_start=True needs lane_batch=1"):
        tr.EngineConfig(steps=1, sharpness_twin_start=True, lane_batch=2).validate()
    with pytest.raises(ConfigError, match="sharpness_twin_start='yes' is not allowed"):
        tr.EngineConfig(steps=1, sharpness_twin_start="yes", lane_batch=1).validate()
    with pytest.raises(ConfigError, match="--sharpness-twin-start needs --lane-batch 1"):
        eos.default_config("cnn", sharpness_twin_start=True, lane_batch=None).validate()
    # On by default where it saves products (one lane at a time, k != 1 lanes, tracking), off elsewhere.
    assert eos.default_config("cnn").engine_config().sharpness_twin_start
    for off in ({"k": (1,)}, {"lane_batch": None}, {"sharpness_every": None}):
        cfg = eos.default_config("cnn", **off)
        assert not cfg.twin_start and "sharpness_twin_start" not in cfg.to_dict(), off
    # Runs made before the option: every lane from its own eigenvector; their config has no such field.
    parser = eos_cli.build_parser()
    ov = eos_cli.overrides_from_args(parser.parse_args(["--no-sharpness-twin-start"]))
    d = eos.default_config("cnn", **ov).to_dict()
    assert "sharpness_twin_start" not in d and eos.default_config("cnn").to_dict() == {
        **d,
        "sharpness_twin_start": True,
    }
