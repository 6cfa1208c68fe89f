"""Tests of eos_jax.hessian.trace and .density against dense Hessians (jax.hessian + eigh).

The references are independent of the code under test: the dense Hessian of a tiny tanh MLP in
float64, its eigenvalues and powers, Hutchinson's exact variance, and the probes drawn as the
docstrings specify (``jax.random.rademacher(jax.random.fold_in(key, i), (n,))``).

The params carry a leaf the loss does not use, so the Hessian has a zero eigenvalue of multiplicity
4 besides the MLP's 32 (distinct) eigenvalues: every probe's Krylov space is invariant after 33 of
its 36 Lanczos steps, and the 3 restarted rows find that eigenvalue again (the case where they must
not count in the quadrature). Compilation is most of this file's time: each jitted program is built
once at module level and reused across tests and asserts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from eos_jax import hessian as hs
from eos_jax.errors import ConfigError

DTYPES = (jnp.float32, jnp.float64)
N = 36  # 3*5 + 5 + 5*2 + 2 MLP parameters and 4 unused ones
KRYLOV = 33  # the MLP's 32 eigenvalues and 0
# Compilation is most of this file's time; LLVM's backend optimizations off halve it (the programs
# run in milliseconds either way, and XLA's own passes, which decide the arithmetic, are unchanged).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def mlp_params(rng, dtype):
    """Params drawn with numpy (no per-shape JAX compilations), rounded to ``dtype``."""
    leaves = {
        "l1": {"w": rng.normal(size=(3, 5)), "b": 0.1 * rng.normal(size=5)},
        "l2": {"w": rng.normal(size=(5, 2)) / np.sqrt(5.0), "b": np.zeros(2)},
        "unused": np.ones(4),
    }
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), leaves)


def mlp_loss(params, batch):
    """Mean squared error of a tanh MLP 3-5-2 (a mean over examples, indefinite Hessian)."""
    x, y = batch
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"][None, :])
    out = h @ params["l2"]["w"] + params["l2"]["b"][None, :]
    return jnp.mean(jnp.sum((out - y) ** 2, axis=1))


def problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
    return mlp_params(rng, dtype), (jnp.asarray(x, dtype), jnp.asarray(y, dtype))


@jit
def _dense_hessian(p64, b64):
    flat, unravel = ravel_pytree(p64)
    return jax.hessian(lambda f: mlp_loss(unravel(f), b64))(flat)


@functools.cache
def dense(dtype):
    """The float64 Hessian at the (dtype-rounded) params and data, and its eigenvalues (ascending)."""
    p64, b64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), problem(dtype))
    h = np.asarray(_dense_hessian(p64, b64))
    return h, np.linalg.eigvalsh(h)


@jit
def _draw(key):
    return jax.vmap(lambda i: jax.random.rademacher(jax.random.fold_in(key, i), (N,), jnp.float32))(jnp.arange(400))


def probes(key, count):
    """Probes 0..count-1 as the docstrings specify, in float64. JAX draws the same signs in every
    float dtype (from float32 uniforms), so one program serves both dtypes."""
    return np.asarray(_draw(key), np.float64)[:count]


def moments(r, q):
    """Each probe's quadrature of x^q, ``sum_i w_i theta_i^q``, in float64."""
    return np.sum(np.asarray(r.weights, np.float64) * np.asarray(r.ritz_values, np.float64) ** q, axis=-1)


# One compiled program per (function, dtype), shared by the tests below.
NUM_PROBES, NUM_STEPS = 4, 40  # num_steps >= n: m = n = 36 Lanczos steps per probe
trace_fn = jit(lambda p, b, key: hs.trace(mlp_loss, p, b, key, num_probes=400))
density_fn = jit(lambda p, b, key: hs.density(mlp_loss, p, b, key, num_probes=NUM_PROBES, num_steps=NUM_STEPS, top_k=3))
# Tolerances of quantities that are exact in exact arithmetic, relative to ||H||^p: the float32 runs
# measured <= 4e-7 (moments) and 3e-7 (top eigenvalues); float64 <= 1e-15. About 20x margin.
EXACT_TOL = {jnp.float32: 1e-5, jnp.float64: 1e-12}


@pytest.mark.parametrize("dtype", DTYPES)
def test_trace_of_a_diagonal_hessian_is_exact(dtype):
    # z_i^2 = 1 for Rademacher z, so every probe gives sum_i d_i = 8; the d_i and their partial sums
    # are exact in float32, and 8 equal samples average exactly: exact equality, zero spread.
    d = jnp.asarray([3.0, -1.5, 0.25, 2.0, 5.0, -0.75], dtype)
    chunk = 3 if dtype == jnp.float32 else None  # 3 at a time (lax.map, a remainder of 2); one vmap
    loss = lambda p, b: 0.5 * jnp.sum(b * p["w"] ** 2)  # noqa: E731  (Hessian diag(d))
    tr = jit(lambda p, b, key: hs.trace(loss, p, b, key, num_probes=8, probe_chunk=chunk))
    r = tr({"w": jnp.ones((6,), dtype)}, d, jax.random.key(1))
    assert float(r.estimate) == 8.0 and r.estimate.dtype == dtype
    assert float(r.stderr) == 0.0 and r.samples.tolist() == [8.0] * 8
    assert int(r.num_hvps) == 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_trace_matches_dense_within_its_standard_error(dtype):
    h, _ = dense(dtype)
    key = jax.random.key(5)
    r = trace_fn(*problem(dtype), key)
    assert int(r.num_hvps) == 400 and r.samples.shape == (400,)
    # Each sample is z^T H z of the documented probe (the dtype's HVP rounding: ~1e-6 in float32).
    zs = probes(key, 400)
    ref = np.einsum("pi,ij,pj->p", zs, h, zs)
    np.testing.assert_allclose(np.asarray(r.samples, np.float64), ref, rtol=0, atol=1e-5 * np.abs(h).sum())
    # 4 standard errors: a correct estimator fails with probability 6e-5 (the key is fixed).
    assert abs(float(r.estimate) - np.trace(h)) < 4 * float(r.stderr)
    # Hutchinson's variance with Rademacher probes, 2 (||H||_F^2 - sum_i H_ii^2): the sample standard
    # deviation of 400 draws is within ~4% of it (one standard deviation), so 0.8-1.25 is ~6 of them.
    exact_sd = np.sqrt(2 * (np.sum(h * h) - np.sum(np.diag(h) ** 2)))
    assert 0.8 < float(r.stderr) * np.sqrt(400) / exact_sd < 1.25


@pytest.mark.parametrize("dtype", DTYPES)
def test_density_quadrature_is_exact_on_an_invariant_krylov_space(dtype):
    h, evals = dense(dtype)
    key = jax.random.key(3)
    r = density_fn(*problem(dtype), key)
    assert r.ritz_values.shape == r.weights.shape == (NUM_PROBES, N) and int(r.num_hvps) == NUM_PROBES * N
    assert r.krylov_dim.tolist() == [KRYLOV] * NUM_PROBES
    nodes, weights = np.asarray(r.ritz_values, np.float64), np.asarray(r.weights, np.float64)
    assert np.all(weights[:, KRYLOV:] == 0), "restarted rows must not count"
    assert np.all(weights >= 0) and np.all(np.diff(nodes, axis=1) <= 0)
    tol, scale = EXACT_TOL[dtype], np.max(np.abs(evals))
    vs = probes(key, NUM_PROBES) / np.sqrt(N)
    powers = [np.linalg.matrix_power(h, q) for q in range(6)]
    for q in range(6):  # an invariant Krylov space: sum_i w_i theta_i^q = v^T H^q v for every q
        ref = np.einsum("pi,ij,pj->p", vs, powers[q], vs)
        np.testing.assert_allclose(moments(r, q), ref, rtol=0, atol=tol * scale**q, err_msg=q)
    # The probe average estimates tr(H^q) / n; its standard error from Hutchinson's exact variance of
    # z^T A z (A = H^q, v = z / sqrt(n)); 5 of them (the key is fixed).
    for q in (1, 2, 3):
        a = powers[q]
        se = np.sqrt(2 * (np.sum(a * a) - np.sum(np.diag(a) ** 2)) / NUM_PROBES) / N
        assert abs(moments(r, q).mean() - np.trace(a) / N) < 5 * se, q
    # The top Ritz values are the top eigenvalues (the Krylov space holds their eigenvectors).
    np.testing.assert_allclose(np.asarray(r.top_eigenvalues, np.float64), evals[::-1][:3], rtol=0, atol=tol * scale)
    if dtype == jnp.float64:  # one more compilation, in one dtype
        top = jit(lambda p, b: hs.top_eigenvalue(mlp_loss, p, b, num_iters=N))(*problem(dtype))
        assert abs(float(top.eigenvalue) - float(r.top_eigenvalues[0])) < tol * scale
    # The smoothed density: the probe average of sum_i w_i N(x; theta_i, sigma^2), integrating to 1.
    x, s = np.asarray(r.grid, np.float64), float(r.sigma)
    ref = np.exp(-0.5 * ((x[:, None] - nodes.reshape(1, -1)) / s) ** 2) @ weights.reshape(-1)
    ref /= NUM_PROBES * s * np.sqrt(2 * np.pi)
    np.testing.assert_allclose(np.asarray(r.density, np.float64), ref, rtol=1e-4, atol=1e-6 * ref.max())
    assert abs(np.trapezoid(ref, x) - 1) < 1e-3  # 5 sigma of padding leaves 6e-7 outside
    assert x[0] <= nodes.min() - 4.9 * s and x[-1] >= nodes.max() + 4.9 * s


def test_vmap_over_lanes_with_a_mesh_equals_separate_plain_calls():
    # Two parameter sets (lanes) with a key each, as a training engine vmaps them, each run sharded
    # over the available devices (one in this process) and computed another way (through one
    # linearization; with each shard summed in chunks of 5 examples, 12 = 5 + 5 + 2): equal to the
    # plain single calls up to float32 rounding (a vmapped lane runs a batched program, not bitwise the
    # lone one). Tolerances, relative to each quantity's scale: 1e-5 (measured <= 1e-6); the density
    # moves by a node's shift over sigma, so 1e-4 of its peak; a single weight of two close nodes moves
    # by rounding / gap (the closest are 2e-3 apart: ~3e-5 measured), so the weights are compared
    # through the quadrature's moments sum_i w_i theta_i^q (q <= 3, well conditioned) and at 1e-3.
    (p0, b), (p1, _) = problem(jnp.float32), problem(jnp.float32, seed=1)
    mesh = hs.data_mesh()
    if 12 % mesh.shape["data"]:
        pytest.skip("the 12 examples do not split over this process's devices")

    def other_way(p, b, k):
        t = hs.trace(mlp_loss, p, b, k, num_probes=400, mesh=mesh, linearize=True)
        d = hs.density(mlp_loss, p, b, k, num_probes=NUM_PROBES, num_steps=NUM_STEPS, top_k=3, mesh=mesh, chunk_size=5)
        return t, d

    ps = jax.tree_util.tree_map(lambda a, c: jnp.stack([a, c]), p0, p1)
    keys = jnp.stack([jax.random.key(3), jax.random.key(4)])
    lanes = jit(jax.vmap(other_way, in_axes=(0, None, 0)))(ps, b, keys)
    assert lanes[1].ritz_values.shape == (2, NUM_PROBES, N) and lanes[1].grid.shape == (2, 1000)
    for i, p in enumerate((p0, p1)):
        for lane, one in zip(lanes, (trace_fn(p, b, keys[i]), density_fn(p, b, keys[i]))):
            for field in one._fields:
                want = np.asarray(getattr(one, field), np.float64)
                rel = {"density": 1e-4, "weights": 1e-3}.get(field, 1e-5)
                got = np.asarray(getattr(lane, field)[i], np.float64)
                tol = rel * max(np.max(np.abs(want)), 1.0)
                np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"lane {i} {field}")
        want = density_fn(p, b, keys[i])
        got = jax.tree_util.tree_map(lambda a, i=i: a[i], lanes[1])
        scale = np.max(np.abs(np.asarray(want.ritz_values)))
        for q in range(4):
            np.testing.assert_allclose(moments(got, q), moments(want, q), rtol=0, atol=1e-5 * scale**q, err_msg=q)


def test_bad_options_raise_one_line_errors():
    p, b = problem(jnp.float32)
    key = jax.random.key(0)
    bad = [
        lambda: hs.trace(mlp_loss, p, b, key, num_probes=0),
        lambda: hs.trace(mlp_loss, p, b, key, probe_chunk=0),
        lambda: hs.density(mlp_loss, p, b, key, num_probes=1, num_steps=0),
        lambda: hs.density(mlp_loss, p, b, key, num_probes=1, num_steps=4, top_k=5),
        lambda: hs.density(mlp_loss, p, b, key, num_probes=1, num_steps=4, sigma=-1.0),
        lambda: hs.density(mlp_loss, p, b, key, num_probes=1, num_steps=4, grid=jnp.zeros((2, 2))),
    ]
    for f in bad:
        with pytest.raises(ConfigError) as err:
            f()
        assert "\n" not in str(err.value)
