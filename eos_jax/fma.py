"""A correctly rounded fused multiply-add, emulated in the operands' own dtype.

JAX has no FMA primitive, yet PyTorch's CPU kernels round ``p + alpha * g`` once (see
:mod:`eos_jax.optim_torch`). :func:`fma` computes ``RN(a * b + c)`` (one rounding to
nearest-even) for float32 and float64 arrays without any wider type, so it works with
JAX's default ``jax_enable_x64=False`` and for float64 parameters alike. It follows
Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms
using rounding to odd", IEEE Trans. Computers 57(4), 2008, Algorithm 5:

1. ``(uh, ul) = TwoProduct(a, b)``: ``uh + ul == a*b`` exactly (Dekker's product with
   Veltkamp's splitting; no FMA needed).
2. ``(th, tl) = TwoSum(c, uh)``: ``th + tl == c + uh`` exactly (Knuth).
3. ``v = RO(tl + ul)``: the sum rounded to *odd* (computed as ``RN`` plus the exact
   error from TwoSum: when the error is nonzero and the rounded sum is even, step one
   ulp towards the exact value).
4. ``RN(th + v)``, the correctly rounded ``a*b + c``.

Validity: the algorithm is exact when nothing under- or overflows: ``|a|``, ``|b|`` below
``2**(emax - s)`` (the split constant ``2**s + 1`` must not overflow: ``s = 12`` for float32,
``27`` for float64) and the error term ``ul`` of the product representable, i.e. ``a*b``
zero or of magnitude at least ``2**(emin + 2p)`` (about 3e-24 in float32, 1e-275 in
float64). The tests check it against exact rational arithmetic on random and hard triples.

Compiler hazards. XLA:CPU/GPU may contract a product feeding an addition into a
hardware FMA, which would change the rounded products the algorithm relies on. Every
product whose *rounded* value matters is therefore written ``a * b + z`` with ``z = +0``
hidden behind ``jax.lax.optimization_barrier``: contracted or not, ``fma(a, b, +0)`` and
``RN(a*b) + 0`` are the same number (``-0`` becomes ``+0``, which no later step
distinguishes). XLA does not reassociate floating-point additions (fast math is off), so
the error-free transforms survive compilation; the tests run them under ``jax.jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError

_SPLIT_BITS = {np.dtype(np.float32): 12, np.dtype(np.float64): 27}  # ceil(p/2), p = 24 / 53
_UINT = {np.dtype(np.float32): jnp.uint32, np.dtype(np.float64): jnp.uint64}


def _dtype(*xs: jax.Array) -> np.dtype:
    dtypes = {np.dtype(jnp.result_type(x)) for x in xs}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SPLIT_BITS:
        raise ConfigError(f"fma operands have dtypes {sorted(map(str, dtypes))}; allowed: all float32 or all float64")
    return next(iter(dtypes))


def opaque_zero(dtype: np.dtype) -> jax.Array:
    """``+0`` of ``dtype`` that XLA's simplifier cannot see through (an optimization barrier).

    Examples:
      >>> import jax.numpy as jnp
      >>> z = opaque_zero(jnp.float32)
      >>> float(z), z.dtype, z.shape
      (0.0, dtype('float32'), ())
    """
    return jax.lax.optimization_barrier(jnp.zeros((), dtype))


def runtime_zero(count: jax.Array, dtype: np.dtype) -> jax.Array:
    """``+0`` of ``dtype`` that neither XLA nor LLVM can prove zero: the bits of ``count >> (bits-1)``
    (``count`` is a non-negative step count, below ``2**31``).

    ``opaque_zero``'s barrier is expanded before code generation, after which LLVM sees a constant
    ``+0``; where it can also prove the product non-negative it drops ``x + 0`` and contracts
    the product into the next sum. A zero computed from runtime bits stays an opaque addend.

    Examples:
      >>> import jax.numpy as jnp
      >>> z = runtime_zero(jnp.int32(7), jnp.float32)  # the bits of 7 >> 31
      >>> float(z), z.dtype
      (0.0, dtype('float32'))
    """
    bits = np.dtype(dtype).itemsize * 8
    u = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[bits]
    return jax.lax.bitcast_convert_type(jax.lax.shift_right_logical(count.astype(u), u(bits - 1)), dtype)


def rounded_mul(a: jax.Array, b: jax.Array, zero: jax.Array) -> jax.Array:
    """``RN(a * b)`` that stays rounded even if the compiler contracts it with a later add.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(rounded_mul(jnp.float32(3), jnp.float32(0.1), opaque_zero(jnp.float32)))
      0.30000001192092896
    """
    return a * b + zero  # contracted: fma(a, b, +0) == RN(a*b) (up to the sign of zero)


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: ``(s, e)`` with ``s = RN(a + b)`` and ``s + e == a + b`` exactly.

    Examples:
      >>> import jax.numpy as jnp
      >>> s, e = two_sum(jnp.float32(1), jnp.float32(2**-30))
      >>> float(s), float(e)
      (1.0, 9.313225746154785e-10)
    """
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def two_product(a: jax.Array, b: jax.Array, zero: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dekker's TwoProduct: ``(p, e)`` with ``p = RN(a*b)`` and ``p + e == a*b`` exactly.

    Veltkamp's splitting writes ``a = ah + al`` with ``ah`` of ``p - s`` bits and ``al``
    of at most ``s`` bits, so the four partial products are exact. See the module
    docstring for the range in which this holds.

    Examples:
      >>> import jax.numpy as jnp
      >>> z = opaque_zero(jnp.float32)
      >>> p, e = two_product(jnp.float32(1 + 2**-20), jnp.float32(1 + 2**-20), z)
      >>> float(e) == 2**-40
      True
    """
    dtype = _dtype(a, b)
    split = jnp.asarray(2.0 ** _SPLIT_BITS[dtype] + 1.0, dtype)

    def halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = rounded_mul(split, x, zero)
        hi = t - (t - x)
        return hi, x - hi

    p = rounded_mul(a, b, zero)
    ah, al = halves(a)
    bh, bl = halves(b)
    # The partial products are exact, so contraction of any of them cannot change a bit.
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def add_round_to_odd(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b`` rounded to odd: exact sums unchanged, otherwise the neighbour with odd last bit.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(add_round_to_odd(jnp.float32(1), jnp.float32(2**-30))) == 1 + 2**-23
      True
    """
    dtype = _dtype(a, b)
    s, e = two_sum(a, b)
    even = (jax.lax.bitcast_convert_type(s, _UINT[dtype]) & 1) == 0
    # a + b lies strictly between s and its neighbour towards e; one of them is odd.
    towards = jnp.where(e > 0, jnp.asarray(np.inf, dtype), jnp.asarray(-np.inf, dtype))
    return jnp.where((e != 0) & even, jnp.nextafter(s, towards), s)


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """Correctly rounded ``a * b + c`` in the operands' dtype (float32 or float64), one rounding.

    Broadcasts like ``a * b + c``. Boldo-Melquiond's Algorithm 5 (module docstring);
    exact under the module docstring's range conditions.

    Args:
      a, b, c: float32 or float64 arrays (all of one dtype), broadcast-compatible.

    Returns:
      ``RN(a*b + c)``, the value a hardware FMA returns.

    Raises:
      ConfigError: the operands' dtypes differ or are not float32/float64.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.float32(1 + 2**-12); c = jnp.float32(-(1 + 2**-11))
      >>> float(fma(a, a, c)) == 2**-24   # a*a + c rounds to 0 without the fused add
      True
    """
    dtype = _dtype(a, b, c)
    zero = opaque_zero(dtype)
    uh, ul = two_product(a, b, zero)
    th, tl = two_sum(c, uh)
    v = add_round_to_odd(tl, ul)
    return th + v
