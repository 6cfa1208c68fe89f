"""Linearized CNN PDE (10): operators vs lax.conv / jax.grad / dense eigh, amplifiers, and thresholds.

Shapes are tiny (images up to 20 x 20) so the whole file runs in seconds.
"""

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eos_jax.errors import ConfigError
from eos_jax.pde import linear
from eos_jax.pde.common import checkerboard
from experiments.pde import linear as linear_exp

F64 = jnp.float64


def _image(n, seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, n), F64))


def _dense(op, w):
    """Matrix of the linear map op on w x w kernels (columns = op(basis))."""
    eye = jnp.eye(w * w, dtype=F64).reshape(w * w, w, w)
    return np.asarray(jax.vmap(op)(eye).reshape(w * w, w * w)).T


def test_windowed_operator_is_adjoint_composition_of_valid_correlation():
    img = jnp.asarray(_image(12))
    w = 4
    op = jax.jit(linear.make_windowed_operator(img, w))
    k = jax.random.normal(jax.random.key(1), (w, w), F64)
    r, vjp = jax.vjp(lambda kk: linear.valid_correlation(kk, img), k)
    assert r.shape == (12 - w + 1, 12 - w + 1)
    (ref,) = vjp(r)  # C^T C K
    np.testing.assert_allclose(op(k), ref, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(ref))))
    # Valid correlation is sum_z K(z) I(x+z) (no flip), checked at one position by hand.
    x = (3, 5)
    manual = sum(float(k[i, j] * img[x[0] + i, x[1] + j]) for i in range(w) for j in range(w))
    assert math.isclose(float(r[x]), manual, rel_tol=1e-12)


@pytest.mark.parametrize("pool,ibar", [("sum", "mean"), ("sum", "sum"), ("mean", "mean")])
def test_step_gradient_equals_jax_grad_of_linearized_loss(pool, ibar):
    img = jnp.asarray(_image(10, seed=2) + 0.3)  # nonzero sum so the Ibar term is exercised
    w, a, beta, alpha = 3, -0.5, 1.5, 0.7
    q = linear.data_scale(pool, (10 - w + 1) ** 2)
    op = linear.scaled_operator(linear.make_windowed_operator(img, w), q)
    k = jax.random.normal(jax.random.key(3), (w, w), F64)
    g = jax.grad(linear.linearized_loss)(k, img, a=a, beta=beta, alpha=alpha, pool=pool, ibar=ibar)
    dt = 1e-3
    step = linear.make_step(op, linear.image_bar(img, ibar), scheme="gd", dt=dt, a=a, beta=beta)
    new = step(linear.SchemeState(k, k), jnp.asarray(alpha, F64)).kernel
    np.testing.assert_allclose((k - new) / dt, g, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(g))))


def _linear_py_gradient(kernel, image, a, beta, alpha, *, divide_by_positions=False):
    """The gradient of the authors' single_layer/linear.py, written out in NumPy float64.

    ``0.5 a (mean(I) + beta sum_x (K * I)(x) I(x + z)) + alpha K``: im2col of the valid
    windows, the data term a dot product over ALL output positions (no division), Ibar the
    image mean. ``divide_by_positions`` divides the data term by their number (a mean pooling).
    """
    w = kernel.shape[0]
    h = image.shape[0] - w + 1
    cols = np.stack([image[m : m + w, n : n + w].reshape(-1) for m in range(h) for n in range(h)], axis=1)
    conv = kernel.reshape(1, -1) @ cols
    data = (conv @ cols.T).reshape(w, w) / (h * h if divide_by_positions else 1)
    return 0.5 * a * (np.mean(image) + beta * data) + alpha * kernel


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_linear_scheme_gradient_matches_the_authors_linear_py(pool):
    """Default reading (pool="sum", ibar="mean") is linear.py's gradient; pool="mean" divides its data term by P."""
    n, w, a, beta, alpha, dt = 12, 4, -0.5, 1.0, 2.0, 1e-3
    img = _image(n, seed=11) + 0.4  # mean(I) != 0
    k = np.asarray(jax.random.normal(jax.random.key(12), (w, w), F64))
    ref = _linear_py_gradient(k, img, a, beta, alpha, divide_by_positions=pool == "mean")
    cfg = linear.LinearConfig(kernels=(w,), dt=dt, size=n, pool=pool)
    assert cfg.ibar == "mean"
    q = linear.data_scale(pool, (n - w + 1) ** 2)
    op = linear.scaled_operator(linear.make_windowed_operator(img, w), q)
    step = linear.make_step(op, linear.image_bar(img, cfg.ibar), scheme="gd", dt=dt, a=a, beta=beta)
    got = k - np.asarray(step(linear.SchemeState(jnp.asarray(k), jnp.asarray(k)), jnp.asarray(alpha, F64)).kernel)
    np.testing.assert_allclose(got / dt, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    auto = np.asarray(
        jax.grad(linear.linearized_loss)(jnp.asarray(k), jnp.asarray(img), a=a, beta=beta, alpha=alpha, pool=pool)
    )
    np.testing.assert_allclose(auto, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    # linear.py's printed alpha_min, 0.25 max|fft2(I)|^2, is (14) with the sum (a = -1/2, beta = 1).
    assert linear.theory_bounds(img, scheme="gd", dt=dt, a=a, beta=beta)[0] == pytest.approx(
        0.25 * np.max(np.abs(np.fft.fft2(img)) ** 2), rel=1e-12
    )


def test_power_iteration_extremes_match_dense_eigh():
    img = _image(14, seed=4)
    w = 4
    op = linear.make_windowed_operator(img, w)
    m = _dense(op, w)
    np.testing.assert_allclose(m, m.T, atol=1e-9 * np.abs(m).max())
    ev = np.linalg.eigvalsh(m)
    eig = linear.operator_extremes(op, (w, w), jax.random.key(0), tol=1e-12)
    assert math.isclose(eig.mu_max, ev[-1], rel_tol=1e-9)
    assert abs(eig.mu_min - ev[0]) <= 1e-6 * ev[-1]


def test_checkerboard_window_spectrum_closed_form():
    n, w = 24, 6
    op = linear.make_windowed_operator(checkerboard(n), w)
    eig = linear.operator_extremes(op, (w, w), jax.random.key(1))
    cf_min, cf_max = linear.checkerboard_window_extremes(n, w)
    assert math.isclose(eig.mu_max, cf_max, rel_tol=1e-10)
    assert abs(eig.mu_min - cf_min) <= 1e-9 * cf_max
    # Its periodic DFT: a single spike n^2 at Nyquist, so min |I_hat|^2 = 0 and max = n^4.
    spec = np.asarray(linear.image_spectrum(checkerboard(n)))
    assert spec.max() == float(n) ** 4 and spec[n // 2, n // 2] == float(n) ** 4
    assert np.sort(spec.ravel())[-2] < 1e-12 * n**4


def test_nesterov_coefficients_from_momentum():
    dt, m = 1e-4, 0.9
    d, s = linear.nesterov_coefficients(dt, m)
    assert math.isclose((2 - d * dt) / (2 + d * dt), m, rel_tol=1e-14)
    assert math.isclose(d, (2 - 2 * 0.9) / (dt * (1 + 0.9)), rel_tol=1e-14)  # Appendix E.2
    assert math.isclose(s, 0.95 * dt * dt, rel_tol=1e-14)
    # The exact bound tends to the paper's (18) 4/(3 dt^2) as m -> 1, and is 4/(2.8 dt^2) at m = 0.9.
    assert math.isclose(linear.z_bound("nesterov", dt, 0.9), 4 / (2.8 * dt * dt), rel_tol=1e-14)
    assert math.isclose(
        linear.z_bound("nesterov", dt, 1 - 1e-9), linear.z_bound("nesterov", dt, form="paper"), rel_tol=1e-8
    )


@pytest.mark.parametrize("scheme", ["gd", "nesterov"])
def test_amplifier_crosses_one_exactly_at_the_z_bound(scheme):
    dt, m = 1e-2, 0.9
    zmax = linear.z_bound(scheme, dt, m)
    z = jnp.asarray([1e-9 * zmax, 0.5 * zmax, (1 - 1e-6) * zmax, -1e-6 * zmax, (1 + 1e-6) * zmax], F64)
    mod = np.abs(np.asarray(linear.amplifier(z, scheme=scheme, dt=dt, momentum=m)))
    assert np.all(mod[:3] < 1) and np.all(mod[3:] > 1)


def _single_mode(n, m1, m2):
    i = np.arange(n, dtype=np.float64)
    return jnp.asarray(np.cos(2 * np.pi * (m1 * i[:, None] + m2 * i[None, :]) / n))


def test_periodic_growth_factor_per_fourier_mode_equals_amplifier():
    n = 16
    img = _image(n, seed=5)
    spec = np.asarray(linear.image_spectrum(img))
    a, beta, alpha = -0.5, 1.0, 300.0
    op = linear.make_periodic_operator(img)
    ibar = float(np.sum(img))
    modes = [(1, 0), (2, 3), (5, 7), (8, 8), (3, 13)]
    for scheme, dt in (("gd", 1e-3), ("nesterov", 3e-2)):
        step = jax.jit(linear.make_step(op, ibar, scheme=scheme, dt=dt, a=a, beta=beta, momentum=0.9))
        al = jnp.asarray(alpha, F64)
        for m1, m2 in modes:
            phi = _single_mode(n, m1, m2)
            z = alpha + 0.5 * a * beta * spec[m1, m2]
            amp = complex(linear.amplifier(jnp.asarray(z, F64), scheme=scheme, dt=dt, momentum=0.9))
            nn = float(jnp.vdot(phi, phi))
            proj = lambda k: float(jnp.vdot(phi, k)) / nn  # noqa: E731
            if scheme == "gd":
                new = step(linear.SchemeState(phi, phi), al).kernel
                # The Ibar forcing only touches the constant mode, orthogonal to phi.
                g = proj(new)
                assert abs(g - amp.real) <= 1e-6 * abs(amp.real), (m1, m2, g, amp)
                resid = new - g * phi - (new.mean())
                assert float(jnp.max(jnp.abs(resid))) <= 1e-9
            else:
                # Measure the 2x2 transfer matrix of the mode from two single steps, then its eigenvalues.
                zero = jnp.zeros_like(phi)
                ibar0 = linear.make_step(op, 0.0, scheme=scheme, dt=dt, a=a, beta=beta, momentum=0.9)
                c1 = proj(ibar0(linear.SchemeState(phi, zero), al).kernel)
                c2 = proj(ibar0(linear.SchemeState(zero, phi), al).kernel)
                lam = np.linalg.eigvals(np.array([[c1, c2], [1.0, 0.0]]))
                meas = lam[np.argmax(np.abs(lam))]
                assert abs(abs(meas) - abs(amp)) <= 1e-6 * abs(amp), (m1, m2, meas, amp)


@pytest.mark.parametrize("scheme,dt,momentum", [("gd", 2e-3, 0.9), ("nesterov", 4e-2, 0.9), ("nesterov", 4e-2, 0.99)])
def test_periodic_simulated_threshold_equals_theory_bound(scheme, dt, momentum):
    n = 12
    img = _image(n, seed=6)
    a, beta = -0.5, 1.0
    op = linear.make_periodic_operator(img)
    step = linear.make_step(op, float(np.sum(img)), scheme=scheme, dt=dt, a=a, beta=beta, momentum=momentum)
    k0 = jax.random.normal(jax.random.key(7), (n, n), F64)
    steps = 2400 if momentum > 0.95 else 800
    test = linear.make_instability_test(step, steps)
    s = dt if scheme == "gd" else linear.nesterov_coefficients(dt, momentum)[1]
    scale = 1.0 / dt if scheme == "gd" else 0.5 / s
    bis = linear.bisect_bounds(test, k0, scale=scale, rel_tol=1e-4)
    th_min, th_max = linear.theory_bounds(img, scheme=scheme, dt=dt, a=a, beta=beta, momentum=momentum)
    assert 0 < th_min < th_max
    assert abs(bis["alpha_min"] - th_min) <= 0.01 * th_min
    assert abs(bis["alpha_max"] - th_max) <= 0.01 * th_max
    if scheme == "nesterov":
        pa_min, pa_max = linear.theory_bounds(
            img, scheme=scheme, dt=dt, a=a, beta=beta, momentum=momentum, form="paper"
        )
        assert pa_min == th_min
        if momentum == 0.99:  # (18) as printed is the m -> 1 limit: within 1% at m = 0.99 ...
            assert abs(bis["alpha_max"] - pa_max) <= 0.01 * pa_max
        else:  # ... but about 7% low at the Table 9 momentum 0.9.
            assert bis["alpha_max"] > 1.05 * pa_max


@pytest.mark.parametrize("scheme,dt", [("gd", 2e-3), ("nesterov", 4e-2)])
def test_windowed_spectral_threshold_agrees_with_bisection(scheme, dt):
    n, w = 20, 5
    img = _image(n, seed=8)
    a, beta, m = -0.5, 1.0, 0.9
    op = linear.make_windowed_operator(img, w)
    eig = linear.operator_extremes(op, (w, w), jax.random.key(9))
    sp_min, sp_max = linear.alpha_bounds(eig.mu_min, eig.mu_max, scheme=scheme, dt=dt, a=a, beta=beta, momentum=m)
    step = linear.make_step(op, float(np.sum(img)), scheme=scheme, dt=dt, a=a, beta=beta, momentum=m)
    k0 = jax.random.normal(jax.random.key(10), (w, w), F64)
    s = dt if scheme == "gd" else linear.nesterov_coefficients(dt, m)[1]
    bis = linear.bisect_bounds(
        linear.make_instability_test(step, 800), k0, scale=1.0 / s if scheme == "gd" else 0.5 / s, rel_tol=1e-4
    )
    assert 0 < sp_min < sp_max
    assert abs(bis["alpha_min"] - sp_min) <= 0.02 * sp_min
    assert abs(bis["alpha_max"] - sp_max) <= 0.02 * sp_max


def test_checkerboard_windowed_thresholds_closed_form_and_bisection():
    """Table 2 setting in miniature: 32 x 32 checkerboard, w = 8, GD, dt chosen so the band is open."""
    n, w, dt, a = 32, 8, 1e-5, -0.5
    img = checkerboard(n)
    cf_min, cf_max = linear.checkerboard_window_extremes(n, w)
    th = linear.alpha_bounds(cf_min, cf_max, scheme="gd", dt=dt, a=a, beta=1.0)
    assert th == (0.25 * (n - w + 1) ** 2 * w * w, 2 / dt)
    step = linear.make_step(linear.make_windowed_operator(img, w), 0.0, scheme="gd", dt=dt, a=a, beta=1.0)
    k0 = jax.random.normal(jax.random.key(11), (w, w), F64)
    bis = linear.bisect_bounds(linear.make_instability_test(step, 400), k0, scale=1 / dt, rel_tol=1e-4)
    assert abs(bis["alpha_min"] - th[0]) <= 0.02 * th[0]
    assert abs(bis["alpha_max"] - th[1]) <= 0.02 * th[1]


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="scheme"):
        linear.z_bound("adam", 1e-3)
    with pytest.raises(ConfigError, match="momentum"):
        linear.nesterov_coefficients(1e-3, 1.0)
    with pytest.raises(ConfigError, match="dt"):
        linear.LinearConfig(dt=0.0).validate()
    with pytest.raises(ConfigError, match="kernel size"):
        linear.LinearConfig(kernels=(0,)).validate()
    with pytest.raises(ConfigError, match="kernel size"):
        linear.make_windowed_operator(np.zeros((8, 8)), 9)


# ----------------------------------------------------------- thresholds under the mean


def test_mean_pooling_thresholds_windowed_spectral_periodic_and_bisection():
    """pool="mean": M -> M/P. Spectral and bisection thresholds agree (windowed), the periodic
    theory with |I_hat|^2/n^2 matches the simulated periodic threshold, and the mean problem
    at (dt P, alpha/P) is the sum problem at (dt, alpha)."""
    n, w, a, beta = 20, 5, -0.5, 1.0
    img = _image(n, seed=8)
    p = (n - w + 1) ** 2
    dt = 2e-3 * p  # same dt * z as the sum test at 2e-3
    op = linear.scaled_operator(linear.make_windowed_operator(img, w), linear.data_scale("mean", p))
    eig = linear.operator_extremes(op, (w, w), jax.random.key(9))
    sp_min, sp_max = linear.alpha_bounds(eig.mu_min, eig.mu_max, scheme="gd", dt=dt, a=a, beta=beta)
    sum_eig = linear.operator_extremes(linear.make_windowed_operator(img, w), (w, w), jax.random.key(9))
    su_min, su_max = linear.alpha_bounds(sum_eig.mu_min, sum_eig.mu_max, scheme="gd", dt=2e-3, a=a, beta=beta)
    assert sp_min == pytest.approx(su_min / p, rel=1e-9) and sp_max == pytest.approx(su_max / p, rel=1e-9)
    step = linear.make_step(op, linear.image_bar(img, "mean"), scheme="gd", dt=dt, a=a, beta=beta)
    k0 = jax.random.normal(jax.random.key(10), (w, w), F64)
    bis = linear.bisect_bounds(linear.make_instability_test(step, 800), k0, scale=1.0 / dt, rel_tol=1e-4)
    assert 0 < sp_min < sp_max
    assert abs(bis["alpha_min"] - sp_min) <= 0.02 * sp_min
    assert abs(bis["alpha_max"] - sp_max) <= 0.02 * sp_max
    # Periodic: theory_bounds(pool="mean") against the simulated periodic scheme with M/n^2.
    m = 12
    pimg = _image(m, seed=6)
    pdt = 2e-3 * m * m
    pop = linear.scaled_operator(linear.make_periodic_operator(pimg), 1.0 / (m * m))
    pstep = linear.make_step(pop, linear.image_bar(pimg, "mean"), scheme="gd", dt=pdt, a=a, beta=beta)
    pk0 = jax.random.normal(jax.random.key(7), (m, m), F64)
    pbis = linear.bisect_bounds(linear.make_instability_test(pstep, 800), pk0, scale=1.0 / pdt, rel_tol=1e-4)
    th_min, th_max = linear.theory_bounds(pimg, scheme="gd", dt=pdt, a=a, beta=beta, pool="mean")
    assert 0 < th_min < th_max
    assert abs(pbis["alpha_min"] - th_min) <= 0.01 * th_min
    assert abs(pbis["alpha_max"] - th_max) <= 0.01 * th_max


def test_checkerboard_windowed_thresholds_under_the_mean():
    """Pixel checkerboard, pool="mean": alpha_min = (1/4) w^2 (closed form (n-w+1)^2 w^2 / P), found by bisection."""
    n, w, a = 32, 8, -0.5
    p = (n - w + 1) ** 2
    dt = 1e-5 * p
    cf_min, cf_max = linear.checkerboard_window_extremes(n, w)
    th = linear.alpha_bounds(cf_min / p, cf_max / p, scheme="gd", dt=dt, a=a, beta=1.0)
    assert th[0] == pytest.approx(0.25 * w * w, rel=1e-12) and th[1] == 2 / dt
    op = linear.scaled_operator(linear.make_windowed_operator(checkerboard(n), w), 1.0 / p)
    step = linear.make_step(op, 0.0, scheme="gd", dt=dt, a=a, beta=1.0)
    k0 = jax.random.normal(jax.random.key(11), (w, w), F64)
    bis = linear.bisect_bounds(linear.make_instability_test(step, 400), k0, scale=1 / dt, rel_tol=1e-4)
    assert abs(bis["alpha_min"] - th[0]) <= 0.02 * th[0]
    assert abs(bis["alpha_max"] - th[1]) <= 0.02 * th[1]


# ------------------------------------------------------------------------------ notes


@pytest.fixture(scope="module")
def tiny_linear_run(tmp_path_factory):
    """A tiny run_linear (checkerboard 16x16, w = 3, 4) whose results the note tests edit."""
    cfg = linear.LinearConfig(kernels=(3, 4), dt=1e-5, size=16, bisect_steps=64, rel_tol=1e-3, plot_steps=10)
    return cfg, linear_exp.run_linear(cfg, tmp_path_factory.mktemp("lin") / "run")


def test_closed_form_note_says_matched_only_when_it_matches(tiny_linear_run):

    cfg, res = tiny_linear_run
    assert res["pool"] == "sum" and res["ibar"] == "mean" and "linear.py" in res["reading"]
    for e in res["kernels"].values():
        assert e["rel_diff_mu_max_power_vs_closed_form"] <= linear_exp.MATCH_RTOL
    note = next(n for n in res["notes"] if n.startswith("windowed mu_max"))
    assert "-- matched" in note and "NOT matched" not in note
    bad = copy.deepcopy(res)
    bad["kernels"]["4"]["rel_diff_mu_max_power_vs_closed_form"] = 1e-3
    out = linear_exp._notes(bad, cfg)
    note = next(n for n in out if n.startswith("windowed mu_max"))
    assert "NOT matched" in note and "w=4: 1.00e-03" in note
    assert not any(n.startswith("largest windowed alpha_min") for n in out)  # rests on the match
    assert any(n.startswith("largest windowed alpha_min") and "no kernel size reaches (14)" in n for n in res["notes"])


def test_nesterov_note_names_the_bound_the_simulation_follows(tiny_linear_run):

    cfg, res = tiny_linear_run
    ncfg = dataclasses.replace(cfg, scheme="nesterov", dt=1e-2)
    r = copy.deepcopy(res)
    r["z_bound_exact"], r["z_bound_paper"] = (
        linear.z_bound("nesterov", 1e-2),
        linear.z_bound("nesterov", 1e-2, form="paper"),
    )
    for e in r["kernels"].values():
        e["alpha_max_spectral"], e["alpha_max_spectral_paper_formula"] = 14285.7, 13333.3
    for e in r["kernels"].values():
        e["alpha_max_empirical"] = 14280.0  # near the exact bound
    note = next(n for n in linear_exp._notes(r, ncfg) if n.startswith("Nesterov"))
    assert "the simulation follows the exact bound at w in ['3', '4']" in note
    for e in r["kernels"].values():
        e["alpha_max_empirical"] = 13330.0  # near the printed (18)
    note = next(n for n in linear_exp._notes(r, ncfg) if n.startswith("Nesterov"))
    assert "follows the exact bound" not in note
