"""Beltrami GD (4): the GD step is the PDE's forward Euler, the CFL bound, and the stated classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eos_jax.errors import ConfigError
from eos_jax.pde import beltrami
from experiments.pde import beltrami as beltrami_exp

F64 = jnp.float64


def test_gradient_descent_step_is_forward_euler_of_the_pde():
    n, lam, delta = 32, 50.0, 0.1
    dx = 1.0 / n
    key = jax.random.key(0)
    u = jax.random.normal(key, (n,), F64)
    sig = jax.random.normal(jax.random.fold_in(key, 1), (n,), F64)
    g = np.asarray(jax.grad(beltrami.loss)(u, sig, lam=lam, delta=delta, dx=dx))
    p = np.diff(np.asarray(u)) / dx
    flux = np.concatenate([[0.0], p / np.sqrt(p * p + delta * delta), [0.0]])  # free (Neumann) ends
    rhs = lam * (np.asarray(sig) - np.asarray(u)) + np.diff(flux) / dx  # PDE (4) right-hand side
    np.testing.assert_allclose(-g, rhs, rtol=1e-12, atol=1e-12 * np.abs(rhs).max())


def test_strict_bound_and_hessian_bound():
    n, lam, delta = 32, 10.0, 0.2
    dx = 1.0 / n
    dt = beltrami.strict_step_bound(lam=lam, delta=delta, dx=dx)
    assert dt == 1.0 / (lam + 2.0 / (delta * dx * dx))
    # At a flat u the loss Hessian is lam I + (1/(delta dx^2)) * (free-end Laplacian): its largest
    # eigenvalue is below lam + 4/(delta dx^2), so GD is stable at dt_strict (2/lam_max > dt_strict).
    hess = jax.jit(jax.hessian(lambda u, f: beltrami.loss(u, f, lam=lam, delta=delta, dx=dx)))
    h = np.asarray(hess(jnp.zeros(n, F64), jnp.zeros(n, F64)))
    lam_max = np.linalg.eigvalsh(h)[-1]
    assert lam_max < lam + 4 / (delta * dx * dx)
    assert dt < 2 / lam_max < 2.01 * dt


def test_classifier_rule():
    ok = np.ones(20)
    kw = dict(window=0.1, divergence_factor=10.0, oscillation_tol=1e-6)
    assert beltrami.classify(ok, np.full(20, 1e-9), np.zeros(3), 1.0, **kw) == "stable"
    assert beltrami.classify(ok, np.full(20, 1e-3), np.zeros(3), 1.0, **kw) == "restrained"
    assert beltrami.classify(ok * 11, np.full(20, 1e-9), np.zeros(3), 1.0, **kw) == "divergent"
    assert beltrami.classify(ok, np.full(20, np.nan), np.zeros(3), 1.0, **kw) == "divergent"


def test_small_runs_stable_at_bound_divergent_when_fidelity_is_unstable(tmp_path):
    # lam dt = 2.6 > 2 at 500x: the fidelity term alone diverges.
    cfg = beltrami.BeltramiConfig(multiples=(1.0, 500.0), points=32, steps=4000, lam=5000.0, delta=0.1, record_every=20)
    res = beltrami_exp.run_beltrami(cfg, tmp_path / "run")
    assert res["runs"]["1.0"]["classification"] == "stable"
    assert res["runs"]["500.0"]["classification"] == "divergent"
    for f in ("config.json", "metadata.json", "results.json", "figure2.png"):
        assert (tmp_path / "run" / f).is_file()
    with pytest.raises(ConfigError, match="delta"):
        beltrami.BeltramiConfig(delta=-1.0).validate()


def test_notes_check_the_bound_against_the_run():
    """The 'cannot blow up' note sets each run's max|u| beside the bound; a contradiction is printed as one."""
    cfg = beltrami.BeltramiConfig(multiples=(1.0, 10.0, 500.0), points=32, lam=5000.0)
    dx, smax = 1.0 / 32, 1.2
    bound = smax + 2.0 / (cfg.lam * dx)
    runs = {
        "1.0": {"dt": 1e-4, "classification": "stable", "max_abs_u": 1.1},
        "10.0": {"dt": 1.5e-4, "classification": "restrained", "max_abs_u": 1.15},
        "500.0": {"dt": 5e-4, "classification": "divergent", "max_abs_u": 1e30},
    }
    notes = beltrami_exp._notes(runs, cfg, smax, dx)
    assert "none diverges, as the bound says" in notes[0] and f"bound {bound:.4g}: yes" in notes[0]
    assert notes[1].startswith("multiples 500.0: lambda*dt >= 2") and "500.0 x: divergent" in notes[1]
    runs["10.0"].update(classification="divergent", max_abs_u=50.0)
    notes = beltrami_exp._notes(runs, cfg, smax, dx)
    assert "CONTRADICTED at ['10.0']" in notes[0] and "none diverges" not in notes[0]
    assert f"bound {bound:.4g}: NO" in notes[0]
