"""Tests of eos_jax.eigen, the one flat-vector eigen-solver, against dense eigh and closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eos_jax import eigen
from eos_jax.errors import ConfigError


def _sym(n: int, seed: int, *, psd: bool) -> np.ndarray:
    """A random symmetric matrix (PSD when asked: ``B B^T``) with a clear top gap."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, n))
    return b @ b.T if psd else 0.5 * (b + b.T)


def _op(a: np.ndarray):
    aj = jnp.asarray(a)
    return lambda v: jnp.dot(aj, v, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("seed", [0, 1])
def test_power_iteration_top_matches_eigh_both_signs(seed):
    a = _sym(12, seed, psd=False)
    ev = np.linalg.eigvalsh(a)
    for m in (a, -a):  # -a: the dominant eigenvalue may be negative, so phase 2 needs the shift
        ref = np.linalg.eigvalsh(m)[-1]
        v0 = eigen.start_vector(None, jax.random.key(seed), 12, jnp.float64)
        st, top = eigen.power_iteration(_op(m), v0, 4000, 1e-11)
        assert bool(top)
        assert math.isclose(float(st.lam), ref, rel_tol=1e-9, abs_tol=1e-9 * np.abs(ev).max())
        np.testing.assert_allclose(
            float(st.res),
            np.linalg.norm(m @ np.asarray(st.vec) - float(st.lam) * np.asarray(st.vec)),
            rtol=1e-6,
            atol=1e-13,
        )


def test_lanczos_top_k_matches_eigh():
    a = _sym(20, 3, psd=False)
    ev = np.sort(np.linalg.eigvalsh(a))[::-1]
    v0 = eigen.start_vector(None, jax.random.key(0), 20, jnp.float64)
    theta, vecs, res, n = jax.jit(lambda v, k: eigen.lanczos(_op(a), v, k, 20, None, 3))(v0, jax.random.key(1))
    np.testing.assert_allclose(np.asarray(theta), ev[:3], rtol=1e-10, atol=1e-10 * np.abs(ev).max())
    for i in range(3):
        v = np.asarray(vecs[i])
        assert np.linalg.norm(a @ v - ev[i] * v) <= 1e-8 * np.abs(ev).max()
    assert int(n) == 20


def test_psd_extremes_match_eigh():
    a = _sym(15, 5, psd=True)
    ev = np.linalg.eigvalsh(a)
    key1, key2 = jax.random.split(jax.random.key(2))
    e = eigen.psd_extremes(
        _op(a),
        jax.random.normal(key1, (15,), jnp.float64),
        jax.random.normal(key2, (15,), jnp.float64),
        tol=1e-12,
        max_iters=200000,
    )
    assert math.isclose(e.mu_max, ev[-1], rel_tol=1e-10)
    assert abs(e.mu_min - ev[0]) <= 1e-9 * ev[-1]
    assert e.residual_max <= 1e-12 and e.residual_min <= 1e-12
    assert 1 <= e.iters_max <= 200000 and 1 <= e.iters_min <= 200000


def test_psd_extremes_closed_form_rank_one():
    # u u^T: eigenvalues ||u||^2 (once) and 0; power iteration converges in one product.
    u = np.arange(1.0, 9.0)
    a = np.outer(u, u)
    e = eigen.psd_extremes(_op(a), jnp.ones(8, jnp.float64), jnp.asarray(np.cos(np.arange(8.0))), tol=1e-12)
    assert math.isclose(e.mu_max, float(u @ u), rel_tol=1e-13)
    assert abs(e.mu_min) <= 1e-12 * float(u @ u)


def test_psd_extremes_rejects_bad_options():
    op = _op(np.eye(3))
    v = jnp.ones(3, jnp.float64)
    with pytest.raises(ConfigError, match="tol"):
        eigen.psd_extremes(op, v, v, tol=0.0)
    with pytest.raises(ConfigError, match="max_iters"):
        eigen.psd_extremes(op, v, v, max_iters=1)
