"""Tests of the non-linear one-layer CNN PDE (9) experiment (eos_jax.pde.nonlinear).

Tiny shapes: 8x8 to 32x32 checkerboards, 3x3 to 8x8 kernels, a few dozen steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eos_jax import cli, optim
from eos_jax import train as tr
from eos_jax.errors import ConfigError
from eos_jax.pde import nonlinear as nl
from eos_jax.pde.common import checkerboard
from experiments import pde
from experiments.pde import nonlinear as nl_exp
from experiments.pde.nonlinear_sim import nonlinear_problem, simulate

# ------------------------------------------------------------------ Theorem 5.1 / Eq. (8)


@pytest.mark.parametrize("pool", ["mean", "sum"])
@pytest.mark.parametrize("conv_impl", ["lax", "fft"])
@pytest.mark.parametrize("image_kind", ["checkerboard", "random"])
def test_analytic_gradient_eq8_equals_autodiff_float64(conv_impl, image_kind, pool):
    """Eq. (8) evaluated from its formula equals jax.grad of the cnn model's loss (7), float64."""
    n, w, alpha, beta = 12, 5, 20.0, 1.3
    if image_kind == "checkerboard":
        image = checkerboard(n, dtype=np.float64)
    else:
        image = np.random.default_rng(0).uniform(-1.0, 1.0, (n, n))
    model = nl.make_model(w, beta=beta, pool=pool, conv_impl=conv_impl, dtype="float64")
    params = model.init(jax.random.key(3), (n, n, 1))["params"]
    # Scale K so that the logit is O(1): y_hat - y is then far from 0 and the data term of
    # (8) is as large as the weight-decay term (otherwise the test would only check alpha K).
    kernel = nl.kernel_of(params)
    z = nl.valid_correlation(kernel, jnp.asarray(image))
    g = float(jnp.sum(z * jax.nn.sigmoid(beta * z))) * (1.0 / z.size if pool == "mean" else 1.0)
    scale = 1.0 / max(abs(g), 1.0)
    params = jax.tree_util.tree_map(lambda x: x * scale, params)
    kernel = nl.kernel_of(params)
    batch = nl.make_batch(image, 1, dtype=np.float64)
    loss_fn = nl.make_loss_fn(model, alpha)
    auto = nl.kernel_of(jax.jit(jax.grad(loss_fn))(params, batch))
    analytic = nl.analytic_gradient(kernel, jnp.asarray(image), alpha=alpha, beta=beta, label=1, pool=pool)
    assert analytic.dtype == jnp.float64 and auto.dtype == jnp.float64
    data_term = analytic - alpha * kernel
    # The mean's 1/P makes the data term small against alpha K at alpha = 20: compare it with
    # the gradient's own scale instead, and check it separately below for the mean.
    np.testing.assert_allclose(np.asarray(analytic), np.asarray(auto), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(data_term),
        np.asarray(auto) - alpha * np.asarray(kernel),
        rtol=1e-9,
        atol=1e-13 * float(jnp.max(jnp.abs(auto))),
    )
    assert float(jnp.linalg.norm(data_term)) > 1e-4 * float(jnp.linalg.norm(alpha * kernel))


def _authors_numpy_gradient(kernel, image, alpha, beta, label):
    """Eq. (8) with the authors' AvgPooling written out in NumPy float64 (single_layer/PySun.py's math).

    Forward: ``z[m, n] = sum_ij K[i, j] I[m+i, n+j]`` over valid (m, n) (im2col), Swish,
    ``np.mean`` over both output axes, sigmoid, BCE. Backward: ``s(g) - y``; the mean
    spreads it as ``1/H`` then ``1/W`` over the output; Swish' ``e/(1+e) + x b e/(1+e)^2``;
    ``dK[i, j] = sum_mn eta[m, n] I[m+i, n+j]``; plus ``alpha K`` (their ``update``).
    """
    w = kernel.shape[0]
    h = image.shape[0] - w + 1
    cols = np.stack([image[m : m + w, n : n + w].reshape(-1) for m in range(h) for n in range(h)], axis=1)
    z = (kernel.reshape(1, -1) @ cols).reshape(h, h)
    e = np.exp(beta * z)
    pooled = np.mean(np.mean(z * (e / (e + 1)), axis=1), axis=0)
    sig = np.exp(pooled) / (np.exp(pooled) + 1)
    eta = np.full((h, h), sig - label) / h / h
    eta = eta * (e / (1 + e) + z * (beta * e / ((1 + e) * (1 + e))))
    return (eta.reshape(1, -1) @ cols.T).reshape(w, w) + alpha * kernel


@pytest.mark.parametrize("image_kind", ["checkerboard", "random"])
def test_mean_pooled_gradient_matches_the_authors_numpy_formula(image_kind):
    """pool="mean": Eq. (8) with 1/P, jax.grad of the cnn loss and the authors' NumPy formula agree to 1e-10."""
    n, w, alpha, beta = 12, 4, 0.3, 1.0
    image = (
        checkerboard(n, dtype=np.float64)
        if image_kind == "checkerboard"
        else np.random.default_rng(4).uniform(-1.0, 1.0, (n, n))
    )
    model = nl.make_model(w, beta=beta, pool="mean", conv_impl="lax", dtype="float64")
    params = model.init(jax.random.key(5), (n, n, 1))["params"]
    kernel = np.asarray(nl.kernel_of(params), np.float64)
    ref = _authors_numpy_gradient(kernel, image, alpha, beta, 1)
    assert np.linalg.norm(ref - alpha * kernel) > 1e-2 * np.linalg.norm(alpha * kernel)  # data term not negligible
    batch = nl.make_batch(image, 1, np.float64)
    auto = np.asarray(nl.kernel_of(jax.grad(nl.make_loss_fn(model, alpha))(params, batch)))
    analytic = np.asarray(
        nl.analytic_gradient(jnp.asarray(kernel), jnp.asarray(image), alpha=alpha, beta=beta, label=1, pool="mean")
    )
    np.testing.assert_allclose(auto, ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(analytic, ref, rtol=1e-10, atol=1e-14)
    # The sum is the same data term times P = (n - w + 1)^2 (no 1/P): the two readings differ.
    summed = np.asarray(
        nl.analytic_gradient(jnp.asarray(kernel), jnp.asarray(image), alpha=alpha, beta=beta, label=1, pool="sum")
    )
    assert not np.allclose(summed, ref, rtol=1e-3)


def test_swish_prime_and_regime_threshold():
    """r' matches autodiff of Swish; eps is where r' leaves its linearization (46) by tol."""
    x = jnp.linspace(-30.0, 30.0, 601, dtype=jnp.float64)
    for beta in (0.5, 1.0, 2.0):
        swish = lambda v: v * jax.nn.sigmoid(beta * v)  # noqa: E731
        np.testing.assert_allclose(nl.swish_prime(x, beta), jax.vmap(jax.grad(swish))(x), rtol=1e-13, atol=1e-15)
        eps = nl.regime_threshold(beta, 0.05)
        err = lambda v: float(nl.swish_prime(jnp.float64(v), beta)) - (0.5 + 0.5 * beta * v)  # noqa: E731
        assert err(eps) == pytest.approx(-0.05, abs=1e-9)
        assert err(-eps) == pytest.approx(0.05, abs=1e-9)
        assert abs(err(0.99 * eps)) < 0.05
    # Small-x expansion r'(x) - 1/2 - x/2 = -x^3/12 + ...: eps ~ (12 tol)^(1/3) for small tol.
    assert nl.regime_threshold(1.0, 1e-6) == pytest.approx((12e-6) ** (1 / 3), rel=1e-3)
    assert nl.regime_threshold(2.0, 0.05) == pytest.approx(nl.regime_threshold(1.0, 0.05) / 2, rel=1e-12)
    with pytest.raises(ConfigError, match="tol"):
        nl.regime_threshold(1.0, 0.6)


def test_regime_fractions_counts():
    z = jnp.asarray([[-2.0, -0.5, 0.0, 0.5], [0.9, 1.0, -1.0, 3.0]], jnp.float32)
    fr = np.asarray(nl.regime_fractions(z, 0.95))
    np.testing.assert_array_equal(fr, np.asarray([2, 4, 2], np.float32) / 8)
    assert fr.dtype == np.float32


# -------------------------------------------------------------------- the vmapped program


_SMALL = nl.NonlinearConfig(dts=(0.01, 0.03, 10.0), steps=12, size=16, kernel=4, sharpness_every=6, sharpness_iters=3)


@pytest.fixture(scope="module")
def small_sim():
    """One vmapped run: two finite step sizes and dt=10 (K grows by about -199 per step)."""
    return simulate(_SMALL)


@pytest.fixture(scope="module")
def reference_lane():
    """``run(dt, k, steps) -> (losses, kernels)``: one lane alone, a Python loop of jitted steps.

    Independent of the scan: the model loss, ``jax.grad`` and ``optim.sgd(dt, k)`` built
    inside one jitted step with traced ``dt`` and ``k`` (one compilation for all lanes).
    """
    config = _SMALL
    image = checkerboard(config.size, dtype=np.float32)
    model = nl.make_model(config.kernel, beta=config.beta, conv_impl=config.conv_impl)
    params0 = model.init(tr.lane_init_key(config.seed), (config.size, config.size, 1))["params"]
    batch = nl.make_batch(image, config.label)
    loss_fn = nl.make_loss_fn(model, config.alpha)

    @jax.jit
    def step(p, s, b, dt, k):
        opt = optim.sgd(dt, k=k)
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    def run(dt: float, k: int, steps: int):
        dt_ = jnp.asarray(dt, jnp.float32)
        k_ = jnp.asarray(k, jnp.int32)
        params = params0
        opt_state = optim.sgd(dt_, k=k_).init(params)
        losses, kernels = [], []
        for _ in range(steps):
            kernels.append(np.asarray(nl.kernel_of(params)))
            params, opt_state, loss = step(params, opt_state, batch, dt_, k_)
            losses.append(float(loss))
        kernels.append(np.asarray(nl.kernel_of(params)))
        return np.asarray(losses), kernels

    return run


def test_vmapped_program_equals_per_lane_runs(small_sim, reference_lane):
    """Every finite lane of the one vmapped scan program follows its own single-lane run.

    To float tolerance, not bitwise: the vmapped program batches the lanes' FFTs and is
    another compiled program than the single-lane step.
    """
    sim, config = small_sim, _SMALL
    assert sim["loss"].shape == (12, 3, 2) and sim["rel_l1"].shape == (12, 3)
    assert sim["fractions"].shape == (12, 3, 2, 3)
    for i, dt in enumerate(config.dts[:2]):
        for j, k in enumerate((1, config.k)):
            ref_loss, ref_kernels = reference_lane(dt, k, config.steps)
            np.testing.assert_allclose(sim["loss"][:, i, j], ref_loss, rtol=2e-5)
            final = nl.kernel_of(jax.tree_util.tree_map(lambda x: x[i, j], sim["final_params"]))
            np.testing.assert_allclose(np.asarray(final), ref_kernels[-1], rtol=1e-4, atol=1e-6)
        assert sim["rel_l1"][0, i] == 0.0  # the same K_0 in both lanes
        assert np.all((sim["rel_l1"][:, i] >= 0) & (sim["rel_l1"][:, i] <= 2))
        np.testing.assert_allclose(np.sum(sim["fractions"][:, i], axis=-1), 1.0, rtol=1e-6)
    assert sim["first_nonfinite"][:2] == [[None, None], [None, None]]


def test_divergent_lane_is_flagged_with_its_step_and_others_stay_finite(small_sim, reference_lane):
    """dt=10 with alpha=20 multiplies K by about -199 per step: L(K_t) overflows float32 at the
    step the single-lane run predicts; the lane is frozen (finite kernel, NaN records) and the
    other lanes go on."""
    sim, config = small_sim, _SMALL
    first = sim["first_nonfinite"]
    ref_loss, _ = reference_lane(10.0, 1, config.steps)
    expected = int(np.argmax(~np.isfinite(ref_loss)))
    assert 0 < expected < config.steps and np.all(np.isfinite(ref_loss[:expected]))
    assert first[2][0] == expected
    assert first[2][1] is not None and abs(first[2][1] - expected) <= 1
    loss = sim["loss"]
    assert np.all(np.isfinite(loss[:, :2, :]))
    assert np.all(np.isfinite(loss[:expected, 2, 0])) and np.all(np.isnan(loss[expected:, 2, 0]))
    assert np.all(np.isnan(sim["fractions"][expected:, 2, 0]))
    assert np.all(np.isfinite(sim["rel_l1"][: min(first[2]), 2]))
    assert np.all(np.isnan(sim["rel_l1"][min(first[2]) :, 2]))
    assert np.all(np.isnan(sim["sharpness"][sim["sharpness_steps"] > max(first[2]), 2]))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(sim["final_params"]))  # frozen
    cls, ev = nl.classify(loss[:, 2, :], sim["rel_l1"][:, 2], first[2], config)
    assert cls == "divergent" and ev["first_nonfinite_step"] == min(first[2])
    for i in range(2):
        assert nl.classify(loss[:, i, :], sim["rel_l1"][:, i], first[i], config)[0] != "divergent"


@pytest.mark.parametrize("pool", ["mean", "sum"])
def test_sharpness_is_the_largest_algebraic_eigenvalue_of_the_dense_hessian(pool):
    """The sharpness the experiment records (the engine's Lanczos, float32) is the largest algebraic
    eigenvalue of eigh(jax.hessian) of the loss (7), evaluated in float64 at each lane's recorded K.

    3x3 kernel, 9 Lanczos products: the whole Krylov space, so the only error is float32 rounding.
    Label 0: on the pixel checkerboard the logit is ``(P/2) c (s(c) - s(-c)) >= 0`` (``c = <K, chi>``),
    so with label 1 the sum-pooled sigmoid saturates at the right answer and the data term vanishes.
    """
    w, alpha = 3, 0.5 if pool == "sum" else 0.02
    config = nl.NonlinearConfig(
        dts=(0.01, 0.3),
        steps=4,
        size=8,
        kernel=w,
        alpha=alpha,
        pool=pool,
        label=0,
        sharpness_every=4,
        sharpness_iters=w * w,
    )
    sim = simulate(config)
    assert list(sim["sharpness_steps"]) == [0, 4]
    model64 = nl.make_model(w, beta=config.beta, pool=pool, conv_impl="lax", dtype="float64")
    loss64 = nl.make_loss_fn(model64, alpha)
    batch = nl.make_batch(checkerboard(config.size, dtype=np.float64), config.label, dtype=np.float64)
    dense = jax.jit(jax.hessian(lambda kk, b: loss64({"conv0": {"kernel": kk[:, :, None, None]}}, b)))

    def spectrum(kern):
        return np.linalg.eigvalsh(np.asarray(dense(jnp.asarray(kern, jnp.float64), batch)).reshape(w * w, w * w))

    # Step 0: every lane at K_0. The data term shapes the spectrum there; it is rank one along chi
    # (on the pixel checkerboard the loss sees K only through c = <K, chi> and ||K||).
    eig0 = spectrum(sim["initial_kernel"])
    assert np.max(np.abs(eig0 - alpha)) > 0.1 * alpha
    for i in range(2):
        for j in range(2):
            assert float(sim["sharpness"][0, i, j]) == pytest.approx(eig0[-1], rel=2e-4, abs=1e-4 * alpha)
            kern = nl.kernel_of(jax.tree_util.tree_map(lambda x: x[i, j], sim["final_params"]))
            eig = spectrum(kern)
            assert float(sim["sharpness"][-1, i, j]) == pytest.approx(eig[-1], rel=2e-4, abs=1e-4 * alpha)


def test_problem_is_the_engines_dt_by_k_sweep():
    """One group of (dt, k) lanes of one seed, the weight decay inside the loss (7), exact Lanczos count."""
    problem, lanes, engine, model = nonlinear_problem(nl.NonlinearConfig(dts=(0.01, 0.1), size=8, kernel=3, seed=5))
    assert [(l.learning_rate, l.k, l.seed, l.weight_decay) for l in lanes] == [
        (0.01, 1, 5, 0.0),
        (0.01, 3, 5, 0.0),
        (0.1, 1, 5, 0.0),
        (0.1, 3, 5, 0.0),
    ]
    assert engine.max_lanes == 4 and engine.sharpness_tol is None and engine.log_every == 1
    assert not problem.l2_weight_decay and set(
        problem.step_metrics(problem.init_params(tr.lane_init_key(5)), problem.data)
    ) == {
        "data_loss",
        "logit",
        "fractions",
    }
    assert tr.core.group_lanes(len(lanes), engine.max_lanes) == [[0, 1, 2, 3]]


# ------------------------------------------------------------------------ classification


def _cfg(**kw):
    return nl.NonlinearConfig(dts=(0.1,), steps=100, window=20, **kw)


def test_classify_rules():
    cfg = _cfg()
    steps = np.arange(100, dtype=np.float64)
    decay = np.stack([10.0 * 0.9**steps + 1.0] * 2, axis=1)
    tiny = np.full(100, 1e-7)
    assert nl.classify(decay, tiny, [None, None], cfg)[0] == "stable"
    osc = decay.copy()
    osc[:, 0] += 0.5 * (-1.0) ** steps
    cls, ev = nl.classify(osc, tiny, [None, None], cfg)
    assert cls == "restrained" and ev["oscillating"] and not ev["amplified"]
    cls, ev = nl.classify(decay, np.full(100, 0.3), [None, None], cfg)
    assert cls == "restrained" and ev["amplified"] and not ev["oscillating"]
    grow = np.stack([1.5**steps] * 2, axis=1)
    assert nl.classify(grow, tiny, [None, None], cfg)[0] == "divergent"
    cls, ev = nl.classify(decay, tiny, [None, 57], cfg)
    assert cls == "divergent" and ev["first_nonfinite_step"] == 57
    assert nl.oscillation(np.arange(10.0)) == 0.0
    assert nl.oscillation(np.asarray([1.0, 3.0] * 5)) == pytest.approx((2 * 9 - 2) / (10 * 2))


def test_config_validation_names_the_bad_value():
    with pytest.raises(ConfigError, match="dt=-0.1"):
        nl.NonlinearConfig(dts=(-0.1,)).validate()
    with pytest.raises(ConfigError, match="k=1"):
        nl.NonlinearConfig(k=1).validate()
    with pytest.raises(ConfigError, match="kernel=40"):
        nl.NonlinearConfig(size=32, kernel=40).validate()
    with pytest.raises(ConfigError, match="duplicates"):
        nl.NonlinearConfig(dts=(0.1, 0.1)).validate()


# -------------------------------------------------------------------------------- theory


def test_theory_of_the_pixel_checkerboard():
    """pool="sum": Ibar = 0 (even side), window sums +-1 (odd valid side), windowed mu_max = (n-w+1)^2 w^2,
    mu_min = 0."""
    n, w, alpha = 32, 8, 20.0
    th = nl.theory(checkerboard(n), w, alpha=alpha, beta=1.0, label=1, dts=(0.01, 0.11), pool="sum")
    assert th["image_sum_Ibar"] == 0.0
    assert (th["window_sums_S"]["min"], th["window_sums_S"]["max"]) == (-1.0, 1.0)
    assert th["window_sums_S"]["sum_sq"] == w * w
    assert th["window_mu_max"] == pytest.approx((n - w + 1) ** 2 * w * w, rel=1e-9)
    assert abs(th["window_mu_min"]) < 1e-6 * th["window_mu_max"]
    assert th["max_abs_I_hat_sq"] == pytest.approx(float(n) ** 4) and th["min_abs_I_hat_sq"] < 1e-9
    assert th["not_activated_dt_max"] == pytest.approx(2 / alpha)
    assert th["activated_dt_max"] == pytest.approx(2 / alpha)  # Ibar = 0
    assert th["activated_window_dt_max"] == pytest.approx(2 / (alpha + w * w / 8))
    small, big = th["per_dt"]["0.01"], th["per_dt"]["0.11"]
    assert small["not_activated_stable"] and not big["not_activated_stable"]
    # a = s(0) - 1 = -1/2: alpha_min = mu_max / 4 >> 20: the transitioning regime is unstable.
    assert small["transitioning_window_alpha_min"] == pytest.approx(th["window_mu_max"] / 4, rel=1e-9)
    assert small["transitioning_alpha_min"] == pytest.approx(n**4 / 4)
    assert not small["transitioning_window_stable"] and not small["transitioning_stable"]


# ----------------------------------------------------------------------------------- CLI


def test_cli_writes_every_promised_file(tmp_path, capsys):
    out = tmp_path / "run"
    code = pde.main(
        [
            "nonlinear",
            "--dt",
            "0.01",
            "0.05",
            "0.2",
            "--steps",
            "20",
            "--size",
            "32",
            "--kernel",
            "8",
            "--sharpness-every",
            "10",
            "--sharpness-iters",
            "4",
            "--rel-l1-window",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in ("config.json", "metadata.json", "results.json", "figure5.png", "figure6.png", "regimes.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert set(res["per_dt"]) == {"0.01", "0.05", "0.2"}
    for v in res["per_dt"].values():
        assert v["classification"] in nl.CLASSES
        assert len(v["rel_l1"]) == 20
        ma = v["rel_l1_moving_average"]
        assert ma["window"] == 5 and ma["first_step"] == 4 and len(ma["values"]) == 16
        raw = np.asarray(v["rel_l1"], np.float64)
        np.testing.assert_array_equal(np.asarray(ma["values"], np.float64), nl.moving_average(raw, 5))
        for lane in ("k1", "k3"):
            assert len(v["lanes"][lane]["loss"]) == 20
            assert set(v["lanes"][lane]["fractions"]) == set(nl.REGIMES)
            assert len(v["lanes"][lane]["normalized_sharpness"]) == 3  # steps 0, 10, 20
        assert set(v["theory"]) >= {"not_activated_stable", "activated_stable", "transitioning_window_stable"}
    assert res["per_dt"]["0.2"]["classification"] == "divergent"  # dt * alpha = 4 > 2
    assert res["sharpness_steps"] == [0, 10, 20]
    assert "classification_rule" in res and res["notes"]
    assert res["setting"]["pool"] == "mean" and res["theory"]["data_term_scale_q"] == 1 / 25**2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "nonlinear" and cfg["dts"] == [0.01, 0.05, 0.2] and cfg["pool"] == "mean"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_info"]["conv_impl"] == "fft" and "timing" in meta
    printed = capsys.readouterr().out
    assert "divergent" in printed and "note:" in printed
    # The same directory again: refused, nothing overwritten.
    before = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.run(
            pde.main, ["nonlinear", "--dt", "0.01", "--steps", "20", "--size", "32", "--kernel", "8", "--out", str(out)]
        )
    assert e.value.code == 2
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--dt", "0"], "'0' is not allowed"),
        (["--dt", "-0.01"], "'-0.01' is not allowed"),
        (["--kernel", "0"], "'0' is not allowed"),
        (["--steps", "many"], "'many' is not an integer"),
        (["--conv-impl", "winograd"], "invalid choice"),
        (["--pool", "max"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(pde.main, ["nonlinear", *flags, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_config_errors_exit_2_through_the_entry_point(tmp_path, capsys):
    """Values argparse accepts but the config rejects (k=1, kernel > size): one line, exit 2, nothing written."""
    for flags, fragment in ((["--k", "1"], "k=1"), (["--size", "16", "--kernel", "20"], "kernel=20")):
        with pytest.raises(SystemExit) as e:
            cli.run(pde.main, ["nonlinear", *flags, "--out", str(tmp_path / "y")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1
        assert not (tmp_path / "y").exists()


# ------------------------------------------------------------- pooling: theory and notes


@pytest.mark.parametrize("pool,alpha", [("mean", 0.5), ("sum", 20.0)])
def test_checkerboard_minimum_against_model_gradient_and_dense_hessian(pool, alpha):
    """The 1-D reduction: at K* = (c*/w^2) chi the model's gradient vanishes and eigh of the dense
    Hessian has top eigenvalue lambda_max (closed form), float64."""
    n, w, beta = 12, 4, 1.0
    image = checkerboard(n, dtype=np.float64)
    minima = nl.checkerboard_minima(size=n, kernel=w, alpha=alpha, beta=beta, label=1, pool=pool)
    assert len(minima) == 2 and minima[0]["c"] < 0 < minima[1]["c"]
    model = nl.make_model(w, beta=beta, pool=pool, conv_impl="lax", dtype="float64")
    loss_fn = nl.make_loss_fn(model, alpha)
    batch = nl.make_batch(image, 1, np.float64)
    as_params = lambda kk: {"conv0": {"kernel": kk[:, :, None, None]}}  # noqa: E731
    chi = nl.chi(w)
    # The loss restricted to K = (c/w^2) chi is loss_c(c), for any c.
    cs = np.asarray([-2.0, -0.3, 0.7, 3.0])
    red = nl.checkerboard_loss_1d(cs, size=n, kernel=w, alpha=alpha, beta=beta, label=1, pool=pool)["loss_c"]
    for c, ref in zip(cs, red):
        assert float(loss_fn(as_params(jnp.asarray(c / (w * w) * chi)), batch)) == pytest.approx(ref, rel=1e-12)
    hess_fn = jax.jit(jax.hessian(lambda kk: loss_fn(as_params(kk), batch)))
    for m in minima:
        k_star = jnp.asarray(m["c"] / (w * w) * chi)
        grad = nl.kernel_of(jax.grad(loss_fn)(as_params(k_star), batch))
        assert float(jnp.max(jnp.abs(grad))) < 1e-9 * max(1.0, abs(m["c"]))
        eig = np.linalg.eigvalsh(np.asarray(hess_fn(k_star)).reshape(w * w, w * w))
        assert eig[-1] == pytest.approx(m["lambda_max"], rel=1e-9)
        assert m["dt_max"] == pytest.approx(2 / eig[-1], rel=1e-9)
        assert m["lambda_chi"] > alpha  # the data term, not the weight decay, sets the threshold here


def test_checkerboard_threshold_of_the_paper_setting_under_each_pooling():
    """256x256, w=32, alpha=20: the threshold 2/lambda_max is 0.0323 with the mean and 0.00355 with the sum
    (the README's sum sweep found stable below ~0.0035)."""
    kw = dict(size=256, kernel=32, alpha=20.0, beta=1.0, label=1)
    mean = nl.checkerboard_minima(pool="mean", **kw)
    summ = nl.checkerboard_minima(pool="sum", **kw)
    assert [round(m["dt_max"], 4) for m in mean] == [0.0323, 0.0323]
    assert [round(m["dt_max"], 5) for m in summ] == [0.00355, 0.00355]


def test_moving_average_is_the_authors_trailing_window_mean():
    """Entry j averages values[j:j+W] (instability/compute_one_layer.m); NaN inside a window gives NaN."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 250)
    w = 100
    ref = np.asarray([np.mean(x[i : i + w]) for i in range(x.size - w + 1)])  # their loop keeps one fewer
    got = nl.moving_average(x, w)
    assert got.shape == (151,)
    np.testing.assert_array_equal(got, ref)
    y = x.copy()
    y[120] = np.nan
    avg = nl.moving_average(y, w)
    assert np.all(np.isnan(avg[21:121])) and np.all(np.isfinite(avg[:21])) and np.all(np.isfinite(avg[121:]))
    assert nl.moving_average(x[:50], w).shape == (0,)


def test_theory_scales_the_data_term_by_one_over_p_for_the_mean():
    n, w, alpha = 16, 4, 20.0
    img = checkerboard(n)
    th_sum = nl.theory(img, w, alpha=alpha, beta=1.0, label=1, dts=(0.01,), pool="sum", square=1)
    th_mean = nl.theory(img, w, alpha=alpha, beta=1.0, label=1, dts=(0.01,), pool="mean", square=1)
    p = (n - w + 1) ** 2
    assert th_mean["positions_P"] == p and th_mean["data_term_scale_q"] == 1 / p
    s, m = th_sum["per_dt"]["0.01"], th_mean["per_dt"]["0.01"]
    assert m["transitioning_window_alpha_min"] == pytest.approx(s["transitioning_window_alpha_min"] / p, rel=1e-12)
    assert m["transitioning_alpha_min"] == pytest.approx(s["transitioning_alpha_min"] / n**2, rel=1e-12)
    # windowed mu_max = P w^2 (closed form): alpha_min = w^2/4 = 4 < alpha (mean), P w^2/4 = 676 > alpha (sum).
    assert m["transitioning_window_alpha_min"] == pytest.approx(w * w / 4, rel=1e-9)
    assert m["transitioning_window_stable"] and not s["transitioning_window_stable"]


def _notes_for(pool, sim, config):
    """The results (with notes) of ``sim`` read as a run under ``pool``: the CLI's own theory and assembly."""
    config = dataclasses.replace(config, pool=pool)
    return nl_exp.build_results(config, sim, nl_exp.config_theory(config))


def test_transitioning_note_appears_only_when_no_dt_is_stable_there(small_sim):
    """Fixed string before: 'so every visit of K*I ~ 0 is unstable'. Now only when the windowed bound says so."""
    phrase = "every visit of K*I ~ 0 is unstable"
    res_sum = _notes_for("sum", small_sim, _SMALL)  # alpha_min = 169 * 16 / 4 = 676 > 20: unstable at every dt
    res_mean = _notes_for("mean", small_sim, _SMALL)  # alpha_min = 16/4 = 4 < 20: stable at 0.01 and 0.03
    assert any(phrase in n for n in res_sum["notes"])
    assert not any(phrase in n for n in res_mean["notes"])
    assert any("stable at dt in [0.01, 0.03]" in n for n in res_mean["notes"])


def test_checkerboard_and_eos_notes_follow_the_numbers(small_sim):

    res = _notes_for("mean", small_sim, _SMALL)
    res["theory"]["checkerboard_minima"] = [
        {"c": 1.0, "logit_g": 1.0, "a": -0.2, "loss": 0.3, "lambda_chi": 50.0, "lambda_max": 50.0, "dt_max": 0.04}
    ]
    per = res["per_dt"]
    for key, cls, ns in (("0.01", "stable", 0.5), ("0.03", "stable", 1.5), ("10", "divergent", 2e3)):
        per[key]["classification"] = cls
        per[key]["evidence"]["max_normalized_sharpness"] = ns
    good = nl_exp.notes(res, _SMALL)
    assert any("Predicted stable: [0.01, 0.03]; simulation stable: [0.01, 0.03] -- agree." in n for n in good)
    assert any("consistent with the paper." in n and "NOT" not in n for n in good if n.startswith("edge"))
    bad = copy.deepcopy(res)
    bad["per_dt"]["0.03"]["classification"] = "restrained"
    bad["per_dt"]["0.03"]["evidence"]["max_normalized_sharpness"] = 1.5  # restrained below 2
    out = nl_exp.notes(bad, _SMALL)
    assert any("-- DISAGREE." in n for n in out)
    assert any("NOT consistent with the paper at [0.03]" in n for n in out)
    assert any(n.startswith("DIFFERENCE FROM THE PAPER: restrained dts [0.03] never") for n in out)
    assert not any("-- agree." in n for n in out)
    # The same restrained dt whose 1-D orbit exceeds 2 only at unsampled steps: a sampling note, no difference.
    bad["checkerboard_orbit"]["0.03"].update(period=2, max_dt_lambda=2.6, max_dt_lambda_sampled=1.5)
    out = nl_exp.notes(bad, _SMALL)
    assert any(n.startswith("restrained dts [0.03] never") and "sampling skips" in n for n in out)
    assert not any(n.startswith("DIFFERENCE FROM THE PAPER: restrained dts [0.03]") for n in out)


def test_one_dimensional_map_is_gradient_descent_on_the_checkerboard():
    """<K_t, chi> of GD on the cnn loss (float64, jax.grad) follows the 1-D map of checkerboard_loss_1d."""
    n, w, alpha, dt, pool = 12, 4, 0.5, 0.3, "mean"
    model = nl.make_model(w, pool=pool, conv_impl="lax", dtype="float64")
    params = model.init(jax.random.key(2), (n, n, 1))["params"]
    batch = nl.make_batch(checkerboard(n, dtype=np.float64), 1, np.float64)
    grad_fn = jax.jit(jax.grad(nl.make_loss_fn(model, alpha)))
    chi = nl.chi(w)
    c = float(np.sum(np.asarray(nl.kernel_of(params)) * chi))
    kw = dict(size=n, kernel=w, alpha=alpha, beta=1.0, label=1, pool=pool)
    for _ in range(15):
        params = jax.tree_util.tree_map(lambda p, g: p - dt * g, params, grad_fn(params, batch))
        c = c - dt * w * w * float(nl.checkerboard_loss_1d(np.asarray(c), **kw)["grad_c"])
        assert float(np.sum(np.asarray(nl.kernel_of(params)) * chi)) == pytest.approx(c, rel=1e-10, abs=1e-12)


def test_one_dimensional_orbit_of_the_paper_setting_near_the_threshold():
    """256x256, w=32, mean: fixed point at dt=0.032 (< 2/lambda* = 0.0323), period 2 at 0.033 whose
    dt*lambda_max exceeds 2 only at odd steps (the even-step samples see 1.52)."""
    orbit = nl.checkerboard_orbit(
        -38.5,
        (0.032, 0.033, 0.11),
        steps=2000,
        window=200,
        sample_every=10,
        size=256,
        kernel=32,
        alpha=20.0,
        beta=1.0,
        label=1,
        pool="mean",
    )
    assert orbit["0.032"]["predicted"] == "stable" and orbit["0.032"]["period"] == 1
    o = orbit["0.033"]
    assert o["predicted"] == "restrained" and o["period"] == 2
    assert o["max_dt_lambda"] > 2 > o["max_dt_lambda_sampled"]
    assert orbit["0.11"]["predicted"] == "divergent"  # dt * alpha = 2.2
