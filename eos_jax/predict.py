"""Predicting the regime of a run before training it: the paper's stability bounds as a predictor.

Every function here is pure: it takes measured curvature (or the loss, parameters and data
to measure it on) and returns bounds and verdicts; nothing trains a model. Three pieces:

* (a) the classical bound ``lr < threshold / lambda_max`` (``threshold`` from
  :func:`eos_jax.hessian.stability_threshold`: 2 for gradient descent, ``2 + 2 beta`` with
  heavy-ball momentum, ...) at initialization, and along a short probe run, with the
  sharpening extrapolated to the horizon: :func:`path_sharpness` (the largest sharpness
  along the sampled gradient-flow path, saturating past the last sample) or the linear
  trend :func:`sharpness_trend` / :func:`horizon_lr_max`: progressive sharpening lowers
  the bound as training goes on;
* (b) the paper's per-layer bounds (Section 5.5, Theorem 5.7): each layer seen as a
  one-layer network on its own input (:func:`layer_bounds`, from the diagonal Hessian
  blocks), and the closed form (14) / Table 3 for a layer with input ``I`` and effective
  ``a gamma`` (:func:`windowed_bound`, the spectrum of ``K -> (K * I) * I`` on the kernel's
  window); for the one-layer PDE (9), :func:`pde_bounds` reads Table 3 off
  :func:`eos_jax.pde.nonlinear.theory`;
* (c) :func:`verdict`: the regime a step size leads to under a list of :class:`Bound`\\ s,
  the deciding bound and layer, and a confidence that falls as the step size nears a bound.

Regime names are those of :mod:`eos_jax.stability` (``stable``, ``transient``,
``restrained``, ``collapsed``, ``divergent``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from eos_jax import hessian
from eos_jax.errors import ConfigError

PyTree = Any

# Regimes a bound can lead to when a step size exceeds it, mildest first (eos_jax.stability's names).
EFFECTS = ("transient", "restrained", "collapsed", "divergent")
SEVERITY = {"stable": 0, **{e: i + 1 for i, e in enumerate(EFFECTS)}}
# e-folds of weight decay that shrink a kernel to 1 % of its size: "pulled back to K = 0" (training_bounds).
DECAY_TO_ZERO_EFOLDS = math.log(100.0)


class Bound(NamedTuple):
    """One stability bound on the step size.

    Attributes:
      name: what the bound is (e.g. ``"classical at init"``, ``"not activated (Table 3)"``).
      lr_max: the largest stable step size under the bound (``inf``: no limit; ``0``: no
        step size is stable under it).
      effect: the regime a larger step size leads to (one of :data:`EFFECTS`), or None for a
        bound reported beside the verdict without deciding it.
      layer: the layer it belongs to, None for the whole network.

    Examples:
      >>> from eos_jax.predict import Bound
      >>> Bound("not activated (Table 3)", 0.1, "divergent")
      Bound(name='not activated (Table 3)', lr_max=0.1, effect='divergent', layer=None)
    """

    name: str
    lr_max: float
    effect: str | None
    layer: str | None = None


def classical_lr_max(sharpness: float, *, kind: str = "gd", beta: float = 0.0) -> float:
    """The classical bound ``threshold / lambda_max`` on the learning rate (Section 6).

    Args:
      sharpness: ``lambda_max``, the largest algebraic Hessian eigenvalue.
      kind, beta: the optimizer, as in :func:`eos_jax.hessian.stability_threshold`.

    Returns:
      The largest stable learning rate, ``inf`` when ``lambda_max <= 0``.

    Examples:
      >>> from eos_jax.predict import classical_lr_max
      >>> classical_lr_max(0.1), classical_lr_max(0.1, kind="heavy_ball", beta=0.5), classical_lr_max(-1.0)
      (20.0, 30.0, inf)
    """
    thr = hessian.stability_threshold(kind, beta=beta)
    return thr / float(sharpness) if sharpness > 0 else math.inf


def classical_bound(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    *,
    kind: str = "gd",
    beta: float = 0.0,
    num_iters: int = 20,
    key: jax.Array | None = None,
) -> dict[str, float]:
    """``lambda_max`` at ``params`` (Lanczos, :func:`eos_jax.hessian.top_eigenvalue`) and its classical bound.

    Returns:
      ``{"sharpness": lambda_max, "threshold": t, "lr_max": t / lambda_max}``.

    Examples:
      ``H = diag(1, 4)``: the bound is ``2/4``:

      >>> import jax.numpy as jnp
      >>> from eos_jax.predict import classical_bound
      >>> loss = lambda p, x: jnp.mean((x @ p) ** 2)
      >>> b = classical_bound(loss, jnp.array([0.5, -1.0]), jnp.array([[1.0, 0.0], [0.0, 2.0]]), num_iters=2)
      >>> round(b["sharpness"], 4), round(b["lr_max"], 4)
      (4.0, 0.5)
    """
    solve = jax.jit(lambda p, b: hessian.top_eigenvalue(loss_fn, p, b, num_iters=num_iters, key=key).eigenvalue)
    lam = float(solve(params, batch))
    thr = hessian.stability_threshold(kind, beta=beta)
    return {"sharpness": lam, "threshold": thr, "lr_max": classical_lr_max(lam, kind=kind, beta=beta)}


def sharpness_trend(times: Sequence[float], sharpness: Sequence[float]) -> dict[str, float]:
    """Least-squares line ``lambda(tau) = lambda_0 + slope tau`` through probe samples.

    ``tau`` is gradient-flow time (``learning rate x steps``): to first order the sharpness
    follows gradient flow whatever the (stable) step size, so the trend of one probe
    extrapolates to any learning rate's horizon. Non-finite samples are ignored.

    Args:
      times: gradient-flow times of the samples.
      sharpness: ``lambda_max`` at those times.

    Returns:
      ``{"lambda_0", "slope", "samples"}`` (slope 0 from fewer than two samples).

    Examples:
      >>> from eos_jax.predict import sharpness_trend
      >>> sharpness_trend([0.0, 10.0, 20.0], [1.0, 1.5, 2.0])
      {'lambda_0': 1.0, 'slope': 0.05, 'samples': 3}
    """
    t = np.asarray(times, np.float64)
    s = np.asarray(sharpness, np.float64)
    ok = np.isfinite(t) & np.isfinite(s)
    t, s = t[ok], s[ok]
    if t.size == 0:
        raise ConfigError("sharpness_trend: no finite sample")
    if t.size < 2 or np.ptp(t) == 0:
        return {"lambda_0": float(s[0]), "slope": 0.0, "samples": int(t.size)}
    slope, icpt = np.polyfit(t, s, 1)
    return {"lambda_0": round(float(icpt), 12), "slope": round(float(slope), 12), "samples": int(t.size)}


def horizon_lr_max(lambda_0: float, slope: float, steps: int, *, threshold: float = 2.0) -> float:
    """The largest learning rate whose sharpness, extrapolated to step ``steps``, stays below ``threshold / lr``.

    With ``lambda(tau) = lambda_0 + slope tau`` and ``tau = lr steps``, the bound
    ``lr lambda(lr steps) < threshold`` is the positive root of
    ``slope steps lr^2 + lambda_0 lr - threshold``. A flat or falling trend keeps the
    bound at initialization (``threshold / lambda_0``): the extrapolation only tightens it.

    Examples:
      Sharpness 0.1 at init growing by 0.001 per unit of time, over 300 steps: lr 10 reaches
      ``10 (0.1 + 0.001 * 3000) = 31`` so the bound drops from 20 to about 2.4:

      >>> from eos_jax.predict import horizon_lr_max
      >>> round(horizon_lr_max(0.1, 0.001, 300), 4), horizon_lr_max(0.1, -0.01, 300)
      (2.4207, 20.0)
    """
    if lambda_0 <= 0 and slope <= 0:
        return math.inf
    if slope <= 0:
        return threshold / lambda_0
    a, b = slope * steps, lambda_0
    return (-b + math.sqrt(b * b + 4.0 * a * threshold)) / (2.0 * a)


def layer_bounds(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    *,
    kind: str = "gd",
    beta: float = 0.0,
    num_iters: int = 20,
    effect: str | None = None,
) -> list[Bound]:
    """Per-layer bounds: each layer as a one-layer network with the others fixed (Section 5.5).

    Theorem 5.7 writes the gradient in layer ``i``'s kernel as the one-layer gradient (8) on
    that layer's input, with ``a`` replaced by ``a gamma`` from the downstream layers; its
    linearization is the layer's diagonal Hessian block ``H_ii``
    (:func:`eos_jax.hessian.layer_sharpness`), and "optimization will be stable when
    stability conditions are met for each layer": ``lr < threshold / lambda_max(H_ii)``.
    A diagonal block's largest eigenvalue is at most the Hessian's, so each of these bounds
    is at least the classical one; the layer with the lowest bound goes unstable first.

    Returns:
      One :class:`Bound` per layer (name ``"layer (Thm 5.7)"``, ``layer`` the layer's name),
      in tree order, with the given ``effect``.

    Examples:
      Two layers with diagonal blocks ``diag(1, 4)`` and ``diag(1, 4) / 4``:

      >>> import jax.numpy as jnp
      >>> from eos_jax.predict import layer_bounds
      >>> def loss(p, x):
      ...     return jnp.mean((x @ p["a"]) ** 2) + jnp.mean((x @ p["b"]) ** 2) / 4
      >>> p = {"a": jnp.array([0.5, -1.0]), "b": jnp.array([0.5, -1.0])}
      >>> [(b.layer, round(b.lr_max, 4)) for b in layer_bounds(loss, p, jnp.array([[1.0, 0.0], [0.0, 2.0]]))]
      [("['a']", 0.5), ("['b']", 2.0)]
    """
    solve = jax.jit(
        lambda p, b: {n: r.eigenvalue for n, r in hessian.layer_sharpness(loss_fn, p, b, num_iters=num_iters).items()}
    )
    return [
        Bound("layer (Thm 5.7)", classical_lr_max(float(lam), kind=kind, beta=beta), effect, name)
        for name, lam in solve(params, batch).items()
    ]


def patch_gram(images: np.ndarray, w: int, weights: np.ndarray | None = None) -> np.ndarray:
    """The windowed operator ``K -> W[(K * I) * I]`` as a dense ``(w^2, w^2)`` matrix, weighted over images.

    ``W[(K * I) * I](z) = sum_x I(x + z) sum_z' K(z') I(x + z')`` over the valid positions
    ``x``, so the matrix is the Gram matrix of the ``w x w`` patches of ``I``:
    ``M[z, z'] = sum_n c_n sum_x I_n(x + z) I_n(x + z')`` (``c_n = weights``, default 1; row
    ``z = i w + j`` is the kernel entry ``(i, j)``). Float64, exact: the dense reference of
    :func:`eos_jax.pde.linear.make_windowed_operator`.

    Args:
      images: ``(N, H, W)`` or ``(H, W)`` inputs.
      w: kernel side.
      weights: ``(N,)`` per-image coefficients (e.g. ``a_n gamma_n`` of Theorem 5.7).

    Examples:
      The 8 x 8 pixel checkerboard with ``w = 3``: rank one, ``mu_max = 6^2 3^2 = 324``:

      >>> import numpy as np
      >>> from eos_jax.pde.common import checkerboard
      >>> from eos_jax.predict import patch_gram
      >>> ev = np.linalg.eigvalsh(patch_gram(checkerboard(8), 3))
      >>> round(float(ev[-1]), 6), round(float(abs(ev[0])), 6)
      (324.0, 0.0)
    """
    img = np.asarray(images, np.float64)
    img = img[None] if img.ndim == 2 else img
    n, h, wd = img.shape
    if not 1 <= w <= min(h, wd):
        raise ConfigError(f"kernel side w={w!r}; expected 1 <= w <= {min(h, wd)}")
    c = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    vh, vw = h - w + 1, wd - w + 1
    shifted = np.empty((w * w, n, vh, vw))  # row z = i w + j: I(x + z) over the valid positions x of every image
    for i in range(w):
        for j in range(w):
            shifted[i * w + j] = img[:, i : i + vh, j : j + vw]
    weighted = (shifted * c[None, :, None, None]).reshape(w * w, -1)
    return weighted @ shifted.reshape(w * w, -1).T  # one matrix product: 4x faster than the 3-operand einsum


def windowed_bound(gram: np.ndarray, *, alpha: float, beta: float = 1.0, scale: float = 1.0) -> dict[str, float]:
    """The region of (14) / Table 3 ("transitioning") for a layer: ``alpha_min`` and the largest stable step.

    The linearized PDE (10) of a layer with windowed data term ``scale (a beta / 2) M``
    (``M``: :func:`patch_gram` with weights ``a_n gamma_n``, so ``a`` and the downstream
    ``gamma`` of Theorem 5.7 are inside; ``scale``: the pooling's ``1/P``) has gradient
    amplifiers ``z = alpha + scale (beta/2) mu`` over the eigenvalues ``mu`` of ``M`` and is
    stable iff ``0 < z < 2 / dt`` for all of them (Eq. (13)-(14)): ``alpha > alpha_min =
    -scale (beta/2) mu_min`` and ``dt < 2 / z_max``.

    Returns:
      ``{"mu_min", "mu_max", "alpha_min", "z_max", "lr_max"}`` (``lr_max`` 0 when ``alpha <=
      alpha_min``: the linearization grows at every step size; ``inf`` when ``z_max <= 0``).

    Examples:
      Eq. (14) with ``a = -1/2``, ``beta = 1`` on the spectrum ``{0, 64}`` (``M = -0.5 diag(0, 64)``):
      ``alpha_min = 16`` and, at ``alpha = 20``, ``dt < 2 / 20``:

      >>> import numpy as np
      >>> from eos_jax.predict import windowed_bound
      >>> windowed_bound(-0.5 * np.diag([0.0, 64.0]), alpha=20.0)
      {'mu_min': -32.0, 'mu_max': 0.0, 'alpha_min': 16.0, 'z_max': 20.0, 'lr_max': 0.1}
    """
    ev = np.linalg.eigvalsh(np.asarray(gram, np.float64))
    c = 0.5 * beta * scale
    mu_min, mu_max = float(ev[0]) + 0.0, float(ev[-1]) + 0.0
    z = sorted((alpha + c * mu_min, alpha + c * mu_max))
    alpha_min = -min(c * mu_min, c * mu_max)
    if z[0] <= 0:
        lr_max = 0.0
    else:
        lr_max = 2.0 / z[1] if z[1] > 0 else math.inf
    return {"mu_min": mu_min, "mu_max": mu_max, "alpha_min": alpha_min, "z_max": z[1], "lr_max": lr_max}


def cnn_layer_terms(
    kernels: Sequence[jax.typing.ArrayLike], x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, *, beta: float, pool: str
) -> list[dict[str, Any]]:
    """Each layer's input ``I_i``, its ``a_n gamma_n`` and the pooling scale: Theorem 5.7 on the paper's CNN.

    The network is Eq. (20)-(21) with one channel, valid ``w x w`` cross-correlations, Swish(beta)
    and a global mean (``pool="mean"``, scale ``1/P`` over the last map's ``P`` positions) or
    sum (scale 1), one logit ``g`` and BCE. By (23)-(24) the data gradient in ``K_i`` is
    ``(y_hat - y) [gamma_bar r'(K_i * I_i)] * I_i`` with ``gamma_bar(x)`` the summed downstream
    Jacobian; linearized at ``K_i * I_i ~ 0`` (``r' ~ 1/2 + beta u / 2``) and with
    ``gamma_bar`` replaced by its mean ``gamma_n`` over positions (the paper's constant
    approximation), its Hessian is ``scale (beta/2) sum_n (a_n gamma_n / N) M_n``.

    Args:
      kernels: the layers' kernels, first layer first, each ``(w, w)`` (or ``(w, w, 1, 1)``).
      x: ``(N, H, W)`` or ``(N, H, W, 1)`` inputs.
      y: ``(N,)`` labels in {0, 1}.
      beta: Swish parameter.
      pool: "mean" or "sum".

    Returns:
      Per layer ``{"images": (N, h, w) float64 I_i, "weights": (N,) a_n gamma_n / N, "scale": q}``;
      ``gamma_n = 1`` for the last layer, so one layer gives (8)'s ``a = y_hat - y``.

    Examples:
      One layer of ones on constant images of ones: ``g = r(9)``, ``a = s(g) - y``:

      >>> import numpy as np
      >>> from eos_jax.predict import cnn_layer_terms
      >>> t = cnn_layer_terms([np.ones((3, 3))], np.ones((2, 5, 5)), np.array([1, 0]), beta=1.0, pool="mean")
      >>> t[0]["images"].shape, t[0]["scale"], [round(float(w), 3) for w in t[0]["weights"]]
      ((2, 5, 5), 0.1111111111111111, [-0.0, 0.5])
    """
    if pool not in ("mean", "sum"):
        raise ConfigError(f"pool={pool!r}; allowed: mean, sum")
    ks = [np.asarray(k, np.float64).reshape(np.shape(k)[:2]) for k in kernels]
    img = np.asarray(x, np.float64)
    img = img[..., 0] if img.ndim == 4 else img
    yv = np.asarray(y, np.float64)

    def corr(k: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(i[:, None], k[None, None], (1, 1), "VALID", precision="highest")[:, 0]

    def forward(inputs: list[jax.Array], i: int) -> jax.Array:
        h = inputs[i]
        for k in ks[i:]:
            u = corr(jax.numpy.asarray(k, h.dtype), h)
            h = u * jax.nn.sigmoid(beta * u)
        return h.mean(axis=(1, 2)) if pool == "mean" else h.sum(axis=(1, 2))

    with jax.enable_x64(True):
        inputs = [jax.numpy.asarray(img)]
        for k in ks[:-1]:
            u = corr(jax.numpy.asarray(k), inputs[-1])
            inputs.append(u * jax.nn.sigmoid(beta * u))
        g = forward(inputs, 0)
        a = np.asarray(jax.nn.sigmoid(g)) - yv
        last = inputs[-1].shape[1] - ks[-1].shape[0] + 1, inputs[-1].shape[2] - ks[-1].shape[1] + 1
        scale = 1.0 / (last[0] * last[1]) if pool == "mean" else 1.0
        out = []
        for i in range(len(ks)):
            if i + 1 < len(ks):  # gamma_n: mean over positions of dg_n / dI_{i+1}(x), over the scale
                dg = jax.grad(lambda h, i=i: forward([*inputs[: i + 1], h], i + 1).sum())(inputs[i + 1])
                gamma = np.asarray(dg.mean(axis=(1, 2))) / scale
            else:
                gamma = np.ones_like(a)
            out.append({"images": np.asarray(inputs[i]), "weights": a * gamma / len(a), "scale": scale})
    return out


def paper_layer_bounds(terms: Sequence[Mapping[str, Any]], *, alpha: float, beta: float, w: int) -> list[Bound]:
    """(14) / Table 3's transitioning bound per layer (:func:`windowed_bound` on :func:`cnn_layer_terms`).

    Reported beside a verdict, never deciding it (``effect=None``): the linearization at
    ``K * I ~ 0`` describes a kernel in the transitioning region, which an unstable (or
    growing, ``alpha < alpha_min``) kernel leaves for another regime (Section 5.4).

    Examples:
      >>> import numpy as np
      >>> from eos_jax.predict import cnn_layer_terms, paper_layer_bounds
      >>> terms = cnn_layer_terms([np.ones((3, 3))], np.ones((2, 5, 5)), np.array([1, 0]), beta=1.0, pool="mean")
      >>> b = paper_layer_bounds(terms, alpha=0.0, beta=1.0, w=3)
      >>> b[0].name, b[0].layer, b[0].effect, round(b[0].lr_max, 4)
      ('transitioning (14), windowed', 'layer0', None, 0.0)
    """
    out = []
    for i, t in enumerate(terms):
        wb = windowed_bound(patch_gram(t["images"], w, t["weights"]), alpha=alpha, beta=beta, scale=t["scale"])
        out.append(Bound("transitioning (14), windowed", wb["lr_max"], None, f"layer{i}"))
    return out


def pde_bounds(theory: Mapping[str, Any], *, alpha: float) -> list[Bound]:
    """Table 3's bounds for the non-linear one-layer PDE (9), from :func:`eos_jax.pde.nonlinear.theory`.

    * not activated (``K * I << 0``, ``dK/dt = -alpha K``): ``dt < 2 / alpha``; above it the
      kernel's decay mode grows without a data term to restrain it: divergent.
    * activated (Appendix D.5): ``dt < 2 / (alpha + Ibar^2 / 8)``; above it the activated
      region is unstable and the run falls back into the others: restrained.
    * the classical bound at the loss minimum (pixel checkerboard, where the minima are in
      closed form, :func:`eos_jax.pde.nonlinear.checkerboard_minima`): ``dt < 2 / lambda*``;
      below it gradient descent settles at the minimum, above it the orbit cannot settle
      but (below the not-activated bound) stays bounded: restrained.
    * transitioning (14) on the windowed spectrum, at ``a = s(0) - y``: reported, not deciding
      (an unstable ``K ~ 0`` is left for another region, Section 5.4).

    Returns:
      The bounds, with their effects.

    Examples:
      A 16 x 16 pixel checkerboard, ``w = 3``, ``alpha = 20`` (x64 for the theory): at the
      loss minimum the sharpest direction is the weight decay's, so every bound is ``2 / alpha``:

      >>> import jax
      >>> from eos_jax.pde.common import checkerboard
      >>> from eos_jax.pde.nonlinear import theory
      >>> from eos_jax.predict import pde_bounds, verdict
      >>> with jax.enable_x64(True):
      ...     th = theory(checkerboard(16), 3, alpha=20.0, beta=1.0, label=1, dts=(0.01,), square=1)
      >>> bounds = pde_bounds(th, alpha=20.0)
      >>> [(b.name, round(b.lr_max, 4), b.effect) for b in bounds][:3]
      [('not activated (Table 3)', 0.1, 'divergent'), ('activated (Table 3, D.5)', 0.1, 'restrained'),
       ('classical at the loss minimum', 0.1, 'restrained')]
      >>> [verdict(dt, bounds)["predicted"] for dt in (0.05, 0.12)]
      ['stable', 'divergent']
    """
    out = [
        Bound("not activated (Table 3)", theory["not_activated_dt_max"] or math.inf, "divergent"),
        Bound("activated (Table 3, D.5)", theory["activated_dt_max"] or math.inf, "restrained"),
    ]
    mins = theory.get("checkerboard_minima") or []
    dts = [m["dt_max"] for m in mins if m["dt_max"] is not None]
    if dts:
        out.append(Bound("classical at the loss minimum", min(dts), "restrained"))
    lo, hi = theory["window_mu_scaled"]
    wb = windowed_bound(np.diag([lo, hi]) * theory["a_linearization"], alpha=alpha, beta=1.0)
    out.append(Bound("transitioning (14), windowed", wb["lr_max"], None))
    return out


def confidence(lr: float, boundary: float) -> float:
    """How far ``lr`` is from the nearest deciding boundary: 0.5 on it, 1 a factor of 2 or more away.

    ``0.5 + 0.5 min(1, |log2(lr / boundary)|)``; 1 for no finite positive boundary.

    Examples:
      >>> from eos_jax.predict import confidence
      >>> confidence(1.0, 1.0), round(confidence(1.5, 1.0), 4), confidence(4.0, 1.0), confidence(1.0, float("inf"))
      (0.5, 0.7925, 1.0, 1.0)
    """
    if not (0 < boundary < math.inf) or lr <= 0:
        return 1.0
    return 0.5 + 0.5 * min(1.0, abs(math.log2(lr / boundary)))


def verdict(lr: float, bounds: Sequence[Bound]) -> dict[str, Any]:
    """The regime a step size ``lr`` leads to under ``bounds`` (Section 5.4-5.5's reading of Table 3).

    Every bound with an effect that ``lr`` exceeds (``lr >= lr_max``) is violated; the
    regime is the most severe effect among them (``transient < restrained < collapsed <
    divergent``), "stable" when none is violated. The deciding bound is the violated one of
    that effect with the lowest ``lr_max`` (for "stable": the lowest bound, the nearest to
    ``lr``). The confidence (:func:`confidence`) is taken to the nearest boundary with an
    effect; ``disagree`` lists the bounds without an effect (reported only) whose verdict
    (stable or not) differs.

    Returns:
      ``{"predicted", "deciding", "deciding_layer", "deciding_lr_max", "confidence",
      "violated", "disagree"}``.

    Examples:
      The PDE's bounds: divergent above ``2/alpha = 0.1``, restrained above 0.0323:

      >>> from eos_jax.predict import Bound, verdict
      >>> bs = [Bound("not activated", 0.1, "divergent"), Bound("minimum", 0.0323, "restrained")]
      >>> [verdict(dt, bs)["predicted"] for dt in (0.01, 0.05, 0.11)]
      ['stable', 'restrained', 'divergent']
      >>> v = verdict(0.05, bs)
      >>> v["deciding"], round(v["confidence"], 3)
      ('minimum', 0.815)
    """
    for b in bounds:
        if b.effect is not None and b.effect not in EFFECTS:
            raise ConfigError(f"bound {b.name!r}: effect={b.effect!r}; allowed: {', '.join(EFFECTS)} or None")
    deciding_bounds = [b for b in bounds if b.effect is not None]
    violated = [b for b in deciding_bounds if lr >= b.lr_max]
    if violated:
        worst = max(SEVERITY[b.effect] for b in violated)
        deciding = min((b for b in violated if SEVERITY[b.effect] == worst), key=lambda b: b.lr_max)
        predicted = deciding.effect
    else:
        deciding = min(deciding_bounds, key=lambda b: b.lr_max) if deciding_bounds else None
        predicted = "stable"
    finite = [b.lr_max for b in deciding_bounds if 0 < b.lr_max < math.inf]
    nearest = min(finite, key=lambda m: abs(math.log(lr / m))) if finite else math.inf
    unstable = predicted != "stable"
    return {
        "predicted": predicted,
        "deciding": None if deciding is None else deciding.name,
        "deciding_layer": None if deciding is None else deciding.layer,
        "deciding_lr_max": None if deciding is None else deciding.lr_max,
        "confidence": confidence(lr, nearest),
        "violated": [b.name if b.layer is None else f"{b.name} {b.layer}" for b in violated],
        "disagree": [b.name for b in bounds if b.effect is None and (lr >= b.lr_max) != unstable],
    }


def path_sharpness(times: Sequence[float], sharpness: Sequence[float], horizon: float, start: float = 0.0) -> float:
    """The largest sharpness along a sampled gradient-flow path up to time ``horizon``, extrapolated with saturation.

    To first order gradient descent at a stable step follows gradient flow, so the
    sharpness is a function of ``tau = lr x steps`` alone: probe lanes at several learning
    rates sample one curve ``lambda(tau)``. Between samples it is interpolated linearly;
    past the last sample it is extended along the last segment's slope for at most that
    segment's length (progressive sharpening saturates, so a short probe's slope is not
    carried to arbitrary horizons). The result is the maximum over ``[start, horizon]``.

    Args:
      times: gradient-flow times of the samples (``0`` for initialization).
      sharpness: ``lambda_max`` at those times.
      horizon: ``lr x steps`` of the run to predict.
      start: where the path still ahead of the run begins (e.g. ``lr x probe steps`` when
        the run's own first steps were probed and stayed stable).

    Examples:
      Samples rising from 0.02 to 0.07 by ``tau = 300``: the horizon 6000 sees 0.08 at most
      (the last segment extended by its own length), the horizon 100 the interpolation:

      >>> from eos_jax.predict import path_sharpness
      >>> ts, ls = [0.0, 150.0, 300.0], [0.02, 0.06, 0.07]
      >>> round(path_sharpness(ts, ls, 100.0), 4), round(path_sharpness(ts, ls, 6000.0), 4)
      (0.0467, 0.08)

      A sharp start already passed: from ``tau = 150`` on, the path's maximum is 0.08, not 0.5:

      >>> round(path_sharpness([0.0, 150.0, 300.0], [0.5, 0.06, 0.07], 6000.0, start=150.0), 4)
      0.08
    """
    t = np.asarray(times, np.float64)
    s = np.asarray(sharpness, np.float64)
    ok = np.isfinite(t) & np.isfinite(s)
    if not np.any(ok):
        raise ConfigError("path_sharpness: no finite sample")
    order = np.argsort(t[ok], kind="stable")
    t, s = t[ok][order], s[ok][order]
    if 0.0 < start < horizon and start <= t[-1]:  # drop the path behind the run, interpolated at ``start``
        head = float(np.interp(start, t, s))
        keep = t > start
        t, s = np.concatenate([[start], t[keep]]), np.concatenate([[head], s[keep]])
    upto = s[t <= horizon]
    best = float(upto.max()) if upto.size else float(s[0])
    inside = t[t <= horizon]
    if inside.size and horizon > inside[-1] and inside.size < t.size:  # between two samples: interpolate
        j = inside.size
        best = max(best, float(np.interp(horizon, t[j - 1 : j + 1], s[j - 1 : j + 1])))
    elif t.size >= 2 and horizon > t[-1]:  # past the last sample: the last slope, for one segment at most
        span = t[-1] - t[-2]
        slope = (s[-1] - s[-2]) / span if span > 0 else 0.0
        best = max(best, float(s[-1] + slope * min(horizon - t[-1], span)))
    return best


def training_bounds(
    lr: float,
    *,
    horizon_sharpness: float,
    weight_decay: float,
    steps: int,
    threshold: float = 2.0,
    probe_regime: str | None = None,
    probe_normalized: float | None = None,
    revivable: bool = True,
    start_sharpness: float | None = None,
    depth: int | None = None,
    layers: Sequence[Bound] = (),
) -> list[Bound]:
    """The bounds that decide a training run at learning rate ``lr`` (Sections 5.4-6 read as a predictor).

    ``horizon_sharpness`` is the largest sharpness along the path to the run's horizon
    (:func:`path_sharpness` of a probe at gradient-flow time ``lr x steps``), so the bounds
    below account for progressive sharpening:

    * classical along the path, ``lr < threshold / lambda``: above it the run reaches the edge
      within its horizon and stays there, oscillating: "restrained" (the Edge of Stability,
      Section 6; restrained instabilities, Section 5.4).
    * catapult, ``lr < 2 threshold / lambda``: above it the step overshoots the sharp direction
      by ``|1 - lr lambda| >= 3`` (gradient descent on a quadratic); the run is thrown out of the
      sharp region into a flat one and settles there: "transient". The bound above is then left
      out (the path it samples is the one the catapult leaves).
    * weight decay: in the not-activated region of Table 3 the kernel obeys ``dK/dt =
      -alpha K`` and decays back towards the transitioning region ``K * I ~ 0`` where the
      instability started. When the horizon holds at least one e-fold of that decay
      (``lr alpha steps >= 1``), a thrown-out run is sent back again and again: "restrained".
      As a bound: ``max(catapult bound, 1 / (alpha steps))``.
    * weight decay after a start past the edge (``start_sharpness``, ``lambda_max`` at step 0):
      a run with ``lr lambda_0 >= threshold`` is thrown out of its sharp region by its first
      steps, often without a rise of the loss, into a flat region where the loss gradient is
      small. When weight decay alone would shrink its kernels to 1 % within the horizon
      (``lr alpha steps >= ln 100``, :data:`DECAY_TO_ZERO_EFOLDS`), they are pulled back to
      ``K * I ~ 0``, where the instability started: "restrained". As a bound:
      ``max(threshold / lambda_0, ln 100 / (alpha steps))``. (With one e-fold, as in the rule
      above, too many such runs that settle in the flat region were called restrained.)
    * the probe's own outcome at ``lr`` (its :func:`eos_jax.stability.regime` and final
      ``lr lambda``): non-finite is "divergent"; at the edge already (``lr lambda >= 0.9
      threshold``) is "restrained"; "collapsed" (the network died) stays collapsed unless
      weight decay revives it within the horizon: the same e-fold rule, and only where the
      gradient at ``K = 0`` is non-zero (``revivable``: the forcing term ``(a/2) Ibar`` of the
      transitioning PDE; with two or more layers it carries the downstream kernels' factor
      ``gamma``, which decays to zero with them, so a dead deep network stays dead). Without
      weight decay nothing pulls such a network (gradient zero at ``K = 0``) to ``K = 0``: a
      probe that ends flat at the constant predictor's loss is a plateau the run leaves again,
      "transient".
    * one layer without weight decay (``depth=1``, ``weight_decay=0``): reaching the edge, along
      the path or in the probe, is "transient", not "restrained". Such a network has no finite
      minimum whose curvature could hold it at the edge: its Hessian is the data term's,
      weighted by ``sigma'(g)`` (Eq. (8)), which falls as the margins grow, so past the edge its
      sharpness falls and the run settles after one catapult (measured on the paper's one-layer
      CNN: ``docs/predict.md``). Deeper networks sharpen as their kernels grow (the downstream
      ``gamma`` of Theorem 5.7) and stay at the edge.
    * ``layers``: per-layer bounds (:func:`layer_bounds`, :func:`paper_layer_bounds`),
      reported beside the verdict with the effects they carry.

    Returns:
      The list of :class:`Bound` to pass to :func:`verdict`.

    Examples:
      Sharpness 0.075 along the path: lr 20 stays stable, lr 30 reaches the edge, lr 100
      catapults, and with weight decay 5e-4 over 300 steps it is sent back (restrained):

      >>> from eos_jax.predict import training_bounds, verdict
      >>> kw = dict(horizon_sharpness=0.075, steps=300)
      >>> [verdict(lr, training_bounds(lr, weight_decay=0.0, **kw))["predicted"] for lr in (20.0, 30.0, 100.0)]
      ['stable', 'restrained', 'transient']
      >>> verdict(100.0, training_bounds(100.0, weight_decay=5e-4, **kw))["deciding"]
      'weight decay back to the unstable region'

      A run that starts past the edge (``lr lambda_0 = 4``) and then sits in a flat region (path
      sharpness 0.01): stable without weight decay, pulled back with 5e-4 over 300 steps (6 e-folds):

      >>> flat = dict(horizon_sharpness=0.01, steps=300, start_sharpness=0.1)
      >>> [verdict(40.0, training_bounds(40.0, weight_decay=wd, **flat))["predicted"] for wd in (0.0, 5e-4)]
      ['stable', 'restrained']

      One layer without weight decay leaves the edge it reaches (lr 30 above):

      >>> verdict(30.0, training_bounds(30.0, weight_decay=0.0, depth=1, **kw))["predicted"]
      'transient'
    """
    lam = max(float(horizon_sharpness), 0.0)
    edge = threshold / lam if lam > 0 else math.inf
    catapult = 2.0 * edge
    revived = revivable and weight_decay > 0 and lr * weight_decay * steps >= 1.0
    at_edge = "transient" if depth == 1 and weight_decay == 0 else "restrained"  # one layer: no minimum holds it
    out = []
    if lr < catapult:
        out.append(Bound("classical along the path (probe)", edge, at_edge))
    out.append(Bound("catapult (lr lambda >= 2 threshold)", catapult, "transient"))
    if weight_decay > 0:
        back = max(catapult, 1.0 / (weight_decay * steps))
        out.append(Bound("weight decay back to the unstable region", back, "restrained"))
    if weight_decay > 0 and start_sharpness is not None and start_sharpness > 0:
        back0 = max(threshold / float(start_sharpness), DECAY_TO_ZERO_EFOLDS / (weight_decay * steps))
        out.append(Bound("start past the edge, weight decay back to K = 0", back0, "restrained"))
    if probe_regime == "divergent":
        out.append(Bound("probe: non-finite", lr, "divergent"))
    elif probe_regime == "collapsed" and not revived:
        if weight_decay == 0 and not revivable:  # nothing pulls the kernels to K = 0, where it would stay dead
            out.append(Bound("probe: flat, no weight decay", lr, "transient"))
        else:
            out.append(Bound("probe: collapsed", lr, "collapsed"))
    elif probe_normalized is not None and probe_normalized >= 0.9 * threshold and probe_regime != "collapsed":
        out.append(Bound("probe: at the edge", lr, at_edge))
    out.extend(layers)
    return out
