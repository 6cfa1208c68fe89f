"""The data operator ``M`` of the linearized PDE (10): windowed (valid correlation) and periodic, the loss, and its extreme eigenvalues."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from eos_jax.eigen import Extremes, psd_extremes
from eos_jax.errors import ConfigError
from eos_jax.pde.common import require_x64
from eos_jax.pde.linear.theory import C128, F64, Operator, data_scale, image_bar


def scaled_operator(op: Operator, q: float) -> Operator:
    """``q M`` (the data term of a mean pooling when ``q = 1/P``); ``op`` itself when ``q == 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> double = lambda k: 2.0 * k
      >>> linear.scaled_operator(double, 0.25)(jnp.ones(2)).tolist()
      [0.5, 0.5]
      >>> linear.scaled_operator(double, 1.0) is double
      True
    """
    if q == 1.0:
        return op
    return lambda kernel: q * op(kernel)


def valid_correlation(kernel: jax.Array, image: jax.Array) -> jax.Array:
    """``(K * I)(x) = sum_z K(z) I(x + z)`` over valid positions (no padding), via ``lax.conv``.

    Deep-learning libraries' convolution; the direct reference for the FFT operators.

    Examples:
      ``K = [[1, 0], [0, -1]]`` gives ``I(x) - I(x + (1, 1))``, ``-5`` on a 4x4 ``arange``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> with jax.enable_x64(True):
      ...     r = linear.valid_correlation(jnp.array([[1.0, 0.0], [0.0, -1.0]]), jnp.arange(16.0).reshape(4, 4))
      >>> r.dtype, r.tolist()
      (dtype('float64'), [[-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0]])
    """
    require_x64("linear.valid_correlation")
    out = jax.lax.conv_general_dilated(
        image[None, None].astype(F64),
        kernel[None, None].astype(F64),
        (1, 1),
        "VALID",
        precision=jax.lax.Precision.HIGHEST,
    )
    return out[0, 0]


def make_windowed_operator(image: jax.typing.ArrayLike, w: int) -> Operator:
    """``M K = W[(K * I) * I]`` for a ``w x w`` kernel and valid correlations, FFT-based.

    The kernel is zero-padded to the ``n x n`` image; a circular correlation then equals
    the valid one on the ``(n - w + 1)^2`` positions that do not wrap, and the same holds
    for correlating the (zero-padded) valid map back with ``I`` on the ``w x w`` window.

    Args:
      image: ``n x n`` input ``I``.
      w: kernel side, ``1 <= w <= n``.

    Returns:
      A jittable linear map ``(w, w) float64 -> (w, w) float64`` (symmetric PSD).

    Examples:
      On the pixel checkerboard ``M = (n - w + 1)^2 chi chi^T``, so ``chi`` (the window's own
      checkerboard, ``||chi||^2 = w^2``) is an eigenvector with eigenvalue ``6^2 * 3^2 = 324``
      for ``n = 8``, ``w = 3``:

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     op = linear.make_windowed_operator(checkerboard(8), 3)
      ...     chi = jnp.asarray(checkerboard(3))
      ...     print(bool(np.allclose(jax.jit(op)(chi), 324.0 * chi)))
      True
    """
    require_x64("linear.make_windowed_operator")
    img = jnp.asarray(image, dtype=F64)
    n = img.shape[0]
    if img.ndim != 2 or img.shape[1] != n:
        raise ConfigError(f"image shape {img.shape}; expected a square 2-D image")
    if not 1 <= w <= n:
        raise ConfigError(f"kernel size w={w!r}; expected 1 <= w <= image side {n}")
    v = n - w + 1
    img_hat = jnp.fft.rfft2(img)
    valid_mask = jnp.zeros((n, n), F64).at[:v, :v].set(1.0)

    def corr_with_image(f: jax.Array) -> jax.Array:
        # (f * I)(x) = sum_z f(z) I(x + z): DFT conj(f_hat) I_hat for real f.
        return jnp.fft.irfft2(jnp.conj(jnp.fft.rfft2(f)) * img_hat, s=(n, n))

    def op(kernel: jax.Array) -> jax.Array:
        k_pad = jnp.zeros((n, n), F64).at[:w, :w].set(kernel)
        r = corr_with_image(k_pad) * valid_mask
        return corr_with_image(r)[:w, :w]

    return op


def make_periodic_operator(image: jax.typing.ArrayLike) -> Operator:
    """``M K = (K * I) * I`` with circular correlations on the ``n x n`` torus (``w -> infinity``).

    Diagonal in the DFT basis: ``DFT{M K} = K_hat |I_hat|^2`` (Eqs. (50)-(53)).

    Examples:
      The 4x4 pixel checkerboard has ``|I_hat|^2 = 4**4`` at the Nyquist frequency and 0
      elsewhere: it scales itself by 256 and annihilates constants:

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     img = jnp.asarray(checkerboard(4))
      ...     op = jax.jit(linear.make_periodic_operator(img))
      ...     print(bool(np.allclose(op(img), 256.0 * img)), bool(np.allclose(op(jnp.ones((4, 4))), 0.0)))
      True True
    """
    require_x64("linear.make_periodic_operator")
    img = jnp.asarray(image, dtype=F64)
    n = img.shape[0]
    spec = (jnp.abs(jnp.fft.rfft2(img)) ** 2).astype(C128)

    def op(kernel: jax.Array) -> jax.Array:
        return jnp.fft.irfft2(jnp.fft.rfft2(kernel) * spec, s=(n, n))

    return op


def linearized_loss(
    kernel: jax.Array, image: jax.Array, *, a: float, beta: float, alpha: float, pool: str = "sum", ibar: str = "mean"
) -> jax.Array:
    """Quadratic loss whose gradient is the right-hand side of (10) (windowed, valid correlation).

    ``L(K) = (a beta q/4) ||K * I||^2 + (a/2) Ibar sum(K) + (alpha/2) ||K||^2``; its gradient is
    ``(a/2)(Ibar + beta q (K * I) * I) + alpha K``, so forward Euler (11) is gradient descent on it.
    ``q`` is :func:`data_scale` of ``pool`` over the ``(n - w + 1)^2`` valid positions and
    ``Ibar`` :func:`image_bar` (defaults: as in the authors' ``single_layer/linear.py``).

    Examples:
      ``jax.grad`` of the loss is the right-hand side of (10), written with the windowed ``M``:

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     img = jnp.asarray(checkerboard(6))
      ...     op, ibar = linear.make_windowed_operator(img, 3), linear.image_bar(img, "mean")
      ...     @jax.jit
      ...     def grad_and_rhs(k):
      ...         g = jax.grad(linear.linearized_loss)(k, img, a=-0.5, beta=1.0, alpha=2.0)
      ...         return g, 0.5 * -0.5 * (ibar + op(k)) + 2.0 * k
      ...     g, rhs = grad_and_rhs(jnp.arange(9.0).reshape(3, 3) / 9)
      ...     print(bool(np.allclose(g, rhs)))
      True
    """
    r = valid_correlation(kernel, image)
    q = data_scale(pool, r.size)
    ib = image_bar(image, ibar)
    return (
        0.25 * a * beta * q * jnp.sum(r * r) + 0.5 * a * ib * jnp.sum(kernel) + 0.5 * alpha * jnp.sum(kernel * kernel)
    )


def loss_from_operator(
    op: Operator, kernel: jax.Array, ibar: jax.Array, *, a: float, beta: float, alpha: jax.Array
) -> jax.Array:
    """The same loss written with ``M``: ``||K * I||^2 = <K, M K>``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     img = jnp.asarray(checkerboard(6)); k = jnp.arange(9.0).reshape(3, 3) / 9
      ...     op, ibar = linear.make_windowed_operator(img, 3), linear.image_bar(img, "mean")
      ...     a, b = jax.jit(lambda k: (linear.loss_from_operator(op, k, ibar, a=-0.5, beta=1.0, alpha=2.0),
      ...                               linear.linearized_loss(k, img, a=-0.5, beta=1.0, alpha=2.0)))(k)
      ...     print(bool(np.isclose(a, b)))
      True
    """
    return (
        0.25 * a * beta * jnp.vdot(kernel, op(kernel))
        + 0.5 * a * ibar * jnp.sum(kernel)
        + 0.5 * alpha * jnp.vdot(kernel, kernel)
    )


def operator_extremes(
    op: Operator, shape: tuple[int, ...], key: jax.Array, *, tol: float = 1e-10, max_iters: int = 20000
) -> Extremes:
    """``mu_max`` and ``mu_min`` of a symmetric PSD map by power iteration, the latter with a shift.

    The shared solver :func:`eos_jax.eigen.psd_extremes` on the raveled map: ``mu_max`` by power
    iteration on ``M`` (PSD, so largest magnitude = largest algebraic), ``mu_min`` on
    ``mu_max I - M`` (PSD, largest eigenvalue ``mu_max - mu_min``). Each stops when the relative
    residual ``||B v - lam v|| / |lam|`` is below ``tol``. Float64 start vectors.

    Args:
      op: the linear map (e.g. :func:`make_windowed_operator`).
      shape: shape of its argument.
      key: PRNG key of the random start vectors.
      tol: relative residual tolerance.
      max_iters: iteration cap per eigenvalue.

    Returns:
      :class:`eos_jax.eigen.Extremes`.

    Examples:
      The windowed checkerboard operator against its closed form
      (:func:`checkerboard_window_extremes`):

      >>> import jax
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     op = linear.make_windowed_operator(checkerboard(8), 3)
      ...     e = linear.operator_extremes(op, (3, 3), jax.random.PRNGKey(0))
      >>> round(e.mu_min, 6) + 0.0, round(e.mu_max, 6), linear.checkerboard_window_extremes(8, 3)
      (0.0, 324.0, (0.0, 324.0))
    """
    require_x64("linear.operator_extremes")
    k1, k2 = jax.random.split(key)
    size = math.prod(shape)
    flat = lambda v: op(v.reshape(shape)).reshape(size)  # noqa: E731
    return psd_extremes(
        flat,
        jax.random.normal(k1, (size,), F64),
        jax.random.normal(k2, (size,), F64),
        tol=tol,
        max_iters=max_iters,
    )


def checkerboard_window_extremes(n: int, w: int) -> tuple[float, float]:
    """Closed form of ``(mu_min, mu_max)`` of the windowed ``M`` for the pixel checkerboard.

    ``(K * I)(x) = (-1)^{x1+x2} <K, chi>`` with ``chi(z) = (-1)^{z1+z2}``: ``C`` has rank one,
    ``M = (n - w + 1)^2 chi chi^T``, so ``mu_max = (n - w + 1)^2 w^2`` and ``mu_min = 0``
    (``w >= 2``; for ``w = 1`` both equal ``n^2``).

    Examples:
      >>> from eos_jax.pde import linear
      >>> linear.checkerboard_window_extremes(8, 3), linear.checkerboard_window_extremes(4, 1)
      ((0.0, 324.0), (16.0, 16.0))
    """
    mu_max = float((n - w + 1) ** 2 * w * w)
    return (mu_max if w == 1 else 0.0), mu_max
