"""The fused single-channel stack (conv_impl="fused"): exact against lax.conv, HVPs exact.

Independent references: ``lax.conv_general_dilated`` (XLA's convolution) for values and
gradients, measured in ulps with :func:`eos_jax.metrics.ulp_diff` and against a float64
recomputation; the dense float64 Hessian (``jax.hessian`` of the ``lax`` model) for
Hessian-vector products.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from eos_jax import hessian as hs
from eos_jax import losses, models
from eos_jax.metrics import ulp_diff
from eos_jax.models import fused, layers

KEY = jax.random.key(0)
# Tests against dense references up to a tolerance compile with LLVM's backend optimizations off
# (the same HLO arithmetic, half the compile time; see tests/test_hessian.py).
jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _swish(z):
    return z * jax.nn.sigmoid(z)


def _reference_stack(kernels, x_NHW, pool="mean", padding="valid"):
    """The same network through lax.conv (``impl="lax"``), per example pooled."""
    a = x_NHW
    for k in kernels:
        a = _swish(layers.conv2d_single_channel(a, k, padding=padding, impl="lax"))
    return jnp.mean(a, axis=(1, 2)) if pool == "mean" else jnp.sum(a, axis=(1, 2))


def _ulp_err(x32, ref64) -> np.ndarray:
    """|x32 - ref64| in units of the float32 ulp at ref64."""
    ref = np.asarray(ref64, np.float64)
    spacing = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.abs(np.asarray(x32, np.float64) - ref) / spacing


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_fused_layer_equals_lax_to_float32_rounding(padding):
    # Nonnegative image and kernel: no cancellation, so every correctly ordered sum of the
    # 9 products is within a few ulps of the exact one and of any other order.
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.rand(20, 11, 9), jnp.float32)
    k = jnp.asarray(rs.rand(3, 3), jnp.float32)
    w = jnp.asarray(rs.rand(20, 11 if padding == "same" else 9, 9 if padding == "same" else 7), jnp.float32)

    def run(impl):
        f = lambda kk, xx: layers.conv2d_single_channel(xx, kk, padding=padding, impl=impl)  # noqa: E731
        out = f(k, x)
        gk, gx = jax.grad(lambda kk, xx: jnp.sum(w * f(kk, xx)), (0, 1))(k, x)
        return out, gk, gx

    out, gk, gx = jax.jit(lambda: run("fused"))()
    ref, gk_ref, gx_ref = jax.jit(lambda: run("lax"))()
    d = ulp_diff(out, ref)
    assert d.max_ulp <= 4, d
    assert ulp_diff(gx, gx_ref).max_ulp <= 4
    # dK sums 20 * 99 positive products: summation orders differ by O(sqrt(n)) ulps typically.
    assert ulp_diff(gk, gk_ref).max_ulp <= 64
    # And against float64, the fused result is no worse than lax's plus a couple of ulps.
    out64 = layers.conv2d_single_channel(x.astype(jnp.float64), k.astype(jnp.float64), padding=padding, impl="lax")
    assert _ulp_err(out, out64).max() <= _ulp_err(ref, out64).max() + 2


@pytest.mark.parametrize("pool,n,chunk", [("mean", 40, 16), ("sum", 12, 16), ("sum", 20, 256)])
def test_fused_stack_values_and_gradients_match_lax(pool, n, chunk):
    # n=40, chunk 16: two chunks in the scan and a tail of 8; n=12: the small-batch path;
    # n=20, chunk 256: only the tail.
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.rand(n, 12, 12), jnp.float32)
    ks = tuple(jnp.asarray(0.3 + 0.2 * rs.rand(3, 3), jnp.float32) for _ in range(3))
    y = jnp.asarray(rs.randint(0, 2, n), jnp.int32)

    def loss(stack, kk, xx):
        return losses.binary_cross_entropy(stack(kk, xx), y)

    fz = lambda kk, xx: fused.single_channel_stack(kk, xx, _swish, pool=pool, chunk=chunk)  # noqa: E731
    rf = lambda kk, xx: _reference_stack(kk, xx, pool)  # noqa: E731
    out, (gk, gx) = jax.jit(lambda: (fz(ks, x), jax.grad(functools.partial(loss, fz), (0, 1))(ks, x)))()
    ref, (gk_ref, gx_ref) = jax.jit(lambda: (rf(ks, x), jax.grad(functools.partial(loss, rf), (0, 1))(ks, x)))()
    # Positive kernels and images: activations positive, no cancellation anywhere in the
    # forward; three layers of a few ulps each, and the pooled sum of 36 terms.
    assert ulp_diff(out, ref).max_ulp <= 32
    assert ulp_diff(gx, gx_ref).max_ulp <= 64
    for a, b in zip(gk, gk_ref):
        np.testing.assert_allclose(a, b, rtol=2e-5)
    # float64 references: the fused gradient is as accurate as lax's.
    ks64 = tuple(k.astype(jnp.float64) for k in ks)
    gk64 = jit0(jax.grad(functools.partial(loss, rf), 0))(ks64, x.astype(jnp.float64))
    for a, b, c in zip(gk, gk_ref, gk64):
        err_f = np.max(np.abs(np.asarray(a, np.float64) - np.asarray(c)))
        err_l = np.max(np.abs(np.asarray(b, np.float64) - np.asarray(c)))
        assert err_f <= 4 * err_l + 1e-7 * float(np.max(np.abs(c)))


def test_fused_forward_is_bitwise_independent_of_chunking():
    # Each example's arithmetic is the same whatever chunk it falls in: outputs equal bitwise.
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(48, 10, 10), jnp.float32)
    ks = tuple(jnp.asarray(rs.randn(3, 3), jnp.float32) for _ in range(3))
    outs = [
        jax.jit(lambda kk, xx, c=c: fused.single_channel_stack(kk, xx, _swish, chunk=c))(ks, x) for c in (16, 32, 48)
    ]
    assert ulp_diff(outs[0], outs[1]).n_diff == 0 and ulp_diff(outs[0], outs[2]).n_diff == 0


def test_fused_model_matches_lax_model():
    m_auto = models.get("cnn", layers=3, conv_impl="fused")
    assert m_auto.info["conv_impl_per_layer"] == ["fused"] * 3
    m_lax = models.get("cnn", layers=3, conv_impl="lax")
    m_sh = models.get("cnn", layers=3, conv_impl="shifted")
    v = jax.jit(lambda k: m_auto.init(k, (14, 14, 1)))(KEY)  # compiled: eagerly every op of init compiles
    # Same parameter tree and the same initial values as the per-layer implementations.
    for other in (m_lax, m_sh):
        vo = jax.jit(lambda k, m=other: m.init(k, (14, 14, 1)))(KEY)
        assert jax.tree_util.tree_structure(vo) == jax.tree_util.tree_structure(v)
        assert all(
            ulp_diff(a, b).n_diff == 0 for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(vo))
        )
    x = jax.random.uniform(jax.random.key(5), (30 * 14 * 14,), jnp.float32).reshape(30, 14, 14, 1)
    out = jax.jit(lambda v_, x_: m_auto.apply(v_, x_, train=True)[0])(v, x)
    ref = jax.jit(lambda v_, x_: m_lax.apply(v_, x_, train=True)[0])(v, x)
    assert out.shape == ref.shape == (30, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def _cnn_loss(model):
    def loss(params, batch):
        return losses.binary_cross_entropy(model.apply({"params": params}, batch["x"], train=True)[0], batch["y"])

    return loss


@pytest.mark.slow
def test_fused_hvp_matches_dense_hessian_and_jvp_of_grad():
    # float64, 20 examples of 9x9: the model (chunk 256, the tail path only) by jvp(grad), and the
    # stack with chunk 8 (two chunks in the scan and a tail of 4) by jax.linearize. Two layers: the
    # last layer's backward carries dx on to the first, which only needs dK (the two roles a
    # deeper stack's layers play).
    rs = np.random.RandomState(3)
    batch = {"x": jnp.asarray(rs.rand(20, 9, 9, 1)), "y": jnp.asarray(rs.randint(0, 2, 20), jnp.int32)}
    m_f = models.get("cnn", layers=2, conv_impl="fused", dtype="float64")
    m_l = models.get("cnn", layers=2, conv_impl="lax", dtype="float64")
    params = jit0(lambda k: m_f.init(k, (9, 9, 1))["params"])(KEY)
    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jit0(jax.hessian(lambda f: _cnn_loss(m_l)(unravel(f), batch)))(flat))
    v = unravel(jnp.asarray(rs.randn(flat.shape[0])))
    want = dense @ np.asarray(ravel_pytree(v)[0])
    loss_f = _cnn_loss(m_f)
    plain = ravel_pytree(jit0(lambda p, b, t: hs.hvp(loss_f, p, b, t))(params, batch, v))[0]
    np.testing.assert_allclose(plain, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())

    def loss_chunked(p, b):
        ks = [p[f"conv{i}"]["kernel"][:, :, 0, 0] for i in range(2)]
        g = fused.single_channel_stack(ks, b["x"][..., 0], _swish, chunk=8)
        return losses.binary_cross_entropy(g[:, None], b["y"])

    lin = ravel_pytree(jit0(lambda p, b, t: hs.linearized_hvp(loss_chunked, p, b)(t))(params, batch, v))[0]
    np.testing.assert_allclose(lin, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(lin, plain, rtol=1e-12, atol=1e-14 * np.abs(want).max())
    # Top eigenvalue through Lanczos on the fused model equals the dense one.
    lam = jit0(lambda p, b: hs.top_eigenvalue(loss_f, p, b, num_iters=18, tol=None).eigenvalue)(params, batch)
    assert abs(float(lam) - np.linalg.eigvalsh(dense)[-1]) <= 1e-10 * abs(np.linalg.eigvalsh(dense)).max()


def test_fused_vmaps_over_lanes():
    rs = np.random.RandomState(4)
    x = jnp.asarray(rs.rand(40, 10, 10), jnp.float32)
    ks = tuple(jnp.asarray(rs.randn(2, 3, 3), jnp.float32) for _ in range(3))  # 2 lanes
    g = jax.jit(
        jax.vmap(
            jax.grad(lambda kk, xx: jnp.sum(fused.single_channel_stack(kk, xx, _swish, chunk=16))), in_axes=(0, None)
        )
    )(ks, x)
    for lane in range(2):
        kl = tuple(k[lane] for k in ks)
        one = jax.jit(jax.grad(lambda kk, xx: jnp.sum(fused.single_channel_stack(kk, xx, _swish, chunk=16))))(kl, x)
        for a, b in zip(g, one):
            np.testing.assert_allclose(a[lane], b, rtol=1e-5)
