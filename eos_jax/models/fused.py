"""The whole single-channel CNN stack fused per batch chunk, in a batch-minor layout.

``"fused"`` is the fourth implementation behind ``conv_impl`` (see
:mod:`eos_jax.models.layers`). For the paper's N-layer single-channel CNN (Eq. (20)-(21):
``F_i(I) = r(K_i * I)`` followed by the global pooling of Eq. (6)/(20)) it computes the
per-example pooled value ``g_n = pool_x F(I_n)(x)`` with

* the same arithmetic per output as ``"shifted"``: ``K[i, j] * x[i:i+Ho, j:j+Wo]`` added
  in row-major tap order (so the forward agrees with ``lax.conv`` to float32 rounding);
* a *batch-minor* layout ``(H, W, n)``: every shifted slice is a contiguous block of
  ``n`` examples, so each tap is one aligned vector loop (in ``(N, H, W)`` the loops run
  along rows of 26 or 24 floats and waste a quarter of every vector);
* all layers of ``CHUNK`` examples at a time, forward and backward, inside one
  :func:`jax.lax.scan`: no array of the full batch except the input is ever written.
  On the shared 2-core VM this is what matters most: a step of the unfused
  implementations writes about 0.9 GB of fresh temporaries per step, and each fresh page
  costs a page fault (~8 us here, 226,000 faults per step measured with ``getrusage``);
  the chunk's arrays (about 4 MB) are reused from one chunk to the next and stay in cache.

The backward pass is hand-written at the level of the stack (a :func:`jax.custom_vjp`
whose backward recomputes each chunk's forward and runs its VJP, accumulating the kernel
gradients chunk by chunk, so nothing of the forward is stored), and each convolution's VJP
is the hand-written shifted-slice one (``dx`` a full correlation with the flipped kernel,
``dK[i, j] = sum g * x[i:i+Ho, j:j+Wo]``), which reuses the activations of the chunk.
Second order (Hessian-vector products, ``jvp`` of the gradient) is automatic: the tangent
of the backward scan is again one scan over chunks with primal and tangent fused.

Cost of second order: a Hessian-vector product through this stack (``jvp`` of the backward
scan) measured 7.8 gradients (``jvp(grad)``) and 38 gradients through ``jax.linearize``
(2,000 images, benchmarks/bench_main.py), against 1.8 for ``"shifted"`` then (1.1-1.16 now,
12,000 images); ``"auto"`` therefore keeps ``"shifted"`` for the main job, which tracks
sharpness. A hand-written second-order pass per chunk (forward and backward tangents in the
same chunk loop as the primal) is what is missing.

Rounding: the gradient sums over the batch chunk by chunk (a fixed ``CHUNK``), which
differs from a sum over the whole batch in the last bits only; the result is a pure
function of the inputs (deterministic). Batches smaller than :data:`MIN_BATCH` are run
in the ``(N, H, W)`` layout without chunking (a batch-minor vector of one example wastes
the vector unit), with the same arithmetic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from eos_jax.models import shifted
from eos_jax.models.layers import conv2d_single_channel

Array = jax.Array

# Examples per chunk: the chunk's activations of a 3-layer 28x28 stack are about 2.5 MB
# (they stay in cache) while each tap loop still runs over 256 contiguous floats. Measured
# on the shared 2-core VM (CPU seconds of the gradient of 12,000 images, load ~10): chunks
# of 64, 256 and 1024 took 0.44, 0.48 and 0.66 s. The chunk fixes the order in which the
# kernel gradient is summed, so it is a constant, not a tuning knob of a run.
CHUNK = 256
# Below this batch size the (N, H, W) layout is used (no chunking).
MIN_BATCH = 16


def _valid(x: Array, k: Array) -> Array:
    """Valid cross-correlation over the two leading axes (batch-minor) as shifted slices."""
    return shifted.valid(x, k, "HWN")


def _conv(x: Array, k: Array) -> Array:
    """:func:`_valid` with the hand-written VJP of :mod:`eos_jax.models.shifted`."""
    return shifted.conv(x, k, "HWN")


def _sum_hw(a: Array) -> Array:
    """Sum over the two leading axes as row slices added in order (vectorized over the rest).

    XLA's CPU reduction over the major axes of a batch-minor array is about 7x slower
    than this chain of adds (1.78 s vs 0.25 s CPU for the forward of 11,776 images).
    """
    acc = a[0]
    for h in range(1, a.shape[0]):
        acc = acc + a[h]
    out = acc[0]
    for w in range(1, acc.shape[0]):
        out = out + acc[w]
    return out


@jax.custom_vjp
def _pool_sum(a: Array) -> Array:
    """``sum_{h, w} a[h, w, ...]`` with the VJP a broadcast (autodiff would add padded slices)."""
    return _sum_hw(a)


def _pool_sum_fwd(a: Array):
    return _sum_hw(a), a.shape[:2]


def _pool_sum_bwd(hw, g: Array):
    return (jnp.broadcast_to(g, hw + g.shape),)


_pool_sum.defvjp(_pool_sum_fwd, _pool_sum_bwd)


def _pads(padding: str, kernel_size: Sequence[int]) -> list[tuple[int, int]]:
    """Per spatial axis (low, high) padding, as :func:`eos_jax.models.layers._pad_amounts`."""
    if padding == "valid":
        return [(0, 0) for _ in kernel_size]
    return [((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel_size]


def _stack_hwn(
    kernels: Sequence[Array], x_HWN: Array, act: Callable[[Array], Array], pool: str, padding: str, custom: bool
) -> Array:
    """Pooled output ``(n,)`` of the stack on a batch-minor ``(H, W, n)`` chunk.

    ``custom``: use the hand-written VJPs (inside the backward pass). The forward values are
    computed without them: that code is traced under an outer ``jvp`` when a Hessian-vector
    product is taken, and a ``custom_vjp`` function cannot be ``jvp``-ed.
    """
    conv, pool_sum = (_conv, _pool_sum) if custom else (_valid, _sum_hw)
    a = x_HWN
    for k in kernels:
        if padding == "same":
            a = jnp.pad(a, _pads(padding, k.shape) + [(0, 0)])
        a = act(conv(a, k))
    s = pool_sum(a)
    return s / jnp.asarray(a.shape[0] * a.shape[1], s.dtype) if pool == "mean" else s


def _chunk_pooled(kernels, x_NHW, act, pool, padding, custom=False):
    """Pooled output ``(n,)`` of one chunk given in ``(n, H, W)`` (transposed here, in cache)."""
    return _stack_hwn(kernels, jnp.transpose(x_NHW, (1, 2, 0)), act, pool, padding, custom)


def _chunk(x_NHW: Array, i: Array, chunk: int) -> Array:
    """Chunk ``i`` (``chunk`` examples) read in place from the full batch (no copy of the batch)."""
    return lax.dynamic_slice_in_dim(x_NHW, i * chunk, chunk, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _stack(kernels, x_NHW, act, pool, padding, chunk):
    """Pooled outputs ``(N,)``, chunk by chunk (see the module docstring)."""
    return _stack_values(kernels, x_NHW, act, pool, padding, chunk)


def _stack_values(kernels, x_NHW, act, pool, padding, chunk):
    """Forward over the chunks: a scan over full chunks, then the remainder."""
    n = x_NHW.shape[0]
    c, r = divmod(n, chunk)
    outs = []
    if c:
        # Chunks are cut inside the loop by dynamic slices of x (slicing x[:c*chunk] first
        # would copy the batch into a fresh buffer).
        body = lambda i: _chunk_pooled(kernels, _chunk(x_NHW, i, chunk), act, pool, padding)  # noqa: E731
        outs.append(lax.map(body, jnp.arange(c, dtype=jnp.int32)).reshape(-1))
    if r:
        outs.append(_chunk_pooled(kernels, x_NHW[c * chunk :], act, pool, padding))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def _stack_fwd(kernels, x_NHW, act, pool, padding, chunk):
    """Forward: saves only the kernels and the input (the backward recomputes per chunk)."""
    ks = tuple(k.value for k in kernels)
    x = x_NHW.value
    out = _stack_values(ks, x, act, pool, padding, chunk)
    # The residual's structure says (statically) whether the input's cotangent is needed.
    return out, (ks, x, () if x_NHW.perturbed else None)


def _stack_bwd(act, pool, padding, chunk, res, g):
    """Backward: per chunk, recompute the forward and apply its VJP; sum the kernel cotangents."""
    ks, x, want_dx = res
    want_dx = want_dx is not None
    n = x.shape[0]
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((n,), x.dtype)
    c, r = divmod(n, chunk)

    def one(xc, gc):
        _, vjp = jax.vjp(lambda kk, xx: _chunk_pooled(kk, xx, act, pool, padding, True), ks, xc)
        return vjp(gc)

    dks = tuple(jnp.zeros_like(k) for k in ks)
    dx_parts = []
    if c:

        def step(acc, i):
            d, dxc = one(_chunk(x, i, chunk), lax.dynamic_slice_in_dim(g, i * chunk, chunk))
            return tuple(a + b for a, b in zip(acc, d)), (dxc if want_dx else None)

        dks, dx_body = lax.scan(step, dks, jnp.arange(c, dtype=jnp.int32))
        if want_dx:
            dx_parts.append(dx_body.reshape((-1,) + x.shape[1:]))
    if r:
        d, dxt = one(x[c * chunk :], g[c * chunk :])
        dks = tuple(a + b for a, b in zip(dks, d))
        if want_dx:
            dx_parts.append(dxt)
    dx = None
    if want_dx:
        dx = dx_parts[0] if len(dx_parts) == 1 else jnp.concatenate(dx_parts)
    return dks, dx


_stack.defvjp(_stack_fwd, _stack_bwd, symbolic_zeros=True)


def _stack_small(kernels, x_NHW, act, pool, padding):
    """Small batches: the same stack on ``(N, H, W)`` with the ``"shifted"`` layers."""
    a = x_NHW
    for k in kernels:
        a = act(conv2d_single_channel(a, k, padding=padding, impl="shifted"))
    return jnp.mean(a, axis=(1, 2)) if pool == "mean" else jnp.sum(a, axis=(1, 2))


def single_channel_stack(
    kernels: Sequence[Array],
    x_NHW: Array,
    act: Callable[[Array], Array],
    *,
    pool: str = "mean",
    padding: str = "valid",
    chunk: int = CHUNK,
) -> Array:
    """Pooled output of ``r(K_L * ... r(K_1 * I))`` per example (Eq. (20)-(21), Eq. (6) pooling).

    Args:
      kernels: the layers' ``(kh, kw)`` kernels, first layer first, one dtype.
      x_NHW: inputs ``(N, H, W)``, same dtype.
      act: the elementwise activation ``r`` (a hashable function: it is a static argument).
      pool: ``"mean"`` or ``"sum"`` over the output positions.
      padding: ``"valid"`` or ``"same"`` for every layer.
      chunk: examples per chunk (static).

    Returns:
      ``(N,)`` pooled values.

    Examples:
      Two layers of the delta kernel (a 1 at the centre) and ``tanh`` on images of ones:
      every pooled value is ``tanh(tanh(1))``, here computed in two chunks of 8 examples:

      >>> import math
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.fused import single_channel_stack
      >>> delta = jnp.zeros((3, 3)).at[1, 1].set(1.0)
      >>> f = jax.jit(lambda ks, x: single_channel_stack(ks, x, jnp.tanh, chunk=8))
      >>> g = f([delta, delta], jnp.ones((16, 6, 6)))
      >>> g.shape, bool(jnp.allclose(g, math.tanh(math.tanh(1.0))))
      ((16,), True)
    """
    kernels = tuple(kernels)
    if x_NHW.shape[0] < MIN_BATCH:
        return _stack_small(kernels, x_NHW, act, pool, padding)
    return _stack(kernels, x_NHW, act, pool, padding, int(chunk))
