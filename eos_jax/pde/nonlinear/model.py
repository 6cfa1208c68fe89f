"""The one-layer CNN of the non-linear PDE (9): Swish regimes (Table 3), the cnn model and loss (6)-(7), the config."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax import losses, models
from eos_jax.errors import ConfigError

PyTree = Any

REGIMES = ("activated", "transitioning", "not_activated")
CLASSES = ("stable", "restrained", "divergent")
POOLS = ("mean", "sum")
F32 = jnp.float32


def swish_prime(x: jax.typing.ArrayLike, beta: float = 1.0) -> jax.Array:
    """``r'(x)`` of Swish ``r(x) = x s(beta x)`` (Eq. (45)), as ``s + beta x s (1 - s)``.

    The form with the sigmoid ``s = s(beta x)`` is Eq. (45) rewritten so that it does not
    overflow (``e^{-beta x}`` in (45) is ``inf`` for large negative ``x``).

    Examples:
      ``r'(0) = 1/2``, and the formula agrees with autodiff of Swish:

      >>> import jax, numpy as np
      >>> from eos_jax.pde.nonlinear.model import swish_prime
      >>> r1 = jax.jit(swish_prime)
      >>> float(r1(0.0))
      0.5
      >>> auto = jax.jit(jax.grad(lambda x: x * jax.nn.sigmoid(x)))(1.5)
      >>> bool(np.isclose(r1(1.5), auto))
      True
    """
    x = jnp.asarray(x)
    s = jax.nn.sigmoid(beta * x)
    return s + beta * x * s * (1 - s)


def _linearization_error(u: float) -> float:
    """``r'(u) - (1/2 + u/2)`` for ``beta = 1`` (float64 NumPy)."""
    s = 1.0 / (1.0 + math.exp(-u))
    return s + u * s * (1.0 - s) - 0.5 - 0.5 * u


def regime_threshold(beta: float = 1.0, tol: float = 0.05) -> float:
    """Half-width ``eps`` of the transitioning regime of Table 3.

    ``eps`` is where Swish's derivative departs from its linearization at 0,
    ``r'(x) ~ 1/2 + (beta/2) x`` (Eq. (46)), by ``tol``: ``|r'(x) - 1/2 - beta x/2| <= tol``
    for ``|x| <= eps`` (the error is odd, ``-(beta x)^3/12 + ...``, and monotone). With
    ``tol = 0.05`` and ``beta = 1``, ``eps = 0.87``; there ``r'(eps) = 0.887`` and
    ``r'(-eps) = 0.113``, i.e. within 0.12 of the activated (1) and not-activated (0) values.

    Args:
      beta: Swish parameter > 0 (``eps`` scales as ``1/beta``).
      tol: allowed departure from the linearization, in (0, 0.5).

    Returns:
      ``eps`` as a Python float.

    Examples:
      >>> import jax
      >>> from eos_jax.pde.nonlinear.model import regime_threshold, swish_prime
      >>> eps = regime_threshold()
      >>> r1 = jax.jit(swish_prime)
      >>> round(eps, 2), round(float(r1(eps)), 3), round(float(r1(-eps)), 3)
      (0.87, 0.887, 0.113)
      >>> regime_threshold(beta=2.0) == eps / 2
      True
    """
    if not (beta > 0 and math.isfinite(beta)):
        raise ConfigError(f"beta={beta!r}; expected a positive finite float")
    if not 0 < tol < 0.5:
        raise ConfigError(f"regime tol={tol!r}; expected 0 < tol < 0.5")
    lo, hi = 0.0, 20.0
    for _ in range(200):  # bisection to float64 resolution on a monotone function
        mid = 0.5 * (lo + hi)
        if _linearization_error(mid) > -tol:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi) / beta


def regime_fractions(pre_activation: jax.Array, eps: float) -> jax.Array:
    """Fractions of positions with ``K*I > eps``, ``|K*I| <= eps``, ``K*I < -eps`` (Table 3).

    Args:
      pre_activation: ``K * I`` at every output position (any shape).
      eps: half-width of the transitioning regime (:func:`regime_threshold`).

    Returns:
      ``(3,)`` array in the input's dtype: (activated, transitioning, not activated).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde.nonlinear.model import regime_fractions
      >>> jax.jit(regime_fractions)(jnp.array([2.0, 0.5, -0.1, -3.0]), 0.87).tolist()
      [0.25, 0.5, 0.25]
    """
    z = pre_activation
    n = z.size
    act = jnp.sum(z > eps)
    nact = jnp.sum(z < -eps)
    counts = jnp.stack([act, n - act - nact, nact])
    return counts.astype(z.dtype) / n


def valid_correlation(kernel: jax.Array, image: jax.Array) -> jax.Array:
    """``(K * I)(x) = sum_z K(z) I(x + z)`` over valid positions, in the kernel's dtype (lax.conv).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.pde.nonlinear.model import valid_correlation
      >>> r = valid_correlation(jnp.array([[1.0, 0.0], [0.0, -1.0]]), jnp.arange(9.0).reshape(3, 3))
      >>> r.dtype, r.tolist()
      (dtype('float32'), [[-4.0, -4.0], [-4.0, -4.0]])
    """
    out = jax.lax.conv_general_dilated(
        image[None, None].astype(kernel.dtype),
        kernel[None, None],
        (1, 1),
        "VALID",
        precision=jax.lax.Precision.HIGHEST,
    )
    return out[0, 0]


def num_positions(size: int, kernel: int) -> int:
    """``P = (n - w + 1)^2``: the valid output positions the global pooling runs over.

    Examples:
      The paper's 256 x 256 image and 32 x 32 kernel:

      >>> from eos_jax.pde.nonlinear.model import num_positions
      >>> num_positions(256, 32)
      50625
    """
    return (size - kernel + 1) ** 2


def pool_scale(pool: str, positions: int) -> float:
    """Factor of the data term: ``1/P`` for ``pool="mean"``, ``1`` for ``pool="sum"``.

    Examples:
      >>> from eos_jax.pde.nonlinear.model import pool_scale
      >>> pool_scale("mean", 4), pool_scale("sum", 4)
      (0.25, 1.0)
      >>> pool_scale("max", 4)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: pool='max'; allowed: mean, sum
    """
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r}; allowed: {', '.join(POOLS)}")
    return 1.0 / positions if pool == "mean" else 1.0


def analytic_gradient(
    kernel: jax.Array, image: jax.Array, *, alpha: float, beta: float, label: int, pool: str = "mean"
) -> jax.Array:
    """Theorem 5.1, Eq. (8): ``grad L(K) = (y_hat - y) q r'(K * I) * I + alpha K``.

    Computed directly from the formula (two valid correlations), not by autodiff:
    ``z = K * I`` is ``(n - w + 1)^2 = P``; ``r'(z) * I`` correlates the image with ``r'(z)``,
    which gives a ``w x w`` map; ``y_hat = s(g)``, ``g = q sum_x r(z)(x)``, with ``q = 1/P``
    for ``pool="mean"`` (the authors' ``AvgPooling``, whose backward divides by both
    spatial sizes; ``single_layer/PySun.py``) and ``q = 1`` for ``pool="sum"``.

    Args:
      kernel: ``(w, w)`` kernel ``K``.
      image: ``(n, n)`` input ``I``.
      alpha: weight decay of the loss (7).
      beta: Swish parameter.
      label: ``y`` in {0, 1}.
      pool: "mean" or "sum" over the output positions.

    Returns:
      ``(w, w)`` gradient in the kernel's dtype.

    Examples:
      Eq. (8) agrees with ``jax.grad`` of the ``cnn`` model's loss (7) (a 3 x 3 kernel on an
      8 x 8 checkerboard, float32):

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.pde.common import checkerboard
      >>> from eos_jax.pde.nonlinear import model as nl
      >>> img = checkerboard(8)
      >>> k = jnp.arange(9.0).reshape(3, 3) / 9 - 0.5
      >>> eq8 = jax.jit(lambda k: nl.analytic_gradient(k, jnp.asarray(img, jnp.float32), alpha=2.0,
      ...                                              beta=1.0, label=1))(k)
      >>> loss_fn = nl.make_loss_fn(nl.make_model(3), alpha=2.0)
      >>> params = {"conv0": {"kernel": k[:, :, None, None]}}
      >>> auto = jax.jit(jax.grad(loss_fn))(params, nl.make_batch(img, 1))
      >>> eq8.shape, bool(np.allclose(nl.kernel_of(auto), eq8, atol=1e-6))
      ((3, 3), True)
    """
    z = valid_correlation(kernel, image)
    q = pool_scale(pool, z.size)
    g = q * jnp.sum(z * jax.nn.sigmoid(beta * z))
    a = jax.nn.sigmoid(g) - label
    return (a * q) * valid_correlation(swish_prime(z, beta), image) + alpha * kernel


def make_model(kernel: int, *, beta: float = 1.0, pool: str = "mean", conv_impl: str = "auto", dtype: str = "float32"):
    """The one-layer ``cnn`` of Eq. (6): one ``kernel x kernel`` filter, Swish, global mean or sum, K ~ N(0, 1).

    Examples:
      >>> from eos_jax.pde.nonlinear.model import make_model
      >>> model = make_model(32)
      >>> cfg = model.info["config"]
      >>> cfg["kernel_size"], cfg["activation"], cfg["init"], cfg["pool"], model.info["conv_impl"]
      ([32, 32], 'swish', 'normal', 'mean', 'fft')
    """
    return models.get(
        "cnn",
        layers=1,
        channels=1,
        kernel_size=kernel,
        padding="valid",
        activation="swish",
        beta=beta,
        init="normal",
        init_std=1.0,
        head="sum",
        pool=pool,
        num_outputs=1,
        conv_impl=conv_impl,
        dtype=dtype,
    )


def make_batch(image: np.ndarray, label: int, dtype: Any = np.float32) -> dict[str, jax.Array]:
    """The one-example dataset ``{"x": (1, n, n, 1), "y": (1,) int32}``.

    Examples:
      >>> from eos_jax.pde.common import checkerboard
      >>> from eos_jax.pde.nonlinear.model import make_batch
      >>> batch = make_batch(checkerboard(8), 1)
      >>> batch["x"].shape, batch["x"].dtype, batch["y"].tolist()
      ((1, 8, 8, 1), dtype('float32'), [1])
    """
    x = jnp.asarray(np.asarray(image, dtype=dtype)[None, :, :, None])
    return {"x": x, "y": jnp.asarray([label], dtype=jnp.int32)}


def kernel_of(params: PyTree) -> jax.Array:
    """The ``(w, w)`` kernel of the one-layer model's params (its only leaf).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.pde.nonlinear.model import kernel_of
      >>> kernel_of({"conv0": {"kernel": jnp.ones((3, 3, 1, 1))}}).shape
      (3, 3)
      >>> kernel_of({"a": jnp.ones(2), "b": jnp.ones(2)})
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: expected one (w, w, 1, 1) kernel, got [(2,), (2,)]
    """
    leaves = jax.tree_util.tree_leaves(params)
    if len(leaves) != 1 or leaves[0].ndim != 4 or leaves[0].shape[2:] != (1, 1):
        raise ConfigError(f"expected one (w, w, 1, 1) kernel, got {[x.shape for x in leaves]}")
    return leaves[0][:, :, 0, 0]


LossParts = Callable[[PyTree, dict], tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def make_loss_parts(model: Any, alpha: float) -> LossParts:
    """``(params, batch) -> (L, (BCE, logit))`` for the loss (7) with weight decay in the loss.

    Examples:
      At ``K = 0`` the logit is 0 and the loss is ``BCE(s(0), 1) = log 2``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde.common import checkerboard
      >>> from eos_jax.pde.nonlinear import model as nl
      >>> parts = nl.make_loss_parts(nl.make_model(3), alpha=20.0)
      >>> zero = {"conv0": {"kernel": jnp.zeros((3, 3, 1, 1))}}
      >>> loss, (bce, logit) = jax.jit(parts)(zero, nl.make_batch(checkerboard(8), 1))
      >>> round(float(loss), 6), round(float(bce), 6), float(logit)
      (0.693147, 0.693147, 0.0)
    """
    half_alpha = 0.5 * float(alpha)

    def loss_parts(params: PyTree, batch: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        logits, _ = model.apply({"params": params}, batch["x"], train=True)
        data = losses.binary_cross_entropy(logits, batch["y"])
        decay = sum(jnp.sum(p * p) for p in jax.tree_util.tree_leaves(params))
        return data + half_alpha * decay, (data, logits[0, 0])

    return loss_parts


def make_loss_fn(model: Any, alpha: float) -> Callable[[PyTree, dict], jax.Array]:
    """``loss_fn(params, batch) -> L(K)`` of Eq. (7) (the form :mod:`eos_jax.hessian` takes).

    Examples:
      The weight decay ``(alpha/2) ||K||^2`` is in the loss. On the pixel checkerboard the
      kernel with two horizontal ones has ``K * I = I(x) + I(x + (0, 1)) = 0``, so the logit is 0
      and the loss is ``log 2 + (alpha/2) * 2``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde.common import checkerboard
      >>> from eos_jax.pde.nonlinear import model as nl
      >>> loss_fn = nl.make_loss_fn(nl.make_model(3), alpha=2.0)
      >>> k = jnp.zeros((3, 3, 1, 1)).at[0, :2].set(1.0)
      >>> round(float(jax.jit(loss_fn)({"conv0": {"kernel": k}}, nl.make_batch(checkerboard(8), 1))), 6)
      2.693147
    """
    parts = make_loss_parts(model, alpha)
    return lambda params, batch: parts(params, batch)[0]


@dataclasses.dataclass(frozen=True)
class NonlinearConfig:
    """Configuration of ``python -m experiments.pde nonlinear`` (Figures 5 and 6).

    Attributes:
      dts: step sizes ``dt`` (the paper's learning rates), each > 0.
      steps: gradient-descent steps per lane.
      k: the perturbed lane's factor (Section 4.1); the baseline is ``k = 1``.
      alpha: weight decay of the loss (7).
      beta: Swish parameter.
      label: ``y`` in {0, 1}.
      size: side of the +1/-1 checkerboard input ``I``.
      square: side of the checkerboard's squares (1: the pixel pattern ``(-1)^(i+j)``).
      kernel: side ``w`` of the kernel.
      seed: ``K_0 ~ N(0, 1)`` is ``model.init(fold_in(key(seed), 0), ...)``; every lane
        starts from the same ``K_0``.
      sharpness_every: steps between normalized-sharpness evaluations (also the
        ``lax.scan`` chunk length).
      sharpness_iters: Lanczos iterations (Hessian-vector products) per evaluation.
      regime_tol: the transitioning regime is where ``r'`` is within ``regime_tol`` of
        its linearization (:func:`regime_threshold`).
      conv_impl: convolution of the ``cnn`` model ("auto" picks the FFT for big kernels).
      window: records at the end used by the classification (0: ``max(1, steps // 10)``).
      osc_level: relative non-monotone loss variation above which the loss "oscillates".
      rel_l1_level: RelL1(k=1, k=3) above which the perturbation counts as amplified.
      growth_factor: a loss above this multiple of the initial loss over the whole
        window counts as growing without bound.
      rel_l1_window: steps of the trailing moving average of RelL1(k=1, k) that the
        authors plot (100 in ``instability/compute_one_layer.m``).
      pool: global pooling over the ``(n - w + 1)^2`` output positions: "mean" (default,
        the authors' ``AvgPooling`` in ``single_layer/PySun.py``) or "sum".

    Examples:
      >>> from eos_jax.pde.nonlinear.model import NonlinearConfig
      >>> config = NonlinearConfig()
      >>> config.k, config.kernel, config.size, config.num_window
      (3, 32, 256, 200)
      >>> NonlinearConfig(k=1).validate()
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: k=1; expected an integer >= 2
    """

    dts: tuple[float, ...] = (0.01, 0.03, 0.05, 0.07, 0.09, 0.11)
    steps: int = 2000
    k: int = 3
    pool: str = "mean"
    alpha: float = 20.0
    beta: float = 1.0
    label: int = 1
    size: int = 256
    square: int = 1
    kernel: int = 32
    seed: int = 0
    sharpness_every: int = 10
    sharpness_iters: int = 20
    regime_tol: float = 0.05
    conv_impl: str = "auto"
    window: int = 0
    osc_level: float = 1e-3
    rel_l1_level: float = 1e-3
    growth_factor: float = 10.0
    rel_l1_window: int = 100

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        if not self.dts:
            raise ConfigError("dts is empty; expected at least one step size")
        for dt in self.dts:
            if not (dt > 0 and math.isfinite(dt)):
                raise ConfigError(f"dt={dt!r}; expected a positive finite float")
        if len(set(self.dts)) != len(self.dts):
            raise ConfigError(f"dts={self.dts!r} has duplicates; expected distinct step sizes")
        _check_int("steps", self.steps, 1)
        _check_int("k", self.k, 2)
        if self.pool not in POOLS:
            raise ConfigError(f"pool={self.pool!r}; allowed: {', '.join(POOLS)}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha={self.alpha!r}; expected a finite float >= 0")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta={self.beta!r}; expected a positive finite float")
        if self.label not in (0, 1):
            raise ConfigError(f"label={self.label!r}; allowed: 0, 1")
        _check_int("size", self.size, 2)
        _check_int("square", self.square, 1)
        _check_int("kernel", self.kernel, 1)
        if self.kernel > self.size:
            raise ConfigError(f"kernel={self.kernel}; expected a kernel no larger than size={self.size}")
        _check_int("seed", self.seed, 0)
        _check_int("sharpness_every", self.sharpness_every, 1)
        _check_int("sharpness_iters", self.sharpness_iters, 1)
        if not 0 < self.regime_tol < 0.5:
            raise ConfigError(f"regime_tol={self.regime_tol!r}; expected 0 < regime_tol < 0.5")
        _check_int("window", self.window, 0)
        if self.window > self.steps:
            raise ConfigError(f"window={self.window}; expected at most steps={self.steps}")
        for name in ("osc_level", "rel_l1_level"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name}={v!r}; expected a positive finite float")
        if not (self.growth_factor > 1 and math.isfinite(self.growth_factor)):
            raise ConfigError(f"growth_factor={self.growth_factor!r}; expected a finite float > 1")
        _check_int("rel_l1_window", self.rel_l1_window, 1)

    @property
    def num_window(self) -> int:
        """Records used by the classification."""
        return self.window or max(1, self.steps // 10)


def _check_int(name: str, value: Any, low: int) -> None:
    """Raises ConfigError unless ``value`` is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name}={value!r}; expected an integer >= {low}")
