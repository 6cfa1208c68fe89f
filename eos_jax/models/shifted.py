"""The shifted-slice convolution of the paper's single-channel CNN, with its hand-written VJP.

One cross-correlation for both memory layouts of :mod:`eos_jax.models`: ``"NHW"`` (examples
first; :func:`eos_jax.models.layers.conv2d_single_channel` with ``impl="shifted"``) and
``"HWN"`` (batch-minor; :mod:`eos_jax.models.fused`). The forward adds ``K[i, j]`` times the
slice of the input shifted by ``(i, j)`` in row-major tap order; the VJP is the full
correlation of the cotangent with the flipped kernel (``dx``, again shifted slices: autodiff
would transpose each slice into a zero-padded full-size array and add ``kh*kw`` of them; this
form fuses into one loop like the forward, about 30 % faster per GD step of the 3-layer CNN)
and ``dK[i, j] = sum(g * x_ij)``, one full reduction per tap. The kernel gradient is the one
part that differs by layout: :func:`kernel_grad_nhw` carries a one-pass tangent rule for
Hessian-vector products; :func:`kernel_grad_hwn` reduces flattened products (the layout's
fast reduction under ``vmap``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
LAYOUTS = ("NHW", "HWN")


def _spatial(layout: str) -> int:
    """The first of the two spatial axes of ``layout``."""
    return 1 if layout == "NHW" else 0


def valid(x: Array, k: Array, layout: str = "NHW") -> Array:
    """Valid cross-correlation as ``kh*kw`` shifted, scaled slices added in row-major tap order.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.models.shifted import valid
      >>> x = jnp.arange(16.0).reshape(1, 4, 4); k = jnp.array([[1.0, 0.0], [0.0, -1.0]])
      >>> valid(x, k).tolist() == valid(jnp.transpose(x, (1, 2, 0)), k, "HWN").transpose(2, 0, 1).tolist()
      True
      >>> valid(x, k)[0, 0].tolist()  # x[p, q] - x[p+1, q+1]
      [-5.0, -5.0, -5.0]
    """
    kh, kw = k.shape
    s = _spatial(layout)
    ho, wo = x.shape[s] - kh + 1, x.shape[s + 1] - kw + 1
    lead = (slice(None),) * s
    acc = None
    for i in range(kh):
        for j in range(kw):
            term = k[i, j] * x[(*lead, slice(i, i + ho), slice(j, j + wo))]
            acc = term if acc is None else acc + term
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: Array, k: Array, layout: str = "NHW") -> Array:
    """:func:`valid` with the hand-written VJP of the module docstring.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.shifted import conv, valid
      >>> x = jnp.arange(32.0).reshape(2, 4, 4) / 10; k = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> f = lambda x, k: jnp.sum(conv(x, k) ** 2); g = lambda x, k: jnp.sum(valid(x, k) ** 2)
      >>> all(bool(jnp.allclose(a, b)) for a, b in zip(jax.grad(f, (0, 1))(x, k), jax.grad(g, (0, 1))(x, k)))
      True
    """
    return valid(x, k, layout)


def _conv_fwd(x: Array, k: Array, layout: str):
    """Forward pass saving the inputs."""
    return valid(x, k, layout), (x, k)


def _conv_bwd(layout: str, res, g: Array):
    """``dx``: full correlation of ``g`` with the flipped kernel; ``dK[i, j] = sum g * x_ij``."""
    x, k = res
    kh, kw = k.shape
    s = _spatial(layout)
    pad = [(0, 0)] * s + [(kh - 1, kh - 1), (kw - 1, kw - 1)] + [(0, 0)] * (g.ndim - 2 - s)
    dx = valid(jnp.pad(g, pad), k[::-1, ::-1], layout)
    dk = kernel_grad_nhw(g, x, (kh, kw)) if layout == "NHW" else kernel_grad_hwn(g, x, kh, kw)
    return dx, dk


conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def kernel_grad_nhw(g_NHW: Array, x_NHW: Array, shape: tuple[int, int]) -> Array:
    """``dK[i, j] = sum(g * x[:, i:i+Ho, j:j+Wo])``: one full reduction per tap (the gradient's bits).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.models.shifted import kernel_grad_nhw
      >>> g = jnp.ones((1, 2, 2)); x = jnp.arange(9.0).reshape(1, 3, 3)
      >>> kernel_grad_nhw(g, x, (2, 2)).tolist()  # the sum of each 2x2 window's shifted input
      [[8.0, 12.0], [20.0, 24.0]]
    """
    kh, kw = shape
    ho, wo = g_NHW.shape[1], g_NHW.shape[2]
    return jnp.stack(
        [jnp.stack([jnp.sum(g_NHW * x_NHW[:, i : i + ho, j : j + wo]) for j in range(kw)]) for i in range(kh)]
    )


@kernel_grad_nhw.defjvp
def _kernel_grad_jvp(shape: tuple[int, int], primals: tuple[Array, Array], tangents: tuple[Array, Array]):
    """Tangent ``sum(dg * x_ij + g * dx_ij)`` of every tap in one pass over ``g, dg, x, dx``.

    A Hessian-vector product (``jvp`` of the gradient) needs this tangent, not the primal
    (which XLA then drops). Autodiff of the nine full reductions above reads the four arrays
    nine times and writes a sliced copy for each tap (XLA:CPU's library reduction takes no
    slice); here one variadic reduction over each example's positions computes all nine taps
    per example in a single pass, and a sum over the examples follows (measured, one layer of
    12,000 26x26 maps on the 2-core CPU: 5.7 ms against 38 ms for nine products of two arrays,
    relative error against float64 1.2e-6 against 1.0e-6). JAX has no transpose for a variadic
    reduction, so reverse-over-reverse (``grad(grad)``) through a shifted convolution is not
    supported; forward-over-reverse (``jvp(grad)``, ``jax.hessian``) is.
    """
    g, x = primals
    dg, dx = tangents
    kh, kw = shape
    ho, wo = g.shape[1], g.shape[2]
    terms = tuple(
        dg * x[:, i : i + ho, j : j + wo] + g * dx[:, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)
    )
    zero = jnp.zeros((), g.dtype)
    per_example = lax.reduce(terms, (zero,) * len(terms), lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))
    tangent = jnp.stack([jnp.sum(t) for t in per_example]).reshape(kh, kw)
    return kernel_grad_nhw(g, x, shape), tangent


def kernel_grad_hwn(g: Array, x: Array, kh: int, kw: int) -> Array:
    """``dK[i, j] = sum g * x[i:i+Ho, j:j+Wo]``, one full reduction per tap (batch-minor ``(H, W, n)`` arrays).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.models.shifted import kernel_grad_hwn
      >>> g = jnp.ones((2, 2, 1)); x = jnp.arange(9.0).reshape(3, 3, 1)
      >>> kernel_grad_hwn(g, x, 2, 2).tolist()
      [[8.0, 12.0], [20.0, 24.0]]

    (Measured alternatives, 2-core CPU, value and gradient of 12,000 images: per-tap row
    sums first, 0.65-0.75 s CPU; an im2col matrix-vector product, 0.91 s; this, 0.63 s.)
    """
    ho, wo = g.shape[0], g.shape[1]
    # Reduce a flattened product: under vmap over lanes this is a reduction along the minor
    # axis of (lanes, Ho*Wo*n); reducing (lanes, Ho, Wo, n) over its last three axes directly
    # took twice the CPU time of the unbatched step.
    return jnp.stack(
        [jnp.stack([jnp.sum(jnp.ravel(g * x[i : i + ho, j : j + wo])) for j in range(kw)]) for i in range(kh)]
    )
