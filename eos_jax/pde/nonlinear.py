"""The non-linear one-layer CNN gradient-descent PDE (9): restrained instabilities and EoS.

Setting (Sections 5.1, 5.4, 6.1; Appendix D.1, D.5). The network of Eq. (6) is the
``cnn`` model of :mod:`eos_jax.models` with one ``w x w`` kernel ``K`` (valid
cross-correlation, no bias), Swish ``r(x) = x s(beta x)``, a global pooling over the
``P = (n - w + 1)^2`` output positions and the sigmoid inside the binary cross-entropy.
The pooling is the MEAN by default, as in the authors' code for Figures 4-6
(``AvgPooling``, ``np.mean`` over both spatial axes, in ``single_layer/PySun.py`` of
sunyx523/surprising-instabilities); ``pool="sum"`` (the integral of Eq. (6) with unit
pixel area) is the alternative, and scales the data term by ``P`` (50,625 here), which
moves every threshold. The loss is Eq. (7) with the weight decay IN THE LOSS::

    L(K) = BCE(s(g), y) + (alpha/2) ||K||^2,   g = q sum_x r(K * I)(x),  q = 1/P (mean) or 1 (sum),

so ``grad L = (y_hat - y) q r'(K * I) * I + alpha K`` (Theorem 5.1, Eq. (8); PyTorch's
``weight_decay=alpha`` adds the same ``alpha K`` to the gradient, but keeping it in the
loss makes the recorded loss Eq. (7) and the Hessian include ``alpha``).
:func:`analytic_gradient` evaluates Eq. (8) directly; the tests compare it with
``jax.grad`` of the model's loss. Gradient descent with step ``dt`` (the paper's
learning rate) is forward Euler on (9): ``K <- K - dt grad L(K)``, done by
:func:`eos_jax.optim.sgd` so that the perturbed lane ``k = 3`` computes
``K - (dt/k)(k grad)`` (Section 4.1).

One vmapped program runs every lane ``(dt, k)``, ``k in {1, k_perturbed}``, for the
given step sizes, in ``lax.scan`` chunks. Per step and lane it records the loss (7),
its cross-entropy part, the logit ``g``, and the fraction of output positions in each
regime of Table 3 (:func:`regime_fractions`, threshold :func:`regime_threshold`); per
step and ``dt`` the RelL1 distance between the ``k = 1`` and ``k = 3`` kernels; every
``sharpness_every`` steps the normalized sharpness ``dt * lambda_max`` (largest
ALGEBRAIC Hessian eigenvalue of the loss in ``K``, fixed-iteration Lanczos from
:func:`eos_jax.hessian.top_eigenvalue`, warm-started from the previous eigenvector).
A lane whose loss or kernel becomes non-finite records that step and is frozen; its
later records are NaN (``null`` in JSON), the other lanes go on.

Indexing: record ``t`` of every history describes the iterate ``K_t`` (``K_0`` the
initial kernel), before the update that produces ``K_{t+1}``.

Classification of each ``dt`` (:func:`classify`, rule text in ``results.json``), on the
last ``window`` records:

* ``divergent``: a lane of this ``dt`` became non-finite, or its loss over the window
  stays above ``growth_factor`` times the initial loss (growing without bound);
* ``restrained``: finite and bounded, but the loss keeps oscillating -- the
  non-monotone part of its variation, ``(TV - |net change|) / (W mean|L|)``, exceeds
  ``osc_level`` -- or RelL1(k=1, k=3) over the window exceeds ``rel_l1_level``
  (amplified perturbation);
* ``stable``: neither (converged, perturbation not amplified).

Initial kernel: ``K_0 ~ N(0, 1)`` from a JAX key (``fold_in(key(seed), 0)``). The authors
draw ``np.random.randn`` after ``np.random.seed(7)`` in float64; JAX does not reproduce
NumPy's stream, so ``K_0`` differs as a sample. On the pixel checkerboard what matters is
``c_0 = <K_0, chi>`` (``results.json`` ``initial_c``): it sets where the run starts on the
one-dimensional landscape of :func:`checkerboard_loss_1d`, not the minimum it ends in.

The RelL1(k=1, k) series is recorded every step, raw and as the trailing 100-step mean
the authors plot (:func:`moving_average`).

Theory (:func:`theory`): Table 3's bounds for the three regimes with the image's sum
``Ibar`` and DFT, and the windowed transitioning bound from the extreme eigenvalues of
``M = W[(. * I) * I]`` (:func:`eos_jax.pde.linear.make_windowed_operator`). For the
pixel checkerboard ``(-1)^(i+j)`` of even side, ``Ibar = 0``: the activated bound
``alpha < 2/dt - Ibar^2/8`` collapses to the not-activated one ``dt < 2/alpha`` and the
constant forcing ``-(a/2) Ibar`` of (10) vanishes. For that image the loss depends on
``K`` only through ``c = <K, chi>`` and ``||K||`` (:func:`checkerboard_minima`): its
minimum and the curvature there give the threshold ``dt < 2/lambda_max`` between
converging and oscillating, printed beside the classification.

Command and runtime (12 lanes, float32, FFT convolution; 3.6 min wall on an idle 2-core
CPU, 12.7 min on the same CPU shared with other jobs, of which ~55% is the Lanczos
sharpness every 10 steps)::

    python -m experiments.pde nonlinear --dt 0.01 0.03 0.05 0.07 0.09 0.11 --steps 2000 --out runs/nonlinear

Measured with ``pool="mean"`` (the default): stable at 0.01 and 0.03, restrained at 0.05,
0.07 and 0.09, divergent at 0.11 (step 218); the closed-form threshold of the checkerboard
minimum is ``dt < 2/61.997 = 0.0323``. With ``pool="sum"`` it is ``2/563 = 0.00355``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eos_jax import hessian, losses, models, optim
from eos_jax.errors import ConfigError
from eos_jax.metrics import rel_l1
from eos_jax.models.layers import conv2d
from eos_jax.pde import linear
from eos_jax.pde.common import checkerboard

PyTree = Any
REGIMES = ("activated", "transitioning", "not_activated")
CLASSES = ("stable", "restrained", "divergent")
POOLS = ("mean", "sum")
F32 = jnp.float32


# ------------------------------------------------------------------------------ swish


def swish_prime(x: jax.typing.ArrayLike, beta: float = 1.0) -> jax.Array:
    """``r'(x)`` of Swish ``r(x) = x s(beta x)`` (Eq. (45)), as ``s + beta x s (1 - s)``.

    The form with the sigmoid ``s = s(beta x)`` is Eq. (45) rewritten so that it does not
    overflow (``e^{-beta x}`` in (45) is ``inf`` for large negative ``x``).
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
    ``tol = 0.05`` and ``beta = 1``, ``eps = 0.87``; there ``r'(eps) = 0.885`` and
    ``r'(-eps) = 0.115``, i.e. within 0.12 of the activated (1) and not-activated (0) values.

    Args:
      beta: Swish parameter > 0 (``eps`` scales as ``1/beta``).
      tol: allowed departure from the linearization, in (0, 0.5).

    Returns:
      ``eps`` as a Python float.
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
    """
    z = pre_activation
    n = z.size
    act = jnp.sum(z > eps)
    nact = jnp.sum(z < -eps)
    counts = jnp.stack([act, n - act - nact, nact])
    return counts.astype(z.dtype) / n


# ----------------------------------------------------------------------------- model


def valid_correlation(kernel: jax.Array, image: jax.Array) -> jax.Array:
    """``(K * I)(x) = sum_z K(z) I(x + z)`` over valid positions, in the kernel's dtype (lax.conv)."""
    out = jax.lax.conv_general_dilated(
        image[None, None].astype(kernel.dtype), kernel[None, None], (1, 1), "VALID",
        precision=jax.lax.Precision.HIGHEST,
    )
    return out[0, 0]


def num_positions(size: int, kernel: int) -> int:
    """``P = (n - w + 1)^2``: the valid output positions the global pooling runs over."""
    return (size - kernel + 1) ** 2


def pool_scale(pool: str, positions: int) -> float:
    """Factor of the data term: ``1/P`` for ``pool="mean"``, ``1`` for ``pool="sum"``."""
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r}; allowed: {', '.join(POOLS)}")
    return 1.0 / positions if pool == "mean" else 1.0


def analytic_gradient(kernel: jax.Array, image: jax.Array, *, alpha: float, beta: float, label: int,
                      pool: str = "mean") -> jax.Array:
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
    """
    z = valid_correlation(kernel, image)
    q = pool_scale(pool, z.size)
    g = q * jnp.sum(z * jax.nn.sigmoid(beta * z))
    a = jax.nn.sigmoid(g) - label
    return (a * q) * valid_correlation(swish_prime(z, beta), image) + alpha * kernel


def make_model(kernel: int, *, beta: float = 1.0, pool: str = "mean", conv_impl: str = "auto",
               dtype: str = "float32"):
    """The one-layer ``cnn`` of Eq. (6): one ``kernel x kernel`` filter, Swish, global mean or sum, K ~ N(0, 1)."""
    return models.get("cnn", layers=1, channels=1, kernel_size=kernel, padding="valid", activation="swish",
                      beta=beta, init="normal", init_std=1.0, head="sum", pool=pool, num_outputs=1,
                      conv_impl=conv_impl, dtype=dtype)


def make_batch(image: np.ndarray, label: int, dtype: Any = np.float32) -> dict[str, jax.Array]:
    """The one-example dataset ``{"x": (1, n, n, 1), "y": (1,) int32}``."""
    x = jnp.asarray(np.asarray(image, dtype=dtype)[None, :, :, None])
    return {"x": x, "y": jnp.asarray([label], dtype=jnp.int32)}


def kernel_of(params: PyTree) -> jax.Array:
    """The ``(w, w)`` kernel of the one-layer model's params (its only leaf)."""
    leaves = jax.tree_util.tree_leaves(params)
    if len(leaves) != 1 or leaves[0].ndim != 4 or leaves[0].shape[2:] != (1, 1):
        raise ConfigError(f"expected one (w, w, 1, 1) kernel, got {[x.shape for x in leaves]}")
    return leaves[0][:, :, 0, 0]


LossParts = Callable[[PyTree, dict], tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def make_loss_parts(model: Any, alpha: float) -> LossParts:
    """``(params, batch) -> (L, (BCE, logit))`` for the loss (7) with weight decay in the loss."""
    half_alpha = 0.5 * float(alpha)

    def loss_parts(params: PyTree, batch: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        logits, _ = model.apply({"params": params}, batch["x"], train=True)
        data = losses.binary_cross_entropy(logits, batch["y"])
        decay = sum(jnp.sum(p * p) for p in jax.tree_util.tree_leaves(params))
        return data + half_alpha * decay, (data, logits[0, 0])

    return loss_parts


def make_loss_fn(model: Any, alpha: float) -> Callable[[PyTree, dict], jax.Array]:
    """``loss_fn(params, batch) -> L(K)`` of Eq. (7) (the form :mod:`eos_jax.hessian` takes)."""
    parts = make_loss_parts(model, alpha)
    return lambda params, batch: parts(params, batch)[0]


# ---------------------------------------------------------------------------- config


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


# ------------------------------------------------------------------------ simulation


class LaneState(NamedTuple):
    """State of one lane ``(dt, k)``; a leading lane axis when stacked."""

    params: PyTree  # the model's params (the kernel), frozen at the last finite iterate
    opt_state: PyTree  # eos_jax.optim.sgd state
    alive: jax.Array  # bool: every iterate so far was finite
    first_nonfinite: jax.Array  # int32: first t with K_t or L(K_t) non-finite; meaningful iff not alive


class StepRecord(NamedTuple):
    """Per-step records of one lane (before the update of step ``t``)."""

    loss: jax.Array
    data_loss: jax.Array
    logit: jax.Array
    fractions: jax.Array  # (3,), REGIMES order


def _all_finite(tree: PyTree) -> jax.Array:
    """True iff every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def make_lane_step(model: Any, alpha: float, eps: float) -> Callable[..., tuple[LaneState, StepRecord]]:
    """One gradient-descent step of one lane: ``(state, dt, k, t, batch) -> (state, record)``.

    ``dt`` and ``k`` are traced scalars; the optimizer :func:`eos_jax.optim.sgd` is built
    inside, so that one compiled program serves every lane under ``vmap``. A lane whose
    loss at ``K_t`` or whose ``K_{t+1}`` is not finite stops (keeps its last finite
    kernel) and records the first such ``t``.
    """
    loss_parts = make_loss_parts(model, alpha)
    impl = model.info["conv_impl"]

    def step(state: LaneState, dt: jax.Array, k: jax.Array, t: jax.Array, batch: dict) -> tuple[LaneState, StepRecord]:
        (loss, (data, logit)), grads = jax.value_and_grad(loss_parts, has_aux=True)(state.params, batch)
        kernel = jax.tree_util.tree_leaves(state.params)[0]
        # K * I with the model's own convolution, for the regime fractions of Table 3.
        pre = conv2d(batch["x"], kernel, padding="valid", impl=impl)
        fractions = regime_fractions(pre, eps)
        opt = optim.sgd(dt, k=k)
        updates, new_opt = opt.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        loss_ok = jnp.isfinite(loss)
        next_ok = loss_ok & _all_finite(new_params) & _all_finite(grads)
        alive_next = state.alive & next_ok
        newly_dead = state.alive & ~next_ok
        first = jnp.where(newly_dead, jnp.where(loss_ok, t + 1, t), state.first_nonfinite).astype(jnp.int32)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(alive_next, a, b), new, old)  # noqa: E731
        out = LaneState(keep(new_params, state.params), keep(new_opt, state.opt_state), alive_next, first)
        nan = jnp.asarray(jnp.nan, loss.dtype)
        rec_ok = state.alive & loss_ok
        record = StepRecord(
            jnp.where(rec_ok, loss, nan), jnp.where(rec_ok, data, nan), jnp.where(rec_ok, logit, nan),
            jnp.where(rec_ok, fractions, jnp.full_like(fractions, jnp.nan)),
        )
        return out, record

    return step


def make_chunk_fn(model: Any, alpha: float, eps: float, chunk: int) -> Callable[..., tuple[LaneState, dict]]:
    """``chunk`` steps of every lane in one ``lax.scan`` (jitted).

    Lanes are stacked as ``(n_dt, 2)`` (``k = 1`` then ``k = k_perturbed``). Steps with
    ``t >= num_steps`` leave the state unchanged (so one program serves a last, partial
    chunk). Returns the new state and records with a leading ``chunk`` axis:
    ``loss, data_loss, logit (chunk, n_dt, 2)``, ``fractions (chunk, n_dt, 2, 3)``,
    ``rel_l1 (chunk, n_dt)`` between the two lanes of each ``dt`` at ``K_t``.
    """
    lane_step = make_lane_step(model, alpha, eps)
    flat_step = jax.vmap(lane_step, in_axes=(0, 0, 0, None, None))

    def lanes(st: LaneState, dts: jax.Array, ks: jax.Array, t: jax.Array, batch: dict) -> tuple[LaneState, StepRecord]:
        # One vmap over the n_dt * 2 lanes (compiles faster than nested vmaps).
        new, rec = flat_step(_flat(st), _flat(dts), _flat(ks), t, batch)
        return _unflat(new, dts.shape[0]), _unflat(rec, dts.shape[0])

    def pair_rel_l1(state: LaneState) -> jax.Array:
        def one(params: PyTree) -> jax.Array:
            p1 = jax.tree_util.tree_map(lambda x: x[0], params)
            p3 = jax.tree_util.tree_map(lambda x: x[1], params)
            r = rel_l1(p1, p3)
            return r

        return jax.vmap(one)(state.params)

    @jax.jit
    def run_chunk(state: LaneState, dts: jax.Array, ks: jax.Array, t0: jax.Array, num_steps: jax.Array,
                  batch: dict) -> tuple[LaneState, dict]:
        def body(st: LaneState, i: jax.Array) -> tuple[LaneState, dict]:
            t = t0 + i
            new, rec = lanes(st, dts, ks, t, batch)
            # RelL1 at K_t; NaN once a lane of the pair is dead or its L(K_t) is not finite.
            r = pair_rel_l1(st)
            pair_ok = jnp.all(jnp.isfinite(rec.loss), axis=1)
            r = jnp.where(pair_ok, r, jnp.full_like(r, jnp.nan))
            active = t < num_steps
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, st)
            return new, {"loss": rec.loss, "data_loss": rec.data_loss, "logit": rec.logit,
                         "fractions": rec.fractions, "rel_l1": r}

        return jax.lax.scan(body, state, jnp.arange(chunk, dtype=jnp.int32))

    return run_chunk


def make_sharpness_fn(model: Any, alpha: float, num_iters: int) -> Callable[..., tuple[jax.Array, PyTree, jax.Array]]:
    """Jitted ``(params, v0, keys, batch) -> (lambda_max, eigenvector, residual)`` over ``(n_dt, 2)`` lanes.

    Largest ALGEBRAIC eigenvalue of the Hessian of the loss (7) in ``K`` by
    :func:`eos_jax.hessian.top_eigenvalue` (Lanczos, exactly ``num_iters`` products, so
    it vmaps), warm-started from ``v0`` (zeros: a random start from the lane's key).
    """
    loss_fn = make_loss_fn(model, alpha)

    def one(params: PyTree, v0: PyTree, key: jax.Array, batch: dict) -> tuple[jax.Array, PyTree, jax.Array]:
        res = hessian.top_eigenvalue(loss_fn, params, batch, method="lanczos", num_iters=num_iters, tol=None,
                                     v0=v0, key=key)
        return res.eigenvalue, res.eigenvector, res.residual

    flat = jax.vmap(one, in_axes=(0, 0, 0, None))

    @jax.jit
    def sharpness(params: PyTree, v0: PyTree, keys: jax.Array, batch: dict) -> tuple[jax.Array, PyTree, jax.Array]:
        n = jax.tree_util.tree_leaves(params)[0].shape[0]
        out = flat(_flat(params), _flat(v0), _flat(keys), batch)
        return _unflat(out, n)

    return sharpness


def _flat(tree: PyTree) -> PyTree:
    """Merges the two leading lane axes ``(n_dt, 2, ...)`` into one."""
    return jax.tree_util.tree_map(lambda x: x.reshape((-1, *x.shape[2:])), tree)


def _unflat(tree: PyTree, n: int) -> PyTree:
    """Splits the leading lane axis back into ``(n, -1, ...)``."""
    return jax.tree_util.tree_map(lambda x: x.reshape((n, -1, *x.shape[1:])), tree)


def init_lanes(model: Any, config: NonlinearConfig, image_shape: tuple[int, int]
               ) -> tuple[LaneState, jax.Array, jax.Array]:
    """Initial stacked state ``(n_dt, 2)`` (every lane from the same ``K_0``), and the lanes' dt and k."""
    variables = model.init(jax.random.fold_in(jax.random.key(config.seed), 0), (*image_shape, 1))
    params = variables["params"]
    n = len(config.dts)
    dts = jnp.broadcast_to(jnp.asarray(config.dts, F32)[:, None], (n, 2))
    ks = jnp.broadcast_to(jnp.asarray([1, config.k], jnp.int32)[None, :], (n, 2))
    opt_state = optim.sgd(jnp.asarray(config.dts[0], F32), k=jnp.asarray(1, jnp.int32)).init(params)
    stack = lambda x: jnp.broadcast_to(x, (n, 2, *jnp.shape(x)))  # noqa: E731
    state = LaneState(
        jax.tree_util.tree_map(stack, params), jax.tree_util.tree_map(stack, opt_state),
        jnp.ones((n, 2), bool), jnp.zeros((n, 2), jnp.int32),
    )
    return state, dts, ks


def simulate(config: NonlinearConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs every lane of ``config`` and returns NumPy histories (no files written).

    Returns:
      A dict with ``loss, data_loss, logit (steps, n_dt, 2)``, ``fractions (steps, n_dt,
      2, 3)``, ``rel_l1 (steps, n_dt)``, ``sharpness_steps (m,)``, ``sharpness (m, n_dt,
      2)`` (``lambda_max``, NaN for dead lanes), ``lanczos_residual (m, n_dt, 2)``,
      ``first_nonfinite`` (per dt a list of 2: the first non-finite step or None),
      ``final_params``, ``initial_kernel``, ``eps``, ``model_info`` and wall-clock
      ``timing``.
    """
    config.validate()
    eps = regime_threshold(config.beta, config.regime_tol)
    image = checkerboard(config.size, square=config.square, dtype=np.float32)
    model = make_model(config.kernel, beta=config.beta, pool=config.pool, conv_impl=config.conv_impl)
    batch = make_batch(image, config.label)
    state, dts, ks = init_lanes(model, config, image.shape)
    initial_kernel = np.asarray(kernel_of(jax.tree_util.tree_map(lambda x: x[0, 0], state.params)))
    chunk = config.sharpness_every
    run_chunk = make_chunk_fn(model, config.alpha, eps, chunk)
    sharp = make_sharpness_fn(model, config.alpha, config.sharpness_iters)
    n = len(config.dts)
    base_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    lane_keys = jax.vmap(jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j),
                                  in_axes=(None, 0)), in_axes=(0, None))(jnp.arange(n), jnp.arange(2))
    v0 = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    num_steps = jnp.asarray(config.steps, jnp.int32)
    records: dict[str, list[np.ndarray]] = {}
    sharp_steps: list[int] = []
    sharp_vals: list[np.ndarray] = []
    sharp_res: list[np.ndarray] = []
    t_chunks = t_sharp = 0.0
    t_first_chunk = t_first_sharp = None

    def measure(t: int) -> None:
        nonlocal v0, t_sharp, t_first_sharp
        t0 = time.perf_counter()
        keys = jax.vmap(jax.vmap(lambda k_: jax.random.fold_in(k_, t)))(lane_keys)
        lam, vec, res = sharp(state.params, v0, keys, batch)
        lam = np.asarray(lam)
        dt_sec = time.perf_counter() - t0
        if t_first_sharp is None:
            t_first_sharp = dt_sec
        else:
            t_sharp += dt_sec
        v0 = vec
        alive = np.asarray(state.alive)
        sharp_steps.append(t)
        sharp_vals.append(np.where(alive, lam, np.nan))
        sharp_res.append(np.where(alive, np.asarray(res), np.nan))

    t = 0
    t_begin = time.perf_counter()
    while t < config.steps:
        if t % config.sharpness_every == 0:
            measure(t)
        t0 = time.perf_counter()
        state, rec = run_chunk(state, dts, ks, jnp.asarray(t, jnp.int32), num_steps, batch)
        rec = jax.device_get(rec)
        dt_sec = time.perf_counter() - t0
        if t_first_chunk is None:
            t_first_chunk = dt_sec
        else:
            t_chunks += dt_sec
        take = min(chunk, config.steps - t)
        for name, arr in rec.items():
            records.setdefault(name, []).append(np.asarray(arr)[:take])
        crossed = (t + take) * 10 // config.steps > t * 10 // config.steps  # one line per 10% of the run
        t += take
        if log is not None and crossed:
            log(f"step {t}/{config.steps}  alive lanes {int(np.asarray(state.alive).sum())}/{2 * n}  "
                f"{time.perf_counter() - t_begin:.0f} s")
    if config.steps % config.sharpness_every == 0:
        measure(config.steps)
    out = {name: np.concatenate(parts, axis=0) for name, parts in records.items()}
    alive = np.asarray(state.alive)
    first = np.asarray(state.first_nonfinite)
    out.update(
        sharpness_steps=np.asarray(sharp_steps, np.int64),
        sharpness=np.stack(sharp_vals),
        lanczos_residual=np.stack(sharp_res),
        first_nonfinite=[[None if alive[i, j] else int(first[i, j]) for j in range(2)] for i in range(n)],
        final_params=jax.device_get(state.params),
        initial_kernel=initial_kernel,
        eps=eps,
        model_info=model.info,
        timing={"first_chunk_with_compile_s": t_first_chunk, "other_chunks_s": t_chunks,
                "first_sharpness_with_compile_s": t_first_sharp, "other_sharpness_s": t_sharp,
                "chunk_steps": chunk, "lanes": 2 * n},
    )
    return out


# ---------------------------------------------------------------------- classification


def oscillation(values: np.ndarray) -> float:
    """Non-monotone part of the variation of ``values``, relative to their mean magnitude.

    ``(TV - |v_end - v_start|) / (W * mean|v|)`` with ``TV = sum |v_{i+1} - v_i|`` over
    the ``W`` values: 0 for a monotone sequence, ``~ 2A/m`` for a period-2 oscillation of
    amplitude ``A`` around ``m``. NaN if any value is not finite.
    """
    v = np.asarray(values, np.float64)
    if v.size < 2 or not np.all(np.isfinite(v)):
        return float("nan") if not np.all(np.isfinite(v)) else 0.0
    tv = float(np.sum(np.abs(np.diff(v))))
    net = abs(float(v[-1] - v[0]))
    scale = float(np.mean(np.abs(v)))
    if scale == 0.0:
        return 0.0
    return (tv - net) / (v.size * scale)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` consecutive values: entry ``j`` averages ``values[j : j + window]``.

    The smoothing of the authors' Figure 5 (right) (``instability/compute_one_layer.m``:
    ``L2_average(i) = mean(L2(i:i+interval-1))``, ``interval = 100``); their loop stops one
    window short of the end, this one keeps every full window (``len - window + 1``
    values; none when the series is shorter). A NaN in a window gives NaN.
    """
    v = np.asarray(values, np.float64)
    if v.size < window:
        return np.zeros((0,), np.float64)
    # Each window summed on its own (no running sum whose rounding would drift).
    return np.lib.stride_tricks.sliding_window_view(v, window).mean(axis=1)


def classification_rule(config: NonlinearConfig) -> str:
    """The classification rule in words, with this run's levels."""
    return (
        f"on the last W={config.num_window} records: 'divergent' if a lane (k=1 or k={config.k}) of this dt "
        f"became non-finite, or its loss stays above {config.growth_factor:g} x the initial loss over the whole "
        f"window; else 'restrained' if the k=1 loss oscillates -- non-monotone variation (TV - |net change|) / "
        f"(W mean|L|) > {config.osc_level:g} -- or max RelL1(k=1, k={config.k}) over the window > "
        f"{config.rel_l1_level:g} (perturbation amplified; a non-amplified perturbation stays near the "
        f"accumulated rounding, ~ steps x 2^-24); else 'stable'"
    )


def classify(loss: np.ndarray, rel: np.ndarray, first_nonfinite: list[int | None], config: NonlinearConfig
             ) -> tuple[str, dict[str, Any]]:
    """Classifies one ``dt`` from its histories (see :func:`classification_rule`).

    Args:
      loss: ``(steps, 2)`` loss of the lanes ``k = 1`` and ``k = k_perturbed``.
      rel: ``(steps,)`` RelL1 between them.
      first_nonfinite: per lane the first non-finite step, None if it stayed finite.
      config: levels and window.

    Returns:
      ``(class, evidence)`` where evidence holds the measured quantities.
    """
    w = config.num_window
    initial = float(loss[0, 0])
    nonfinite = [int(s) for s in first_nonfinite if s is not None]
    ev: dict[str, Any] = {"first_nonfinite_step": min(nonfinite) if nonfinite else None, "window": w}
    tail = loss[-w:, :]
    ev["window_min_loss"] = float(np.nanmin(tail[:, 0])) if np.any(np.isfinite(tail[:, 0])) else None
    ev["window_max_loss"] = float(np.nanmax(tail[:, 0])) if np.any(np.isfinite(tail[:, 0])) else None
    ev["final_loss"] = float(loss[-1, 0]) if np.isfinite(loss[-1, 0]) else None
    ev["initial_loss"] = initial
    if nonfinite:
        return "divergent", ev
    growing = bool(np.all(tail > config.growth_factor * initial))
    ev["growing"] = growing
    if growing:
        return "divergent", ev
    osc = oscillation(tail[:, 0])
    rel_max = float(np.max(rel[-w:]))
    ev["oscillation"] = osc
    ev["window_max_rel_l1"] = rel_max
    ev["final_rel_l1"] = float(rel[-1])
    ev["oscillating"] = bool(osc > config.osc_level)
    ev["amplified"] = bool(rel_max > config.rel_l1_level)
    if ev["oscillating"] or ev["amplified"]:
        return "restrained", ev
    return "stable", ev


# ---------------------------------------------------------------------------- theory


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    """Logistic function in float64 without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def checkerboard_loss_1d(c: np.ndarray, *, size: int, kernel: int, alpha: float, beta: float, label: int,
                         pool: str) -> dict[str, np.ndarray]:
    """The loss (7) on the pixel checkerboard as a function of ``c = <K, chi>``, with its derivatives.

    For ``I(x) = (-1)^(x1+x2)`` every output is ``(K * I)(x) = (-1)^(x1+x2) c`` with
    ``chi(z) = (-1)^(z1+z2)`` on the window, so the logit is ``g(c) = q (n_+ r(c) + n_- r(-c))``
    (``n_+`` / ``n_-`` the valid positions of even / odd parity, ``q`` = :func:`pool_scale`)
    and ``L(K) = l(c) + (alpha/2) ||K||^2`` with ``l(c) = BCE(s(g(c)), y)``. Writing
    ``K = (c/w^2) chi + K_perp``, the Hessian is ``l''(c) chi chi^T + alpha I``: eigenvalue
    ``alpha`` on ``chi``'s orthogonal complement and ``w^2 l''(c) + alpha`` along ``chi``.

    Args:
      c: values of ``<K, chi>`` (float64 array).
      size, kernel: ``n`` and ``w``.
      alpha, beta, label, pool: as in :class:`NonlinearConfig`.

    Returns:
      dict of float64 arrays: ``g``, ``loss_c`` (``l(c) + alpha c^2/(2 w^2)``, the loss at
      ``K_perp = 0``), ``grad_c`` (its derivative in ``c``) and ``lambda_chi``
      (``w^2 l''(c) + alpha``, the Hessian eigenvalue along ``chi``).
    """
    c = np.asarray(c, np.float64)
    v = size - kernel + 1
    n_plus, n_minus = (v * v + 1) // 2, (v * v) // 2
    q = pool_scale(pool, v * v)

    def r_derivs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = _sigmoid64(beta * x)
        return x * s, s + beta * x * s * (1 - s), beta * s * (1 - s) * (2 + beta * x * (1 - 2 * s))

    r_p, d1_p, d2_p = r_derivs(c)
    r_m, d1_m, d2_m = r_derivs(-c)
    g = q * (n_plus * r_p + n_minus * r_m)
    g1 = q * (n_plus * d1_p - n_minus * d1_m)
    g2 = q * (n_plus * d2_p + n_minus * d2_m)
    sg = _sigmoid64(g)
    bce = np.logaddexp(0.0, g) - label * g  # BCE(s(g), y) = softplus(g) - y g
    w2 = float(kernel * kernel)
    return {
        "g": g,
        "loss_c": bce + 0.5 * alpha * c * c / w2,
        "grad_c": (sg - label) * g1 + alpha * c / w2,
        "lambda_chi": w2 * (sg * (1 - sg) * g1 * g1 + (sg - label) * g2) + alpha,
    }


def checkerboard_minima(*, size: int, kernel: int, alpha: float, beta: float, label: int, pool: str,
                        c_max: float = 200.0, grid: int = 40001) -> list[dict[str, float]]:
    """Local minima of the loss (7) on the pixel checkerboard and GD's stability bound there.

    Roots of ``d/dc [l(c) + alpha c^2/(2 w^2)]`` (:func:`checkerboard_loss_1d`) with a
    positive second derivative, located on a grid of ``[-c_max, c_max]`` and refined by
    bisection in float64. At such a minimum ``K* = (c*/w^2) chi`` the Hessian's largest
    eigenvalue is ``lambda* = max(alpha, lambdachi(c*))``, so gradient descent is linearly
    stable there iff ``dt < 2/lambda*``.

    Returns:
      One dict per minimum (ascending ``c``): ``c``, ``logit_g``, ``a`` (``y_hat - y``),
      ``lambda_chi``, ``lambda_max``, ``dt_max`` (``2/lambda_max``).
    """
    kw = dict(size=size, kernel=kernel, alpha=alpha, beta=beta, label=label, pool=pool)
    xs = np.linspace(-c_max, c_max, grid)
    d = checkerboard_loss_1d(xs, **kw)["grad_c"]
    out = []
    for i in np.nonzero((d[:-1] < 0) & (d[1:] >= 0))[0]:  # grad goes - to +: a minimum
        lo, hi = float(xs[i]), float(xs[i + 1])
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if checkerboard_loss_1d(np.asarray(mid), **kw)["grad_c"] < 0:
                lo = mid
            else:
                hi = mid
        c = 0.5 * (lo + hi)
        f = checkerboard_loss_1d(np.asarray(c), **kw)
        lam = max(float(alpha), float(f["lambda_chi"]))
        out.append({"c": c, "logit_g": float(f["g"]), "a": float(_sigmoid64(f["g"])) - label,
                    "loss": float(f["loss_c"]), "lambda_chi": float(f["lambda_chi"]), "lambda_max": lam,
                    "dt_max": 2.0 / lam if lam > 0 else None})
    return out


def checkerboard_orbit(c0: float, dts: tuple[float, ...], *, steps: int, window: int, sample_every: int,
                       size: int, kernel: int, alpha: float, beta: float, label: int, pool: str,
                       max_period: int = 8) -> dict[str, dict[str, Any]]:
    """Gradient descent (9) on the pixel checkerboard as the one-dimensional map of ``c = <K, chi>``.

    With ``K = (c/w^2) chi + K_perp`` the step ``K <- K - dt grad L`` is exactly
    ``c <- c - dt w^2 d/dc[l(c) + alpha c^2/(2 w^2)]`` and ``K_perp <- (1 - dt alpha) K_perp``
    (:func:`checkerboard_loss_1d`), so the run's ``c_t`` follows this map from its ``c_0``
    (float64 here, float32 in the run). Over the last ``window`` iterates ``c_t``
    (``t = steps - window .. steps - 1``, the run's record indexing) it reports the period of
    the orbit, the largest ``dt lambda_max`` (``lambda_max = max(alpha, lambdachi(c_t))``)
    at every step and at the steps the run samples (``t % sample_every == 0``), and the
    regime it predicts: "divergent" if ``dt alpha >= 2`` (``K_perp`` grows) or ``c``
    leaves the finite range, "stable" if the orbit is a fixed point, "restrained" otherwise.

    Returns:
      Per ``dt`` key a dict: ``predicted``, ``period`` (1..max_period, None if aperiodic),
      ``c_range``, ``max_dt_lambda``, ``max_dt_lambda_sampled``.
    """
    kw = dict(size=size, kernel=kernel, alpha=alpha, beta=beta, label=label, pool=pool)
    d = np.asarray(dts, np.float64)
    c = np.full(d.shape, float(c0))
    w2 = float(kernel * kernel)
    hist_c = np.empty((window, d.size))
    hist_l = np.empty((window, d.size))
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            f = checkerboard_loss_1d(c, **kw)
            if t >= steps - window:
                hist_c[t - (steps - window)] = c
                hist_l[t - (steps - window)] = np.maximum(alpha, f["lambda_chi"])
            c = c - d * w2 * f["grad_c"]
    ts = np.arange(steps - window, steps)
    sampled = ts % sample_every == 0
    out = {}
    for i, dt in enumerate(dts):
        hc, hl = hist_c[:, i], dt * hist_l[:, i]
        finite = bool(np.all(np.isfinite(hc)))
        period = None
        if finite:
            tol = 1e-9 * max(1.0, float(np.max(np.abs(hc))))
            for p in range(1, min(max_period, window - 1) + 1):
                if np.all(np.abs(hc[p:] - hc[:-p]) <= tol):
                    period = p
                    break
        if dt * alpha >= 2 or not finite:
            pred = "divergent"
        elif window < 3:
            pred = "undetermined"  # too few iterates to tell a fixed point from an orbit
        elif period == 1:
            pred = "stable"
        else:
            pred = "restrained"
        out[dt_key(dt)] = {
            "predicted": pred, "period": period,
            "c_range": [float(np.min(hc)), float(np.max(hc))] if finite else None,
            "max_dt_lambda": float(np.max(hl)) if finite else None,
            "max_dt_lambda_sampled": float(np.max(hl[sampled])) if finite and np.any(sampled) else None,
        }
    return out


def theory(image: np.ndarray, kernel: int, *, alpha: float, beta: float, label: int, dts: tuple[float, ...],
           pool: str = "mean", square: int | None = None, key: jax.Array | None = None) -> dict[str, Any]:
    """Table 3's stability bounds for this input and pooling, beside the windowed bounds.

    The pooling scales the data term of (8) by ``q`` (:func:`pool_scale`): ``q = 1/P``,
    ``P = (n - w + 1)^2``, for the mean, 1 for the sum. The paper's bounds are for the
    sum (``Ibar`` "the input sum", Eq. (47)); with the mean every data term below carries
    ``q`` (the periodic ``w -> infinity`` versions correlate over all ``n^2`` positions, so
    there ``q = 1/n^2``):

    * not activated (``K*I << 0``, ``dK/dt = -alpha K``): stable iff ``dt < 2/alpha``.
    * activated (``K*I >> 0``, Appendix D.5): ``alpha < 2/dt - (q Ibar)^2/8`` with ``Ibar``
      the sum of the image (``q Ibar`` its mean for the mean pooling).
    * transitioning (``K*I ~ 0``, Eq. (14)) with ``a = s(0) - y`` (the linearization at
      ``K = 0``): ``alpha_min = -(a beta/2) q max|I_hat|^2 < alpha < 2/dt - (a beta/2) q
      min|I_hat|^2`` (unnormalized DFT of the whole image), and the same formula with the
      extreme eigenvalues ``q mu`` of the windowed ``q M = q W[(. * I) * I]`` for a
      ``kernel x kernel`` window and valid correlations (float64 power iteration,
      :func:`eos_jax.pde.linear.operator_extremes`).
    * windowed activated analogue (ours): with every position activated the data
      gradient is ``a q S`` with ``S(z) = sum_x I(x + z)`` over the valid positions (the
      window's "Ibar"); linearizing ``a`` at ``K = 0`` as in D.5 (``da/dK = q S/8``) gives
      ``dt < 2/(alpha + q^2 ||S||^2/8)``.
    * pixel checkerboard (``square == 1``): the loss is a function of ``c = <K, chi>`` and
      ``||K||``; its minima and GD's bound ``dt < 2/lambda_max`` there
      (:func:`checkerboard_minima`), the threshold between converging and oscillating.

    Returns:
      A JSON-able dict (per-dt booleans under ``per_dt``).
    """
    img = np.asarray(image, np.float64)
    n = img.shape[0]
    spec = np.asarray(linear.image_spectrum(img))
    a0 = 0.5 - label
    ibar = float(img.sum())
    v = n - kernel + 1
    q = pool_scale(pool, v * v)
    q_per = pool_scale(pool, n * n)
    # S(z) = sum over the valid (v x v) block of I shifted by z: a (kernel x kernel) map.
    csum = np.pad(np.cumsum(np.cumsum(img, 0), 1), ((1, 0), (1, 0)))
    s_map = (csum[v:v + kernel, v:v + kernel] - csum[:kernel, v:v + kernel] - csum[v:v + kernel, :kernel]
             + csum[:kernel, :kernel])
    op = linear.make_windowed_operator(img, kernel)
    eig = linear.operator_extremes(op, (kernel, kernel), jax.random.key(0) if key is None else key)
    act = alpha + (q_per * ibar) ** 2 / 8.0
    out: dict[str, Any] = {
        "pool": pool,
        "positions_P": v * v,
        "data_term_scale_q": q,
        "data_term_scale_periodic": q_per,
        "image_sum_Ibar": ibar,
        "image_mean": ibar / (n * n),
        "window_sums_S": {"min": float(s_map.min()), "max": float(s_map.max()), "sum_sq": float((s_map ** 2).sum())},
        "min_abs_I_hat_sq": float(spec.min()), "max_abs_I_hat_sq": float(spec.max()),
        "a_linearization": a0,
        "window_mu_min": eig.mu_min, "window_mu_max": eig.mu_max,
        "window_mu_scaled": [q * eig.mu_min, q * eig.mu_max],
        "not_activated_dt_max": 2.0 / alpha if alpha > 0 else None,
        "activated_dt_max": 2.0 / act if act > 0 else None,
        "activated_window_dt_max": 2.0 / (alpha + q * q * float((s_map ** 2).sum()) / 8.0),
        "checkerboard_minima": (checkerboard_minima(size=n, kernel=kernel, alpha=alpha, beta=beta, label=label,
                                                    pool=pool) if square == 1 else None),
        "per_dt": {},
    }
    c = 0.5 * a0 * beta
    for dt in dts:
        p_min, p_max = linear.alpha_bounds(q_per * float(spec.min()), q_per * float(spec.max()), scheme="gd", dt=dt,
                                           a=a0, beta=beta)
        w_min, w_max = linear.alpha_bounds(q * eig.mu_min, q * eig.mu_max, scheme="gd", dt=dt, a=a0, beta=beta)
        out["per_dt"][dt_key(dt)] = {
            "not_activated_stable": bool(dt * alpha < 2),
            "activated_stable": bool(alpha < 2.0 / dt - (q_per * ibar) ** 2 / 8.0),
            "transitioning_alpha_min": p_min, "transitioning_alpha_max": p_max,
            "transitioning_stable": bool(p_min < alpha < p_max),
            "transitioning_window_alpha_min": w_min, "transitioning_window_alpha_max": w_max,
            "transitioning_window_stable": bool(w_min < alpha < w_max),
        }
        if out["checkerboard_minima"]:
            out["per_dt"][dt_key(dt)]["checkerboard_minimum_stable"] = [
                bool(m["dt_max"] is not None and dt < m["dt_max"]) for m in out["checkerboard_minima"]]
    out["transitioning_c"] = c
    return out


def dt_key(dt: float) -> str:
    """The JSON key of a step size."""
    return f"{dt:g}"


def chi(kernel: int) -> np.ndarray:
    """``chi(z) = (-1)^(z1+z2)`` on the ``kernel x kernel`` window (float64)."""
    i = np.arange(kernel)
    return np.where((i[:, None] + i[None, :]) % 2 == 0, 1.0, -1.0)
