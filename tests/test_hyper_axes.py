"""Any named hyperparameter as a lane axis: momentum and Adam's b2 swept in one vmapped program,
checked against independent NumPy references; experiments.eos --momentum as a lane axis."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eos_jax import cli, hessian, optim
from eos_jax import train as tr
from eos_jax.errors import ConfigError
from experiments import eos as eos_cli

H = np.array([1.0, 4.0])  # Hessian diag of 0.5 w^T diag(H) w


def _quadratic_problem(make_optimizer, threshold=2.0) -> tr.Problem:
    def loss(p, b):
        return jnp.float64(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)

    return tr.Problem(
        lambda key: {"w": jnp.ones(2, jnp.float64)},
        loss,
        make_optimizer,
        {"h": jnp.asarray(H[None], jnp.float64)},
        threshold=threshold,
    )


def test_make_lanes_named_axes_order_and_errors():
    lanes = tr.make_lanes([0.1, 0.2], ks=[1, 3], momentum=[0.0, 0.9])
    assert [(l.learning_rate, dict(l.hyper)["momentum"], l.k) for l in lanes] == [
        (0.1, 0.0, 1), (0.1, 0.0, 3), (0.1, 0.9, 1), (0.1, 0.9, 3),
        (0.2, 0.0, 1), (0.2, 0.0, 3), (0.2, 0.9, 1), (0.2, 0.9, 3),
    ]  # fmt: skip
    assert lanes[2].asdict() == {
        "learning_rate": 0.1, "k": 1, "seed": 0, "weight_decay": 0.0, "init_seed": 0, "momentum": 0.9,
    }  # fmt: skip
    # k twins: every hyperparameter but k, the named ones included
    twins = tr.core.find_twins(lanes, [list(range(8))])
    assert [t["lane"] for t in twins] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert tr.make_lanes(0.1)[0].asdict() == tr.Lane(0.1).asdict()  # no axis: records as before
    with pytest.raises(ConfigError, match="momentum nan is not allowed"):
        tr.make_lanes(0.1, momentum=[0.0, float("nan")])
    for bad in ("seed", "count", "_private", "not-a-name"):
        with pytest.raises(ConfigError, match=f"hyperparameter name '{bad}' is not allowed"):
            tr.Lane(0.1, hyper={bad: 1.0})
    with pytest.raises(ConfigError, match="duplicates"):
        tr.make_lanes(0.1, b2=[0.9, 0.9])
    with pytest.raises(ConfigError, match="different hyperparameters"):
        tr.stack_hparams([tr.Lane(0.1, hyper={"b1": 0.9}), tr.Lane(0.1, hyper={"b2": 0.9})])
    hp = tr.stack_hparams(tr.make_lanes(0.1, b2=[0.99, 0.999]), jnp.float32)
    with pytest.raises(AttributeError, match="no hyperparameter 'b1'; the lanes carry \\['b2'\\]"):
        hp.b1  # noqa: B018


def _heavy_ball_reference(lr: float, mu: float, steps: int) -> np.ndarray:
    """torch.optim.SGD momentum (dampening 0) on 0.5 w^T diag(H) w, float64 NumPy: the loss at each step."""
    w, b, out = np.ones(2), np.zeros(2), []
    for t in range(steps + 1):
        out.append(0.5 * np.sum(H * w * w))
        g = H * w
        b = g if t == 0 else mu * b + g
        w = w - lr * b
    return np.array(out)


def test_momentum_axis_matches_heavy_ball_and_each_lane_has_its_threshold():
    """Three momenta x two learning rates in one program: each lane's losses equal torch's heavy ball
    (float64 NumPy) to rounding, and each lane is judged against 2 + 2 beta."""

    def thr(lane: tr.Lane) -> float:
        return hessian.stability_threshold("heavy_ball", beta=dict(lane.hyper)["momentum"])

    prob = _quadratic_problem(lambda hp: optim.sgd(hp.learning_rate, k=hp.k, momentum=hp.momentum), thr)
    lanes = tr.make_lanes([0.1, 0.3], momentum=[0.0, 0.5, 0.9])
    steps = 12
    cfg = tr.EngineConfig(steps=steps, sharpness_every=4, sharpness_tol=None, sharpness_iters=4)
    with jax.enable_x64(True):
        hist = tr.fit(prob, lanes, steps, config=cfg)
    assert hist.loss.shape == (6, steps + 1)
    for i, lane in enumerate(lanes):
        mu = dict(lane.hyper)["momentum"]
        ref = _heavy_ball_reference(lane.learning_rate, mu, steps)
        np.testing.assert_allclose(hist.loss[i], ref, rtol=1e-12, err_msg=str(lane))
        assert hist.lane_summaries[i]["momentum"] == mu and hist.lane_summaries[i]["threshold"] == 2 + 2 * mu
    np.testing.assert_array_equal(hist.threshold, [2.0, 3.0, 3.8, 2.0, 3.0, 3.8])
    assert hist.summary["threshold"] is None
    np.testing.assert_allclose(hist.sharpness[:, 0], 4.0, rtol=1e-12)
    # the same sweep again: the same bits
    with jax.enable_x64(True):
        again = tr.fit(prob, lanes, steps, config=cfg)
    assert np.array_equal(hist.loss.view(np.uint64), again.loss.view(np.uint64))


def _adam_reference(lr: float, b1: float, b2: float, eps: float, steps: int) -> np.ndarray:
    """torch.optim.Adam on 0.5 w^T diag(H) w, float64 NumPy: the loss at each step."""
    w, m, v, out = np.ones(2), np.zeros(2), np.zeros(2), []
    for t in range(1, steps + 2):
        out.append(0.5 * np.sum(H * w * w))
        g = H * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    return np.array(out[: steps + 1])


def test_adam_b2_sweep_from_the_library():
    """Adam's b2 as a lane axis (with k = 1, 3 twins): one fit call; every k = 1 lane follows torch's
    Adam with its own b2 (float64 NumPy), and the b2 values give different trajectories."""
    prob = _quadratic_problem(lambda hp: optim.adam(hp.learning_rate, k=hp.k, b2=hp.b2))
    lanes = tr.make_lanes(0.05, ks=[1, 3], b2=[0.9, 0.99, 0.999])
    steps = 20
    with jax.enable_x64(True):
        hist = tr.fit(prob, lanes, steps, config=tr.EngineConfig(steps=steps, sharpness_every=None))
    for i, lane in enumerate(lanes):
        ref = _adam_reference(0.05, 0.9, dict(lane.hyper)["b2"], 1e-8, steps)
        np.testing.assert_allclose(hist.loss[i], ref, rtol=1e-9, err_msg=str(lane))
    k1 = [i for i, l in enumerate(lanes) if l.k == 1]
    finals = {float(hist.loss[i, -1]) for i in k1}
    assert len(finals) == 3, finals
    # every k = 3 lane found its k = 1 twin (same b2) in the program
    assert all("rel_l1_to_k1" in hist.lane_summaries[i] for i, l in enumerate(lanes) if l.k == 3)


def test_eos_cli_momentum_axis_runs_one_sweep(tmp_path, capsys):
    """--momentum 0 0.5 0.9 --lr 1 2: six lanes in one call, each with its momentum and threshold 2 + 2 momentum
    in the records and the findings; one value stays a number in config.json (the config hash of runs
    made before the axis); a value outside [0, 1) is one line, exit 2, nothing written."""
    small = ["--dataset", "digits01", "--num-examples", "64", "--steps", "6", "--sharpness-every", "3",
             "--sharpness-iters", "4", "--sharpness-method", "power", "--quiet", "--conv-impl", "fft",
             "--layers", "1", "--seed", "0", "--k", "1"]  # fmt: skip
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        cli.run(eos_cli.main, [*small, "--momentum", "0", "0.5", "0.9", "--lr", "1", "2", "--out", str(out)])
    assert e.value.code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    got = [(l["learning_rate"], l["momentum"], l["threshold"]) for l in res["lanes"]]
    assert got == [(lr, m, 2 + 2 * m) for lr in (1.0, 2.0) for m in (0.0, 0.5, 0.9)]
    assert res["lane_groups"]["groups"] == [6] and res["summary"]["threshold"] is None
    assert [f.get("momentum") for f in res["findings"]] == [0.0, 0.5, 0.9, 0.0, 0.5, 0.9]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["lane"], r["momentum"]) for r in lines} == {(i, m) for i, m in enumerate([0.0, 0.5, 0.9] * 2)}
    assert json.loads((out / "config.json").read_text())["momentum"] == [0.0, 0.5, 0.9]
    one = eos_cli.default_config("cnn", momentum=(0.9,))
    assert one.to_dict()["momentum"] == 0.9 and one.hyper_axes() == {}
    with pytest.raises(SystemExit) as e:
        cli.run(eos_cli.main, [*small, "--momentum", "0", "1", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--momentum 1.0 is not allowed" in err, err
    assert not (tmp_path / "bad").exists()
