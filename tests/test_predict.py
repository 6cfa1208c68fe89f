"""eos_jax.predict (bounds against dense / closed-form references, verdicts) and python -m experiments.predict
(pde, cnn, cfl, and agreement: measurement against measurement and the per-configuration bounds)."""

import dataclasses
import functools
import itertools
import json
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from eos_jax import cli, hessian, predict
from eos_jax.errors import ConfigError
from eos_jax.pde import linear
from eos_jax.pde.common import checkerboard
from eos_jax.pde.nonlinear import theory
from experiments import predict as predict_cli
from experiments.predict.agreement import agreement, load_runs, majority_distribution
from experiments.predict.cnn import majority


def _loss(p, x):
    """A small non-quadratic loss of two 'layers' (its Hessian is not block diagonal)."""
    h = jnp.tanh(x @ p["a"])
    return jnp.mean((h @ p["b"] - 1.0) ** 2)


def _setup():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k1, (16, 3), jnp.float64)
    p = {"a": jax.random.normal(k2, (3, 2), jnp.float64), "b": jax.random.normal(k3, (2,), jnp.float64)}
    return p, x


@functools.cache
def _dense_hessian_at_setup():
    """The dense Hessian of ``_loss`` at ``_setup()`` (float64), computed once per session."""
    p, x = _setup()
    flat, unravel = ravel_pytree(p)
    return np.asarray(jax.jit(jax.hessian(lambda v: _loss(unravel(v), x)))(flat))


def test_classical_and_layer_bounds_match_the_dense_hessian():
    p, x = _setup()
    h = _dense_hessian_at_setup()
    lam = float(np.linalg.eigvalsh(h)[-1])
    b = predict.classical_bound(_loss, p, x, num_iters=8)
    assert b["sharpness"] == pytest.approx(lam, rel=1e-9)
    assert b["lr_max"] == pytest.approx(2.0 / lam, rel=1e-9)
    blocks = {"['a']": h[:6, :6], "['b']": h[6:, 6:]}  # ravel_pytree: leaves in key order a (3x2), b (2)
    for bound in predict.layer_bounds(_loss, p, x, num_iters=6):
        ref = float(np.linalg.eigvalsh(blocks[bound.layer])[-1])
        assert bound.lr_max == pytest.approx(2.0 / ref, rel=1e-9)
        assert bound.lr_max >= b["lr_max"] * (1 - 1e-12)  # a diagonal block is never sharper than H


def test_patch_gram_is_the_windowed_operator_and_its_closed_form():
    img = np.asarray(jax.random.normal(jax.random.key(0), (7, 7), jnp.float64))
    op = jax.jit(linear.make_windowed_operator(img, 3))
    dense = np.stack([np.asarray(op(jnp.asarray(e.reshape(3, 3)))).ravel() for e in np.eye(9)], axis=1)
    np.testing.assert_allclose(predict.patch_gram(img, 3), dense, rtol=1e-12, atol=1e-10)
    ev = np.linalg.eigvalsh(predict.patch_gram(checkerboard(10), 4))
    lo, hi = linear.checkerboard_window_extremes(10, 4)
    assert ev[-1] == pytest.approx(hi) and abs(ev[0] - lo) < 1e-9


def test_windowed_bound_is_eq14():
    mu = np.array([3.0, 40.0, 250.0])
    for a, alpha, dt in ((-0.5, 80.0, 0.01), (-0.5, 20.0, 0.01), (0.3, 1.0, 0.05)):
        lo, hi = linear.alpha_bounds(mu.min(), mu.max(), scheme="gd", dt=dt, a=a, beta=1.0)
        wb = predict.windowed_bound(a * np.diag(mu), alpha=alpha, beta=1.0)
        assert wb["alpha_min"] == pytest.approx(lo)
        stable = lo < alpha < hi
        assert (dt < wb["lr_max"]) == stable  # the same region of (alpha, dt)


def test_trend_and_horizon_bound():  # the linear-trend extrapolation (a reference for path_sharpness)
    t = predict.sharpness_trend([0.0, 5.0, 10.0, float("nan")], [0.5, 1.0, 1.5, 9.0])
    assert t == {"lambda_0": 0.5, "slope": 0.1, "samples": 3}
    lr = predict.horizon_lr_max(0.5, 0.1, 40, threshold=2.0)
    assert lr * (0.5 + 0.1 * lr * 40) == pytest.approx(2.0)
    assert predict.horizon_lr_max(0.5, 0.0, 40) == 4.0 and predict.horizon_lr_max(-1.0, 0.0, 40) == math.inf


def test_cnn_layer_terms_forward_and_gamma_by_finite_difference():
    from eos_jax import models

    x = np.asarray(jax.random.uniform(jax.random.key(1), (3 * 9 * 9,), jnp.float64)).reshape(3, 9, 9)
    y = np.array([1, 0, 1])
    ks = [np.asarray(jax.random.normal(jax.random.key(i), (9,), jnp.float64)).reshape(3, 3) for i in (4, 5)]
    terms = predict.cnn_layer_terms(ks, x, y, beta=1.0, pool="mean")
    model = models.get("cnn", layers=2, dtype="float64", conv_impl="lax")
    params = {f"conv{i}": {"kernel": jnp.asarray(k).reshape(3, 3, 1, 1)} for i, k in enumerate(ks)}
    g, _ = jax.jit(lambda p, xx: model.apply({"params": p}, xx, train=False))(params, jnp.asarray(x)[..., None])
    a = 1.0 / (1.0 + np.exp(-np.asarray(g)[:, 0])) - y
    np.testing.assert_allclose(terms[1]["weights"], a / 3, rtol=1e-10)  # last layer: gamma = 1
    assert terms[1]["scale"] == 1.0 / 25 and terms[0]["images"].shape == (3, 9, 9)

    @jax.jit
    def logit_of_i2(i2):  # the second layer and the mean pooling, on a given I_2
        u = jax.lax.conv_general_dilated(i2[:, None], jnp.asarray(ks[1])[None, None], (1, 1), "VALID")[:, 0]
        return (u * jax.nn.sigmoid(u)).mean(axis=(1, 2))

    i2 = jnp.asarray(terms[1]["images"])
    eps = 1e-6
    fd = (np.asarray(logit_of_i2(i2 + eps)) - np.asarray(logit_of_i2(i2 - eps))) / (2 * eps)  # sum_x dg/dI2(x)
    gamma = fd / (7 * 7) / terms[1]["scale"]
    np.testing.assert_allclose(terms[0]["weights"], a * gamma / 3, rtol=1e-6)


def test_pde_bounds_give_the_papers_regimes_and_threshold():
    with jax.enable_x64(True):
        th = theory(checkerboard(256), 32, alpha=20.0, beta=1.0, label=1, dts=(0.01,), square=1)
    bounds = predict.pde_bounds(th, alpha=20.0)
    dts = (0.01, 0.03, 0.05, 0.07, 0.09, 0.11)
    got = [predict.verdict(dt, bounds)["predicted"] for dt in dts]
    assert got == ["stable", "stable", "restrained", "restrained", "restrained", "divergent"]
    thr = min(b.lr_max for b in bounds if b.effect)
    assert 0.032 < thr < 0.033
    assert predict.verdict(0.05, bounds)["deciding"] == "classical at the loss minimum"


def test_verdict_severity_deciding_bound_and_confidence():
    bs = [
        predict.Bound("init", 10.0, "transient"),
        predict.Bound("horizon", 4.0, "restrained", "conv0"),
        predict.Bound("info", 0.0, None),
    ]
    v = predict.verdict(5.0, bs)
    assert (v["predicted"], v["deciding"], v["deciding_layer"]) == ("restrained", "horizon", "conv0")
    assert v["violated"] == ["horizon conv0"] and v["disagree"] == []
    assert predict.verdict(1.0, bs)["disagree"] == ["info"]
    assert predict.verdict(20.0, bs)["confidence"] == 1.0 and predict.verdict(4.0, bs)["confidence"] == 0.5
    with pytest.raises(Exception, match="effect"):
        predict.verdict(1.0, [predict.Bound("x", 1.0, "exploded")])


def test_training_bounds_rules():
    def pred(lr, **kw):
        kw = {"horizon_sharpness": 0.1, "weight_decay": 0.0, "steps": 300, **kw}
        return predict.verdict(lr, predict.training_bounds(lr, **kw))["predicted"]

    assert [pred(lr) for lr in (19.0, 20.0, 39.0, 40.0)] == ["stable", "restrained", "restrained", "transient"]
    assert pred(40.0, weight_decay=5e-4) == "restrained"  # 40 * 5e-4 * 300 = 6 e-folds: sent back
    assert pred(40.0, weight_decay=1e-5) == "transient"  # 0.12 e-folds: not
    dead = {"weight_decay": 5e-4, "probe_regime": "collapsed"}
    assert pred(40.0, revivable=True, **dead) == "restrained" and pred(40.0, revivable=False, **dead) == "collapsed"
    # Without weight decay a flat probe of a network whose gradient vanishes at K = 0 is a plateau it leaves.
    flat_probe = {"weight_decay": 0.0, "probe_regime": "collapsed"}
    assert pred(40.0, revivable=False, **flat_probe) == "transient"
    assert pred(40.0, revivable=True, **flat_probe) == "collapsed"
    assert pred(40.0, probe_regime="divergent") == "divergent"
    assert pred(10.0, probe_regime="stable", probe_normalized=1.9) == "restrained"  # at the edge in the probe
    assert pred(10.0, probe_regime="stable", probe_normalized=1.7) == "stable"
    # One layer without weight decay leaves the edge it reaches; with weight decay, or deeper, it stays there.
    assert pred(20.0, depth=1) == "transient" and pred(20.0, depth=2) == "restrained"
    assert pred(10.0, depth=1, probe_regime="stable", probe_normalized=1.9) == "transient"
    assert pred(20.0, depth=1, weight_decay=5e-4) == "restrained"  # weight decay: a finite minimum holds it
    # Past the edge at step 0 (40 * 0.1 = 4), then flat: pulled back once weight decay alone would
    # shrink the kernels to 1 % within the horizon (40 * wd * 300 >= ln 100 = 4.6).
    flat = {"horizon_sharpness": 0.01, "start_sharpness": 0.1}
    assert pred(40.0, weight_decay=5e-4, **flat) == "restrained"  # 6 e-folds
    assert pred(40.0, weight_decay=3e-4, **flat) == "stable"  # 3.6 e-folds: not
    assert pred(40.0, weight_decay=0.0, **flat) == "stable"
    assert pred(40.0, weight_decay=5e-4, **{**flat, "start_sharpness": 0.04}) == "stable"  # 1.6: not past the edge


def test_path_sharpness_interpolates_and_saturates():
    ts, ls = [0.0, 100.0, 200.0], [0.1, 0.5, 0.4]
    assert predict.path_sharpness(ts, ls, 50.0) == pytest.approx(0.3)  # interpolated
    assert predict.path_sharpness(ts, ls, 150.0) == pytest.approx(0.5)  # running maximum
    assert predict.path_sharpness([0.0, 10.0], [0.1, 0.2], 1e6) == pytest.approx(0.3)  # one segment past the end
    assert predict.path_sharpness([0.0], [0.1], 1e6) == 0.1
    assert predict.path_sharpness([0.0, 10.0, 20.0], [3.0, 0.2, 0.1], 40.0, start=15.0) == pytest.approx(0.15)


def _run(argv):
    with pytest.raises(SystemExit) as e:
        cli.run(predict_cli.main, argv, prog="python -m experiments.predict")
    return e.value.code


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pde", "--dt", "0", "--out", "x"], "--dt"),
        (["pde", "--dt", "0.01", "0.01", "--out", "x"], "duplicates"),
        (["pde", "--dt", "0.01", "--kernel", "9", "--size", "8", "--out", "x"], "kernel"),
        (["cnn", "--lr", "1", "1", "--out", "x"], "duplicates"),
        (["cnn", "--lr", "1", "--steps", "3", "--probe-steps", "3", "--out", "x"], "probe_steps"),
        (["cfl", "--fraction", "2", "--out", "x"], "fraction"),
        (["cfl", "--cnn-steps", "0", "--fc-steps", "0", "--out", "x"], "nothing to run"),
        (["nosuch"], "invalid choice"),
    ],
)
def test_bad_flags_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_pde_run_writes_results_and_refuses_a_used_directory(tmp_path, capsys, monkeypatch):
    """The whole ``pde`` command on a 32 x 32 checkerboard (w = 16: the minima bound 0.053 < 2 / alpha); the measurement is the 1-D checkerboard map here
    (:func:`checkerboard_orbit`, exact for the pixel checkerboard) instead of the engine's simulation, which
    tests/test_pde_nonlinear.py covers, so that the run costs no training program's compilation."""
    from eos_jax.pde.nonlinear import checkerboard_orbit
    from experiments.predict import pde as pde_run

    def orbit(config):
        kw = dict(size=config.size, kernel=config.kernel, alpha=config.alpha, beta=1.0, label=1, pool=config.pool)
        found = checkerboard_orbit(0.5, config.dts, steps=config.steps, window=20, sample_every=1, **kw)
        return {k: v["predicted"] for k, v in found.items()}

    monkeypatch.setattr(pde_run, "measure_pde", orbit)
    out = tmp_path / "p"
    argv = [
        "pde",
        "--dt",
        "0.03",
        "0.07",
        "0.15",
        "--size",
        "32",
        "--kernel",
        "16",
        "--steps",
        "400",
        "--out",
        str(out),
    ]
    assert _run(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(c["dt"], c["predicted"], c["measured"]) for c in res["cells"]] == [
        (0.03, "stable", "stable"),
        (0.07, "restrained", "restrained"),
        (0.15, "divergent", "divergent"),  # dt alpha = 3 > 2
    ]
    assert res["accuracy"] == 1.0 and res["confusion"]["restrained"] == {"restrained": 1}
    th = res["threshold"]
    assert th["measured_bracket"] == [0.03, 0.07] and th["inside"] and 0.03 < th["predicted"] < 0.07
    assert (out / "predict.png").stat().st_size > 0 and res["predict_seconds"] > 0
    assert "accuracy 1.000 (3/3)" in capsys.readouterr().out
    assert _run(argv) == 2 and "already holds" in capsys.readouterr().err


@pytest.mark.slow
def test_cnn_run_writes_every_cell_and_a_reused_measurement_predicts_the_same(tmp_path, capsys):
    """The whole ``cnn`` command on a tiny grid (1 layer, lr 1 and 100, seed 0, 8 steps on 64 bundled
    examples), then the same grid with ``--measured``: every cell the same (the measured regimes taken
    from the first run, the probe's bits the same), nothing measured; another grid, or a directory
    without a run, is refused in one line (exit 2) and nothing is written."""
    from eos_jax.stability import REGIMES

    grid = ["cnn", "--layers", "1", "--lr", "1", "100", "--seeds", "0", "--steps", "8", "--num-examples", "64"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run([*grid, "--out", str(a)]) == 0
    out = capsys.readouterr().out
    res = json.loads((a / "results.json").read_text())
    cells = res["cells"]
    assert [(c["layers"], c["lr"], c["weight_decay"], c["seed"]) for c in cells] == [
        (1, 1.0, 0.0, 0),
        (1, 100.0, 0.0, 0),
    ]
    for c in cells:
        assert c["predicted"] in REGIMES and c["measured"] in REGIMES and c["baseline"] in ("stable", "restrained")
        assert c["deciding"] and c["probe"]["lambda_0"] > 0 and c["first_unstable_layer"] == "['conv0']"
    assert cells[0]["measured"] == "stable"  # lr 1: lr * lambda_max at initialization is about 0.05
    assert res["accuracy"] == np.mean([c["predicted"] == c["measured"] for c in cells])
    assert res["baseline_accuracy"] == np.mean([c["baseline"] == c["measured"] for c in cells])
    assert sum(n for row in res["confusion"].values() for n in row.values()) == 2
    assert res["predict_seconds"] > 0 and res["measure_seconds"] > 0 and res["measured_from"] is None
    assert 0 < res["predict_breakdown"]["compile_seconds"] < res["predict_seconds"]
    assert 0 < res["measure_breakdown"]["compile_seconds"] < res["measure_seconds"]
    assert (a / "predict.png").read_bytes()[:4] == b"\x89PNG" and "1 layer(s): per seed" in out

    assert _run([*grid, "--measured", str(a), "--out", str(b)]) == 0
    again = json.loads((b / "results.json").read_text())
    assert again["cells"] == cells and again["grid_cells"] == res["grid_cells"]
    assert again["measured_from"] == str(a) and again["measure_seconds"] == res["measure_seconds"]
    assert again["measure_breakdown"] is None
    assert f"(the measurement of {a})" in capsys.readouterr().out

    refused = [
        ([*grid[:-3], "9", *grid[-2:]], "steps=8"),  # --steps 9
        ([*grid[:4], "1", "2", *grid[6:]], "lr=[1.0, 100.0]"),  # --lr 1 2
    ]
    for argv, needle in refused:
        assert _run([*argv, "--measured", str(a), "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and str(a) in err and len(err.splitlines()) == 1, err
    assert _run([*grid, "--measured", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no readable config.json and results.json" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_cnn_probe_trains_the_first_examples_and_lambda_at_init_is_the_dense_hessians():
    """The probe's problem is the first quarter of the examples (with their constant loss), the whole set when
    ``--probe-examples`` names them all; ``lambda_max`` at initialization (the baseline's) is on every example,
    with each layer's block sharpness from the dense Hessian of the 2-layer CNN (18 kernel entries), against
    Lanczos solves on the whole Hessian and on each block."""
    from eos_jax import train as tr
    from eos_jax.stability import constant_loss
    from experiments.eos.config import build_problem, load_data
    from experiments.predict import cnn as pc

    config = pc.PredictCnnConfig(layers=(2,), lr=(1.0,), seeds=(0,), steps=8, num_examples=64)
    cfg = config.eos_config(2)
    data, _ = load_data(cfg)
    problem, _ = build_problem(cfg, data)
    probe, closs = pc._probe_problem(problem, cfg, data, config)
    assert np.array_equal(np.asarray(probe.data["x"]), np.asarray(data["x"])[:16])
    assert np.array_equal(np.asarray(probe.data["y"]), np.asarray(data["y"])[:16])
    assert closs == constant_loss(np.asarray(data["y"])[:16], "bce", 2) != constant_loss(data["y"], "bce", 2)
    assert pc._probe_problem(problem, cfg, data, dataclasses.replace(config, probe_examples=64))[0] is problem

    rec = pc._layer_records(cfg, data, problem.data, 0, pc._init_curvature_fn(problem))
    params = jax.jit(problem.init_params)(tr.lane_init_key(0))
    top = jax.jit(lambda p, b: hessian.top_eigenvalue(problem.loss_fn, p, b, num_iters=18))(params, problem.data)
    blocks = jax.jit(lambda p, b: hessian.layer_sharpness(problem.loss_fn, p, b, num_iters=9))(params, problem.data)
    assert rec["lambda_max"] == pytest.approx(float(top.eigenvalue), rel=1e-4)  # Lanczos on all 18 kernel entries
    assert rec["block_sharpness"] == pytest.approx({n: float(r.eigenvalue) for n, r in blocks.items()}, rel=1e-4)
    assert set(rec["block_sharpness"]) == {"['conv0']", "['conv1']"}


def _cfl_run(lr, steps=6, dtype=jnp.float64):
    """``steps`` GD updates with cfl_scale after optax.sgd; returns the final params and cfl_scale's state."""
    import optax

    from eos_jax.optim_cfl import cfl_scale

    p, x = _setup()
    p = jax.tree_util.tree_map(lambda a: a.astype(dtype), p)
    x = x.astype(dtype)
    opt = optax.chain(optax.sgd(lr), cfl_scale(_loss, x, lr, fraction=0.5, iters_per_step=2))

    def body(carry, _):
        params, state = carry
        u, state = opt.update(jax.grad(_loss)(params, x), state, params)
        return (optax.apply_updates(params, u), state), None

    params, state = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[0]
    return params, state[1]


def test_cfl_scale_jit_vmap_bits_and_dense_reference():
    from eos_jax.optim_cfl import cfl_scale

    lrs = jnp.array([0.05, 3.0], jnp.float32)
    run = jax.jit(jax.vmap(lambda lr: _cfl_run(lr, dtype=jnp.float32)))
    (p_a, s_a), (p_b, s_b) = run(lrs), run(lrs)
    for a, b in zip(jax.tree_util.tree_leaves((p_a, s_a)), jax.tree_util.tree_leaves((p_b, s_b))):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bit for bit, run to run
    swapped = run(lrs[::-1])  # the same program with the lanes swapped: a lane does not see its neighbour
    for a, b in zip(jax.tree_util.tree_leaves(swapped), jax.tree_util.tree_leaves((p_b, s_b))):
        np.testing.assert_allclose(np.asarray(a)[::-1], np.asarray(b), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(p_a["a"][0]), np.asarray(p_a["a"][1]))  # and the lanes differ
    assert s_a.sharpness.dtype == jnp.float32 and s_a.vectors["a"].dtype == jnp.float32
    assert np.all(np.asarray(s_a.factor[0]) == 1.0)  # lr 0.05: every layer far below its bound, nominal step
    assert np.all(np.asarray(s_a.factor[1]) < 1.0)  # lr 3: capped
    # float64 at fixed parameters: the warm-started power iteration converges to each diagonal block's largest
    # eigenvalue (dense reference), and the factor applied is min(1, 0.5 * 2 / (lr * lambda)).
    p, x = _setup()
    opt = cfl_scale(_loss, x, 3.0, iters_per_step=4)
    g = jax.grad(_loss)(p, x)
    state = jax.jit(lambda s: jax.lax.fori_loop(0, 50, lambda i, s: opt.update(g, s, p)[1], s))(opt.init(p))
    h = _dense_hessian_at_setup()
    ref = [np.linalg.eigvalsh(h[:6, :6])[-1], np.linalg.eigvalsh(h[6:, 6:])[-1]]
    np.testing.assert_allclose(np.asarray(state.sharpness), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.factor), np.minimum(1.0, 1.0 / (3.0 * np.asarray(state.sharpness))))


def test_cfl_scale_takes_each_steps_batch_from_the_engine():
    """In ``train.fit`` the step hands its batch to the update (``apply_step(..., batch=batch)``): a
    ``cfl_scale`` built without data trains bit for bit like one given the data at construction, and a
    batch given at construction is overridden by the one passed to ``update``."""
    import optax

    from eos_jax import optim
    from eos_jax import train as tr
    from eos_jax.optim_cfl import cfl_scale

    p0, x = _setup()
    p0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p0)
    x = x.astype(jnp.float32)

    def problem(batch):
        def make(hp):
            return optax.chain(optim.sgd(hp.learning_rate, k=hp.k), cfl_scale(_loss, batch, hp.learning_rate))

        return tr.Problem(lambda key: p0, _loss, make, x)

    kw = dict(sharpness_every=None, chunk_steps=4, checkpoint_every=None)
    given = tr.fit(problem(x), tr.make_lanes([0.05, 3.0]), 8, **kw)
    passed = tr.fit(problem(None), tr.make_lanes([0.05, 3.0]), 8, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(given.params), jax.tree_util.tree_leaves(passed.params)):
        assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    assert not np.array_equal(np.asarray(passed.params["a"][0]), np.asarray(passed.params["a"][1]))

    opt = cfl_scale(_loss, x, 3.0, iters_per_step=4)  # the update's batch wins over the construction's
    g = jax.grad(_loss)(p0, x)
    own = opt.update(g, opt.init(p0), p0)[1].sharpness
    doubled = opt.update(g, opt.init(p0), p0, batch=2.0 * x)[1].sharpness
    ref = cfl_scale(_loss, 2.0 * x, 3.0, iters_per_step=4)
    assert np.array_equal(np.asarray(doubled), np.asarray(ref.update(g, ref.init(p0), p0)[1].sharpness))
    assert not np.allclose(np.asarray(own), np.asarray(doubled))


# python -m experiments.predict agreement: measurement against measurement, and the per-configuration bounds.


@pytest.mark.parametrize(
    "counts,n",
    [
        ({"restrained": 3, "stable": 3}, 3),
        ({"restrained": 6, "stable": 4, "transient": 2, "collapsed": 2, "spikes-off-edge": 1}, 5),
        ({"collapsed": 2, "transient": 2, "stable": 1, "stalled": 0}, 4),
        ({"stable": 4}, 1),
    ],
)
def test_majority_distribution_is_every_draw_counted(counts, n):
    """The hypergeometric sum equals enumerating every draw of ``n`` seeds of the pool (ties by severity)."""
    pool = [r for r, k in counts.items() for _ in range(k)]
    draws = list(itertools.combinations(range(len(pool)), n))
    seen = Counter(majority([pool[i] for i in d]) for d in draws)
    got = majority_distribution(counts, n)
    assert set(got) == set(seen)
    for r, k in seen.items():
        assert abs(got[r] - k / len(draws)) < 1e-12, (r, got[r], k / len(draws))
    assert abs(sum(got.values()) - 1.0) < 1e-12


def test_majority_distribution_refuses_a_draw_larger_than_the_pool():
    with pytest.raises(ConfigError, match="n=4; expected 1 <= n <= 3"):
        majority_distribution({"stable": 2, "restrained": 1}, 4)


def _write_run(path, seeds, cells, **config):
    """A ``predict cnn`` run directory holding ``cells``: (lr, seed, predicted, measured) of one depth."""
    path.mkdir()
    grid = {"layers": [1], "lr": [1.0, 2.0], "weight_decay": [0.0], "steps": 300, "num_examples": 2000}
    (path / "config.json").write_text(json.dumps({"command": "predict-cnn", "seeds": seeds, **grid, **config}))
    rows = [
        {"layers": 1, "lr": lr, "weight_decay": 0.0, "seed": s, "predicted": p, "baseline": "stable", "measured": m}
        for lr, s, p, m in cells
    ]
    (path / "results.json").write_text(json.dumps({"cells": rows, "seeds": seeds, "dataset": "d"}))
    return path


def _two_runs(tmp_path):
    """lr 1: A measures stable, stable, restrained; B restrained, restrained, stable; both predicted stable.
    lr 2: A collapsed x 3, predicted collapsed; B collapsed, collapsed, transient, predicted transient."""
    a = _write_run(
        tmp_path / "a",
        [0, 1, 2],
        [
            (1.0, 0, "stable", "stable"),
            (1.0, 1, "stable", "stable"),
            (1.0, 2, "stable", "restrained"),
            (2.0, 0, "collapsed", "collapsed"),
            (2.0, 1, "collapsed", "collapsed"),
            (2.0, 2, "collapsed", "collapsed"),
        ],
    )
    b = _write_run(
        tmp_path / "b",
        [3, 4, 5],
        [
            (1.0, 3, "stable", "restrained"),
            (1.0, 4, "stable", "restrained"),
            (1.0, 5, "stable", "stable"),
            (2.0, 3, "transient", "collapsed"),
            (2.0, 4, "transient", "collapsed"),
            (2.0, 5, "transient", "transient"),
        ],
    )
    return a, b


def test_agreement_of_two_hand_made_runs(tmp_path):
    """Every number worked out by hand (see ``_two_runs``)."""
    report = agreement(load_runs(_two_runs(tmp_path)))
    d = report["depths"]["all"]
    assert report["depths"]["1"] == d and report["seeds_per_run"] == 3
    # majorities: lr 1 A stable, B restrained (differ); lr 2 collapsed in both (agree)
    assert d["measured_vs_measured"] == {"mean": 0.5, "min": 0.5, "max": 0.5, "count": 1}
    # the predictor: A both majorities right, B neither (stable vs restrained, transient vs collapsed)
    assert d["predictor_majority"] == {"mean": 0.5, "min": 0.0, "max": 1.0, "count": 2}
    assert [r["predictor_majority"] for r in report["per_run"]] == [1.0, 0.0]
    assert d["predictor_seed"] == 7 / 12  # A: 2 + 3, B: 1 + 1
    # pooled lr 1: 3 stable, 3 restrained, a tie: restrained; lr 2: 5 collapsed, 1 transient
    pooled = {p["lr"]: p for p in report["pooled"]}
    assert pooled[1.0]["counts"] == {"stable": 3, "restrained": 3} and pooled[1.0]["majority"] == "restrained"
    assert pooled[2.0]["majority"] == "collapsed" and pooled[2.0]["majority_of_n"] == {"collapsed": 1.0}
    assert d["per_config_seed_ceiling"] == 8 / 12  # 3 of 6, 5 of 6
    # 3 of the 6 pooled lr-1 seeds: 2 or 3 stable in (9 + 1) of C(6, 3) = 20 draws
    assert pooled[1.0]["majority_of_n"] == {"stable": 0.5, "restrained": 0.5}
    assert d["per_config_majority_ceiling"] == (0.5 + 1.0) / 2
    # predictions pooled: lr 1 stable (the measurement's restrained), lr 2 a 3 : 3 tie, collapsed (right)
    assert pooled[2.0]["predicted_majority"] == "collapsed" and d["predictor_pooled_majority"] == 0.5


def test_agreement_cli_writes_the_report_and_refuses_bad_runs_in_one_line(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    out = tmp_path / "out"
    assert _run(["agreement", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured vs measured 50 %" in printed and "best per-configuration prediction 75 % expected" in printed
    report = json.loads((out / "agreement.json").read_text())
    assert report["depths"]["all"]["predictor_seed"] == 7 / 12
    assert json.loads((out / "config.json").read_text())["runs"] == [str(a), str(b)]

    other = _write_run(tmp_path / "other", [6], [], steps=200)
    overlap = _write_run(tmp_path / "overlap", [2, 7], [])
    refused = [
        ([str(a)], "1 run(s) given"),
        ([str(a), str(overlap)], f"seed 2 is in {a} and in {overlap}"),
        ([str(a), str(other)], f"{other} has steps=200; {a} has steps=300"),
        ([str(a), str(tmp_path / "none")], "no readable config.json and results.json"),
    ]
    for runs, needle in refused:
        assert _run(["agreement", *runs, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    assert _run(["agreement", str(a), str(b), "--out", str(out)]) == 2  # a used directory is not overwritten
    assert "already holds" in capsys.readouterr().err
