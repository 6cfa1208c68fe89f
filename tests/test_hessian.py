"""Tests of eos_jax.hessian against dense Hessians (jax.hessian + eigh), closed forms and optax.

Networks are tiny plain functions (a tanh MLP and a two-layer single-channel swish CNN in the
spirit of the paper's Sec. 5), so that the dense Hessian is cheap.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

from eos_jax import hessian as hs
from eos_jax.errors import ConfigError

# The tests that compare with dense references up to a tolerance compile with LLVM's backend
# optimizations off: half the compile time, which is most of their time (XLA's own passes, which
# decide the arithmetic, are unchanged). Bitwise comparisons keep the default compilation.
jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# ------------------------------------------------------------------------------------------------
# Tiny models, losses and dense references.


def mlp_params(key, dtype, d_in=6, d_hid=8, d_out=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "l1": {
            "w": jax.random.normal(k1, (d_in, d_hid), dtype) / float(np.sqrt(d_in)),
            "b": jnp.zeros((d_hid,), dtype),
        },
        "l2": {
            "w": jax.random.normal(k2, (d_hid, d_out), dtype) / float(np.sqrt(d_hid)),
            "b": 0.1 * jax.random.normal(k3, (d_out,), dtype),
        },
    }


def mlp_loss(params, batch):
    """Mean squared error of a tanh MLP (a mean over examples)."""
    x, y = batch
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"][None, :])
    out = h @ params["l2"]["w"] + params["l2"]["b"][None, :]
    return jnp.mean(jnp.sum((out - y) ** 2, axis=1))


def mlp_batch(key, dtype, n=16, d_in=6, d_out=3):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d_in), dtype), jax.random.normal(ky, (n, d_out), dtype)


def cnn_params(key, dtype):
    k1, k2 = jax.random.split(key)
    return {
        "conv1": {"k": jax.random.normal(k1, (18,), dtype).reshape(3, 3, 1, 2) / 3, "b": jnp.zeros((2,), dtype)},
        "conv2": {"k": jax.random.normal(k2, (18,), dtype).reshape(3, 3, 2, 1) / 3},
    }


def _conv(x, k):
    return lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST
    )


def cnn_loss(params, batch):
    """Binary cross-entropy of conv-swish-conv-swish-global-pool (one logit), mean over examples."""
    x, y = batch
    h = jax.nn.swish(_conv(x, params["conv1"]["k"]) + params["conv1"]["b"][None, None, None, :])
    h = jax.nn.swish(_conv(h, params["conv2"]["k"]))
    logit = 4 * jnp.mean(h, axis=(1, 2, 3))
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logit, y))


def cnn_batch(key, dtype, n=8):
    kx, ky = jax.random.split(key)
    return jax.random.uniform(kx, (n * 36,), dtype).reshape(n, 6, 6, 1), jax.random.bernoulli(ky, 0.5, (n,)).astype(
        dtype
    )


MODELS = {"mlp": (mlp_params, mlp_loss, mlp_batch), "cnn": (cnn_params, cnn_loss, cnn_batch)}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _dense(loss_fn, flat, batch, unravel):
    return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


def dense_hessian(loss_fn, params, batch):
    """Dense float64 Hessian of the loss at params (cast to float64), and the unravel of params."""
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    b64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), batch)
    flat, unravel = ravel_pytree(p64)
    return np.asarray(_dense(loss_fn, flat, b64, unravel)), unravel


def quad_loss(params, batch):
    """0.5 x^T A x: the Hessian is A exactly (batch = A)."""
    return 0.5 * params["x"] @ (batch @ params["x"])


def quad_problem(eigs, seed=0):
    """Symmetric A with the given spectrum (float64) and a params template."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    a = (q * np.asarray(eigs)[None, :]) @ q.T
    return jnp.asarray((a + a.T) / 2), {"x": jnp.zeros((len(eigs),), jnp.float64)}, q


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def rel_tree(a, b):
    fa, _ = ravel_pytree(a)
    fb, _ = ravel_pytree(b)
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


# ------------------------------------------------------------------------------------------------
# Hessian-vector products.


def test_hvp_matches_dense_hessian_and_finite_differences():
    key = jax.random.key(0)
    p = mlp_params(key, jnp.float64)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float64)
    v = mlp_params(jax.random.fold_in(key, 2), jnp.float64)
    h, unravel = dense_hessian(mlp_loss, p, batch)
    dense_hv = unravel(jnp.asarray(h @ np.asarray(ravel_pytree(v)[0])))
    plain = jit0(functools.partial(hs.hvp, mlp_loss))(p, batch, v)
    lin = jit0(lambda p, b, v: hs.linearized_hvp(mlp_loss, p, b)(v))(p, batch, v)
    assert rel_tree(plain, dense_hv) < 1e-12
    assert rel_tree(lin, dense_hv) < 1e-12
    # Central differences of the gradient: truncation O(eps^2), rounding O(1e-16 / eps).
    eps = 1e-5
    g = jit0(jax.grad(mlp_loss))
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, p, v)  # noqa: E731
    fd = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), g(shift(eps), batch), g(shift(-eps), batch))
    assert rel_tree(fd, plain) < 1e-8


def test_chunked_hvp_and_eigenvalue_equal_unchunked_float32():
    key = jax.random.key(3)
    p = mlp_params(key, jnp.float32)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float32, n=20)
    v = mlp_params(jax.random.fold_in(key, 2), jnp.float32)
    full = hs.hvp(mlp_loss, p, batch, v)
    for cs in (5, 7):  # 4 equal chunks; 2 chunks of 7 and a remainder of 6
        chunked = jax.jit(lambda p, b, v, cs=cs: hs.make_hvp(mlp_loss, p, b, chunk_size=cs)(v))(p, batch, v)
        assert rel_tree(chunked, full) < 1e-6, cs
    f = jax.jit(functools.partial(hs.top_eigenvalue, mlp_loss, num_iters=30), static_argnames="chunk_size")
    e_full = f(p, batch)
    e_chunk = f(p, batch, chunk_size=7)
    assert rel(e_chunk.eigenvalue, e_full.eigenvalue) < 1e-6


# ------------------------------------------------------------------------------------------------
# Top eigenvalue against the dense Hessian.


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_top_eigenvalue_matches_dense(model, dtype, method):
    make_params, loss_fn, make_batch = MODELS[model]
    key = jax.random.key(7)
    p = make_params(key, dtype)
    batch = make_batch(jax.random.fold_in(key, 1), dtype)
    h, _ = dense_hessian(loss_fn, p, batch)
    evals, evecs = np.linalg.eigh(h)
    n = h.shape[0]
    tol = 1e-9 if dtype == jnp.float64 else 1e-5
    num_iters = n if method == "lanczos" else 3000
    res = jit0(lambda p, b: hs.top_eigenvalue(loss_fn, p, b, method=method, num_iters=num_iters, tol=tol))(p, batch)
    bound = 1e-8 if dtype == jnp.float64 else 1e-4
    assert rel(res.eigenvalue, evals[-1]) < bound, (float(res.eigenvalue), evals[-1], evals[0])
    assert res.eigenvector["l1" if model == "mlp" else "conv1"]["b"].dtype == dtype
    assert 0 < int(res.num_hvps) <= num_iters
    # Reported residual vs the true one, and the eigenvector vs the dense one (top is simple here).
    vec = np.asarray(ravel_pytree(res.eigenvector)[0], np.float64)
    true_res = np.linalg.norm(h @ vec - float(res.eigenvalue) * vec)
    assert abs(float(res.residual) - true_res) <= 10 * np.sqrt(bound) * evals[-1]
    assert abs(abs(vec @ evecs[:, -1]) - 1) < 10 * np.sqrt(bound)


def test_dominant_negative_eigenvalue_gives_largest_algebraic():
    a, p, _ = quad_problem([-10.0, -9.0, -3.0, 0.5, 2.0, 4.0, 5.0])
    # The case is meaningful: plain power iteration converges to the most negative eigenvalue.
    v = jnp.ones((7,), jnp.float64) / np.sqrt(7)
    for _ in range(200):
        w = a @ v
        v = w / jnp.linalg.norm(w)
    assert abs(float(v @ (a @ v)) + 10) < 1e-6
    for method, kw in (
        ("power", dict(num_iters=400)),
        ("lanczos", dict(num_iters=7)),
        ("power", dict(num_iters=800, tol=1e-9)),
        ("lanczos", dict(num_iters=7, tol=1e-10)),
    ):
        res = jit0(functools.partial(hs.top_eigenvalue, quad_loss, method=method, **kw))(p, a)
        assert rel(res.eigenvalue, 5.0) < 1e-8, (method, kw, float(res.eigenvalue))
        assert bool(res.converged), (method, kw)


def test_power_budget_never_returns_the_bottom_eigenvalue_as_top():
    """A slowly converging dominant NEGATIVE eigenvalue must not exhaust the budget unshifted.

    With |-10| vs |-9.95| plain power iteration needs thousands of products; before phase 1 was
    capped, tolerance mode spent all of them there and returned ~-10 as the "top" eigenvalue.
    """
    a, p, _ = quad_problem([-10.0, -9.95, 1.0, 2.0, 5.0])
    solve = lambda n, tol: jit0(  # noqa: E731
        functools.partial(hs.top_eigenvalue, quad_loss, method="power", num_iters=n, tol=tol)
    )(p, a)
    short = solve(40, 1e-10)  # phase 2 (shifted, ratio 12/15) gets 20 products: close, not converged
    assert float(short.eigenvalue) > 4.9, float(short.eigenvalue)
    assert not bool(short.converged)
    assert float(short.residual) > 1e-10 * 5.0
    long = solve(400, 1e-10)
    assert rel(long.eigenvalue, 5.0) < 1e-8 and bool(long.converged)
    # Two products (one per phase) cannot converge: the result says so instead of claiming the top.
    assert not bool(solve(2, None).converged)
    # Fixed mode judges convergence against FIXED_MODE_TOL.
    fixed = solve(400, None)
    assert rel(fixed.eigenvalue, 5.0) < 1e-8 and bool(fixed.converged)


def test_repeated_top_eigenvalue():
    eigs = [3.0, 3.0, 3.0, 1.0, 0.5, -2.0, -2.5, 0.0]
    a, p, q = quad_problem(eigs, seed=1)
    top_space = q[:, :3]
    for method in ("lanczos", "power"):
        res = jit0(functools.partial(hs.top_eigenvalue, quad_loss, method=method, num_iters=200, tol=1e-10))(p, a)
        assert rel(res.eigenvalue, 3.0) < 1e-10
        vec = np.asarray(res.eigenvector["x"])
        assert abs(np.linalg.norm(top_space.T @ vec) - 1) < 1e-8  # lies in the 3-dim eigenspace
        assert bool(res.converged)
    # With as many steps as parameters, breakdowns restart Lanczos and the multiplicity is found.
    res = jit0(lambda p, a: hs.top_eigenvalues(quad_loss, p, a, 4, num_iters=8))(p, a)
    np.testing.assert_allclose(np.asarray(res.eigenvalue), [3.0, 3.0, 3.0, 1.0], rtol=1e-10)
    vecs = np.asarray(res.eigenvector["x"])
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(4), atol=1e-10)
    assert np.all(np.asarray(res.residual) < 1e-10)


def test_top_eigenvalues_match_dense_spectrum():
    key = jax.random.key(11)
    p = mlp_params(key, jnp.float64)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float64)
    h, _ = dense_hessian(mlp_loss, p, batch)
    evals = np.linalg.eigvalsh(h)[::-1]
    res = jit0(lambda p, b: hs.top_eigenvalues(mlp_loss, p, b, 3, num_iters=h.shape[0], tol=1e-10))(p, batch)
    np.testing.assert_allclose(np.asarray(res.eigenvalue), evals[:3], rtol=1e-8)
    assert int(res.num_hvps) < h.shape[0]  # stopped by the tolerance before exhausting the space


def test_warm_start_needs_fewer_products():
    """Tracking along a slowly moving GD trajectory: the previous eigenvector is a better start."""
    key = jax.random.key(5)
    p = mlp_params(key, jnp.float64, d_hid=16)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float64, n=32)
    eig = jax.jit(
        lambda p, b, v0: hs.top_eigenvalue(mlp_loss, p, b, num_iters=100, tol=1e-6, v0=v0, key=jax.random.key(9))
    )
    zero = jax.tree_util.tree_map(jnp.zeros_like, p)  # a zero v0 means a cold (random) start
    grad = jax.jit(jax.grad(mlp_loss))
    prev = eig(p, batch, zero)
    cold_counts, warm_counts = [], []
    for _ in range(2):
        for _ in range(5):
            p = jax.tree_util.tree_map(lambda w, g: w - 0.02 * g, p, grad(p, batch))
        cold = eig(p, batch, zero)
        warm = eig(p, batch, prev.eigenvector)
        ref = np.linalg.eigvalsh(dense_hessian(mlp_loss, p, batch)[0])[-1]
        assert rel(cold.eigenvalue, ref) < 1e-6 and rel(warm.eigenvalue, ref) < 1e-6
        cold_counts.append(int(cold.num_hvps))
        warm_counts.append(int(warm.num_hvps))
        prev = warm
    assert sum(warm_counts) < sum(cold_counts), (warm_counts, cold_counts)
    assert max(warm_counts) < min(cold_counts), (warm_counts, cold_counts)


def _eig_with_key(p, b, key, method):
    return hs.top_eigenvalue(mlp_loss, p, b, method=method, num_iters=24, key=key)


@pytest.mark.slow
def test_vmap_over_params_equals_separate_calls():
    key = jax.random.key(2)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float64)
    ps = jax.vmap(lambda k: mlp_params(k, jnp.float64))(jax.random.split(key, 4))
    keys = jax.random.split(jax.random.key(4), 4)
    for method in ("lanczos", "power"):
        f = functools.partial(_eig_with_key, method=method)
        lanes = jit0(jax.vmap(f, in_axes=(0, None, 0)))(ps, batch, keys)
        single = jit0(f)
        for i in range(4):
            one = single(jax.tree_util.tree_map(lambda a: a[i], ps), batch, keys[i])
            assert rel(lanes.eigenvalue[i], one.eigenvalue) < 1e-10, method
            lane_vec = jax.tree_util.tree_map(lambda a: a[i], lanes.eigenvector)
            assert rel_tree(lane_vec, one.eigenvector) < 1e-8, method
            assert int(lanes.num_hvps[i]) == int(one.num_hvps) == 24


# ------------------------------------------------------------------------------------------------
# Per-layer and preconditioned sharpness.


def test_layer_sharpness_equals_dense_diagonal_blocks():
    key = jax.random.key(8)
    p = mlp_params(key, jnp.float64)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float64)
    h, _ = dense_hessian(mlp_loss, p, batch)
    sizes = {name: sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(p[name])) for name in ("l1", "l2")}
    out = jit0(functools.partial(hs.layer_sharpness, mlp_loss, num_iters=60, tol=1e-10))(p, batch)
    assert list(out) == ["['l1']", "['l2']"]
    start = 0
    for name in ("l1", "l2"):
        block = h[start : start + sizes[name], start : start + sizes[name]]
        start += sizes[name]
        assert rel(out[f"['{name}']"].eigenvalue, np.linalg.eigvalsh(block)[-1]) < 1e-8, name
    assert rel(out["['l1']"].eigenvalue, np.linalg.eigvalsh(h)[-1]) > 1e-3  # blocks differ from the whole


def test_adam_preconditioner_matches_optax_update_and_dense_eigenvalue():
    key = jax.random.key(6)
    p = mlp_params(key, jnp.float64)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float64)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    state = opt.init(p)
    step = jax.jit(lambda p, state: opt.update(jax.grad(mlp_loss)(p, batch), state, p))
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int32 and float
        for _ in range(3):
            updates, state = step(p, state)
            p = optax.apply_updates(p, updates)
    adam_state = state[0]
    precond = hs.adam_preconditioner(adam_state.nu, adam_state.count, b1=b1, b2=b2, eps=eps)
    # Adam's last step is exactly -lr * P^-1 m with the raw first-moment EMA m.
    ours = jax.tree_util.tree_map(lambda m, pp: -lr * m / pp, adam_state.mu, precond)
    assert rel_tree(ours, updates) < 1e-12
    h, _ = dense_hessian(mlp_loss, p, batch)
    pflat = np.asarray(ravel_pytree(precond)[0])
    ref = np.max(np.linalg.eigvals(h / pflat[:, None]).real)
    res = jit0(functools.partial(hs.preconditioned_top_eigenvalue, mlp_loss, num_iters=h.shape[0], tol=1e-10))(
        p, batch, precond
    )
    assert rel(res.eigenvalue, ref) < 1e-8
    assert rel(ref, np.linalg.eigvalsh(h)[-1]) > 1e-2  # the preconditioner matters here


def test_stability_thresholds():
    assert hs.stability_threshold("gd") == 2.0
    assert hs.stability_threshold("heavy_ball", beta=0.9) == pytest.approx(3.8)
    assert hs.stability_threshold("nesterov", beta=0.9) == pytest.approx(3.8 / 2.8)
    assert hs.stability_threshold("nesterov", beta=0.0) == 2.0
    assert hs.stability_threshold("adam", beta=0.9) == pytest.approx(38.0)
    with pytest.raises(ConfigError, match="kind must be one of"):
        hs.stability_threshold("sgd")
    with pytest.raises(ConfigError, match=r"beta must be in \[0, 1\)"):
        hs.stability_threshold("heavy_ball", beta=1.0)


def test_bad_options_raise_one_line_errors():
    a, p, _ = quad_problem([1.0, 2.0])
    with pytest.raises(ConfigError, match="method must be one of"):
        hs.top_eigenvalue(quad_loss, p, a, method="arnoldi")
    with pytest.raises(ConfigError, match="num_iters must be a positive int"):
        hs.top_eigenvalue(quad_loss, p, a, num_iters=0)
    with pytest.raises(ConfigError, match="tol must be None"):
        hs.top_eigenvalue(quad_loss, p, a, tol=0.0)
    with pytest.raises(ConfigError, match="chunk_size must be a positive int"):
        hs.make_hvp(quad_loss, p, a, chunk_size=0)
    with pytest.raises(ConfigError, match="k=3 eigenpairs"):
        hs.top_eigenvalues(quad_loss, p, a, 3)
    with pytest.raises(ConfigError, match="one floating dtype"):
        hs.top_eigenvalue(quad_loss, {"x": jnp.zeros((2,), jnp.float32), "y": jnp.zeros((2,), jnp.float64)}, a)


# ------------------------------------------------------------------------------------------------
# Several devices (a child process with 4 host devices).

_MULTI_DEVICE = textwrap.dedent(
    """
    import functools
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from jax.flatten_util import ravel_pytree
    from test_hessian import mlp_params, mlp_loss, mlp_batch
    from eos_jax import hessian as hs
    assert jax.device_count() == 4, jax.devices()
    key = jax.random.key(12)
    p = mlp_params(key, jnp.float32)
    batch = mlp_batch(jax.random.fold_in(key, 1), jnp.float32, n=24)
    v = mlp_params(jax.random.fold_in(key, 2), jnp.float32)
    mesh = hs.data_mesh()
    flat = lambda t: ravel_pytree(t)[0]
    rel = lambda a, b: float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))
    one = jax.jit(functools.partial(hs.hvp, mlp_loss))(p, batch, v)
    dp = lambda cs: jax.jit(functools.partial(hs.data_parallel_hvp, mlp_loss, mesh=mesh, chunk_size=cs))(p, batch, v)
    print("hvp", rel(dp(None), one))
    print("hvp_chunked", rel(dp(4), one))
    f = lambda p, b, mesh: hs.top_eigenvalue(mlp_loss, p, b, num_iters=30, mesh=mesh)
    e1 = jax.jit(lambda p, b: f(p, b, None))(p, batch)
    e4 = jax.jit(lambda p, b: f(p, b, mesh))(p, batch)
    print("eig", abs(float(e4.eigenvalue - e1.eigenvalue)) / float(e1.eigenvalue), int(e4.num_hvps))
    """
)


@pytest.mark.subprocess
def test_four_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    vals = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.stdout.strip().splitlines()}
    assert vals["hvp"][0] < 1e-6 and vals["hvp_chunked"][0] < 1e-6, vals
    assert vals["eig"][0] < 1e-6 and vals["eig"][1] == 30, vals
