"""Heat scheme (2): amplifier vs the scheme's matrix, decay at r = 0.4, blow-up at r = 0.8, per-mode growth."""

import numpy as np
import pytest

from eos_jax.errors import ConfigError
from eos_jax.pde import heat
from experiments.pde import heat as heat_exp


def _scheme_matrix(k, r):
    return np.eye(k) * (1 - 2 * r) + r * (np.eye(k, k=1) + np.eye(k, k=-1))


def test_amplifier_is_the_spectrum_of_the_scheme_and_sines_are_its_eigenvectors():
    k, r = 11, 0.8
    mat = _scheme_matrix(k, r)
    amp = heat.amplifier(r, k)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(mat)), np.sort(amp), rtol=0, atol=1e-13)
    s = heat.sine_basis(k)
    np.testing.assert_allclose(mat @ s, s * amp[None, :], atol=1e-13)  # column m is phi_m
    np.testing.assert_allclose(s @ s, (k + 1) / 2 * np.eye(k), atol=1e-12)


def test_cfl_bound_on_ratio():
    for k in (5, 29, 101):
        assert np.max(np.abs(heat.amplifier(0.5 - 1e-9, k))) < 1
        assert np.max(np.abs(heat.amplifier(0.5 + 1e-2, k))) > 1 or k < 10
    assert heat.cfl_ratio_bound() == 0.5


@pytest.mark.parametrize("ratio", [0.4, 0.8])
def test_decay_blowup_growth_factors_and_first_growing_mode(ratio):
    cfg = heat.HeatConfig(ratios=(ratio,), points=29, length=30.0, steps=120)
    res = heat.analyze(cfg, ratio)
    amp = np.asarray(res["amplifier"])
    # Measured per-mode growth equals A_m (least squares over all steps, modes above rounding level).
    meas = np.array([np.nan if g is None else g for g in res["measured_growth"]])
    used = np.isfinite(meas)
    assert used.sum() >= 10
    np.testing.assert_allclose(meas[used], amp[used], rtol=1e-7)
    if ratio == 0.4:
        assert res["behaviour"] == "decays" and np.max(np.abs(amp)) < 1
        assert res["max_abs_u_final"] < 0.5 * res["max_abs_u_initial"]
        assert res["first_mode_to_grow"] is None
    else:
        assert res["behaviour"] == "blows up"
        assert res["max_abs_u_final"] > 1e20 * res["max_abs_u_initial"]
        largest = int(np.argmax(np.abs(amp))) + 1
        assert largest == 29  # the highest frequency, A = 1 - 4r cos^2(pi/(2(K+1)))
        assert res["first_mode_to_grow"] == largest == res["predicted_first_mode_to_grow"]


def test_scheme_matches_dense_matrix_power():
    k, r, n = 9, 0.8, 15
    u0 = heat.triangle(k, 10.0)
    hist = np.asarray(heat.simulate(u0, r, n))
    np.testing.assert_allclose(hist[-1], np.linalg.matrix_power(_scheme_matrix(k, r), n) @ u0, rtol=1e-12)


def test_run_heat_writes_run_dir(tmp_path):
    res = heat_exp.run_heat(heat.HeatConfig(steps=60), tmp_path / "run")
    for f in ("config.json", "metadata.json", "results.json", "figure1.png"):
        assert (tmp_path / "run" / f).is_file()
    assert res["runs"]["0.4"]["behaviour"] == "decays" and res["runs"]["0.8"]["behaviour"] == "blows up"
    with pytest.raises(ConfigError, match="ratios"):
        heat.HeatConfig(ratios=(0.0,)).validate()
