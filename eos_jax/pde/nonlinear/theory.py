"""Classification of a run (stable / restrained / divergent) and the closed forms beside it (Table 3, Appendix D).

The pixel checkerboard reduces gradient descent (9) to a 1-D map of ``c = <K, chi>``:
:func:`checkerboard_loss_1d`, its minima and orbit; :func:`theory` gathers the bounds of
Table 3 (not activated, activated, transitioning, with the windowed spectrum of
:mod:`eos_jax.pde.linear`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from eos_jax.pde import linear
from eos_jax.pde.common import require_x64
from eos_jax.pde.nonlinear.model import NonlinearConfig, pool_scale


def oscillation(values: np.ndarray) -> float:
    """Non-monotone part of the variation of ``values``, relative to their mean magnitude.

    ``(TV - |v_end - v_start|) / (W * mean|v|)`` with ``TV = sum |v_{i+1} - v_i|`` over
    the ``W`` values: 0 for a monotone sequence, ``~ 2A/m`` for a period-2 oscillation of
    amplitude ``A`` around ``m``. NaN if any value is not finite.

    Examples:
      A period-2 oscillation between 1 and 2: ``TV = 5``, net change 1, ``W = 6``, mean 1.5:

      >>> import numpy as np
      >>> from eos_jax.pde.nonlinear.theory import oscillation
      >>> round(oscillation(np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])), 6), oscillation(np.arange(5.0))
      (0.444444, 0.0)
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

    Examples:
      >>> import numpy as np
      >>> from eos_jax.pde.nonlinear.theory import moving_average
      >>> moving_average(np.arange(5.0), 2).tolist(), moving_average(np.arange(5.0), 9).shape
      ([0.5, 1.5, 2.5, 3.5], (0,))
    """
    v = np.asarray(values, np.float64)
    if v.size < window:
        return np.zeros((0,), np.float64)
    # Each window summed on its own (no running sum whose rounding would drift).
    return np.lib.stride_tricks.sliding_window_view(v, window).mean(axis=1)


def classification_rule(config: NonlinearConfig) -> str:
    """The classification rule in words, with this run's levels.

    Examples:
      >>> from eos_jax.pde.nonlinear.model import NonlinearConfig
      >>> from eos_jax.pde.nonlinear.theory import classification_rule
      >>> classification_rule(NonlinearConfig(steps=100))[:60]
      "on the last W=10 records: 'divergent' if a lane (k=1 or k=3)"
    """
    return (
        f"on the last W={config.num_window} records: 'divergent' if a lane (k=1 or k={config.k}) of this dt "
        f"became non-finite, or its loss stays above {config.growth_factor:g} x the initial loss over the whole "
        f"window; else 'restrained' if the k=1 loss oscillates -- non-monotone variation (TV - |net change|) / "
        f"(W mean|L|) > {config.osc_level:g} -- or max RelL1(k=1, k={config.k}) over the window > "
        f"{config.rel_l1_level:g} (perturbation amplified; a non-amplified perturbation stays near the "
        f"accumulated rounding, ~ steps x 2^-24); else 'stable'"
    )


def classify(
    loss: np.ndarray, rel: np.ndarray, first_nonfinite: list[int | None], config: NonlinearConfig
) -> tuple[str, dict[str, Any]]:
    """Classifies one ``dt`` from its histories (see :func:`classification_rule`).

    Args:
      loss: ``(steps, 2)`` loss of the lanes ``k = 1`` and ``k = k_perturbed``.
      rel: ``(steps,)`` RelL1 between them.
      first_nonfinite: per lane the first non-finite step, None if it stayed finite.
      config: levels and window.

    Returns:
      ``(class, evidence)`` where evidence holds the measured quantities.

    Examples:
      A flat loss is "stable" unless the perturbation is amplified (RelL1 above
      ``rel_l1_level``) or a lane went non-finite:

      >>> import numpy as np
      >>> from eos_jax.pde.nonlinear.model import NonlinearConfig
      >>> from eos_jax.pde.nonlinear.theory import classify
      >>> config = NonlinearConfig(steps=8, window=4)
      >>> loss = np.ones((8, 2))
      >>> classify(loss, np.zeros(8), [None, None], config)[0]
      'stable'
      >>> cls, evidence = classify(loss, np.full(8, 0.01), [None, None], config)
      >>> cls, evidence["amplified"], evidence["oscillating"]
      ('restrained', True, False)
      >>> classify(loss, np.zeros(8), [None, 5], config)[0]
      'divergent'
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


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    """Logistic function in float64 without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def checkerboard_loss_1d(
    c: np.ndarray, *, size: int, kernel: int, alpha: float, beta: float, label: int, pool: str
) -> dict[str, np.ndarray]:
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

    Examples:
      At ``c = 0`` (``n = 8``, ``w = 3``, mean pooling, ``y = 1``): ``g = 0``, the loss is
      ``log 2``, and ``lambda_chi = w^2 (s(0) - 1) g''(0) + alpha = 9 (-1/2)(1/2) + 20``:

      >>> import numpy as np
      >>> from eos_jax.pde.nonlinear.theory import checkerboard_loss_1d
      >>> f = checkerboard_loss_1d(np.array([0.0]), size=8, kernel=3, alpha=20.0, beta=1.0, label=1, pool="mean")
      >>> float(f["g"][0]), round(float(f["loss_c"][0]), 6), float(f["grad_c"][0]), float(f["lambda_chi"][0])
      (0.0, 0.693147, 0.0, 17.75)
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


def checkerboard_minima(
    *, size: int, kernel: int, alpha: float, beta: float, label: int, pool: str, c_max: float = 200.0, grid: int = 40001
) -> list[dict[str, float]]:
    """Local minima of the loss (7) on the pixel checkerboard and GD's stability bound there.

    Roots of ``d/dc [l(c) + alpha c^2/(2 w^2)]`` (:func:`checkerboard_loss_1d`) with a
    positive second derivative, located on a grid of ``[-c_max, c_max]`` and refined by
    bisection in float64. At such a minimum ``K* = (c*/w^2) chi`` the Hessian's largest
    eigenvalue is ``lambda* = max(alpha, lambdachi(c*))``, so gradient descent is linearly
    stable there iff ``dt < 2/lambda*``.

    Returns:
      One dict per minimum (ascending ``c``): ``c``, ``logit_g``, ``a`` (``y_hat - y``),
      ``lambda_chi``, ``lambda_max``, ``dt_max`` (``2/lambda_max``).

    Examples:
      The paper's setting (256 x 256, ``w = 32``, ``alpha = 20``, mean pooling): two
      symmetric minima, at which GD is stable only for ``dt`` below about 0.032, under
      every ``dt`` of Figure 5 but the smallest:

      >>> from eos_jax.pde.nonlinear.theory import checkerboard_minima
      >>> mins = checkerboard_minima(size=256, kernel=32, alpha=20.0, beta=1.0, label=1, pool="mean")
      >>> [round(m["c"], 3) for m in mins], [round(m["dt_max"], 4) for m in mins]
      ([-3.865, 3.865], [0.0323, 0.0323])
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
        out.append(
            {
                "c": c,
                "logit_g": float(f["g"]),
                "a": float(_sigmoid64(f["g"])) - label,
                "loss": float(f["loss_c"]),
                "lambda_chi": float(f["lambda_chi"]),
                "lambda_max": lam,
                "dt_max": 2.0 / lam if lam > 0 else None,
            }
        )
    return out


def checkerboard_orbit(
    c0: float,
    dts: tuple[float, ...],
    *,
    steps: int,
    window: int,
    sample_every: int,
    size: int,
    kernel: int,
    alpha: float,
    beta: float,
    label: int,
    pool: str,
    max_period: int = 8,
) -> dict[str, dict[str, Any]]:
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

    Examples:
      The paper's setting: below the minima's bound (0.032, :func:`checkerboard_minima`) GD
      converges, above it the orbit stays bounded but never settles, and ``dt alpha >= 2``
      diverges:

      >>> from eos_jax.pde.nonlinear.theory import checkerboard_orbit
      >>> orbit = checkerboard_orbit(1.0, (0.01, 0.05, 0.11), steps=1000, window=100, sample_every=10,
      ...                            size=256, kernel=32, alpha=20.0, beta=1.0, label=1, pool="mean")
      >>> {dt: o["predicted"] for dt, o in orbit.items()}
      {'0.01': 'stable', '0.05': 'restrained', '0.11': 'divergent'}
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
            "predicted": pred,
            "period": period,
            "c_range": [float(np.min(hc)), float(np.max(hc))] if finite else None,
            "max_dt_lambda": float(np.max(hl)) if finite else None,
            "max_dt_lambda_sampled": float(np.max(hl[sampled])) if finite and np.any(sampled) else None,
        }
    return out


def theory(
    image: np.ndarray,
    kernel: int,
    *,
    alpha: float,
    beta: float,
    label: int,
    dts: tuple[float, ...],
    pool: str = "mean",
    square: int | None = None,
    key: jax.Array | None = None,
) -> dict[str, Any]:
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

    Examples:
      An 8 x 8 pixel checkerboard with a 3 x 3 kernel (float64: x64 must be on): the
      windowed ``M`` has ``mu_max = 6^2 * 3^2 = 324``, and ``dt = 0.11`` breaks the
      not-activated bound ``2/alpha = 0.1``:

      >>> import jax
      >>> from eos_jax.pde.common import checkerboard
      >>> from eos_jax.pde.nonlinear.theory import theory
      >>> with jax.enable_x64(True):
      ...     out = theory(checkerboard(8), 3, alpha=20.0, beta=1.0, label=1, dts=(0.05, 0.11), square=1)
      >>> out["positions_P"], round(out["window_mu_max"], 6), out["max_abs_I_hat_sq"], out["not_activated_dt_max"]
      (36, 324.0, 4096.0, 0.1)
      >>> [out["per_dt"][dt]["not_activated_stable"] for dt in ("0.05", "0.11")]
      [True, False]
    """
    require_x64("nonlinear.theory")
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
    s_map = (
        csum[v : v + kernel, v : v + kernel]
        - csum[:kernel, v : v + kernel]
        - csum[v : v + kernel, :kernel]
        + csum[:kernel, :kernel]
    )
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
        "window_sums_S": {"min": float(s_map.min()), "max": float(s_map.max()), "sum_sq": float((s_map**2).sum())},
        "min_abs_I_hat_sq": float(spec.min()),
        "max_abs_I_hat_sq": float(spec.max()),
        "a_linearization": a0,
        "window_mu_min": eig.mu_min,
        "window_mu_max": eig.mu_max,
        "window_mu_scaled": [q * eig.mu_min, q * eig.mu_max],
        "not_activated_dt_max": 2.0 / alpha if alpha > 0 else None,
        "activated_dt_max": 2.0 / act if act > 0 else None,
        "activated_window_dt_max": 2.0 / (alpha + q * q * float((s_map**2).sum()) / 8.0),
        "checkerboard_minima": (
            checkerboard_minima(size=n, kernel=kernel, alpha=alpha, beta=beta, label=label, pool=pool)
            if square == 1
            else None
        ),
        "per_dt": {},
    }
    c = 0.5 * a0 * beta
    for dt in dts:
        p_min, p_max = linear.alpha_bounds(
            q_per * float(spec.min()), q_per * float(spec.max()), scheme="gd", dt=dt, a=a0, beta=beta
        )
        w_min, w_max = linear.alpha_bounds(q * eig.mu_min, q * eig.mu_max, scheme="gd", dt=dt, a=a0, beta=beta)
        out["per_dt"][dt_key(dt)] = {
            "not_activated_stable": bool(dt * alpha < 2),
            "activated_stable": bool(alpha < 2.0 / dt - (q_per * ibar) ** 2 / 8.0),
            "transitioning_alpha_min": p_min,
            "transitioning_alpha_max": p_max,
            "transitioning_stable": bool(p_min < alpha < p_max),
            "transitioning_window_alpha_min": w_min,
            "transitioning_window_alpha_max": w_max,
            "transitioning_window_stable": bool(w_min < alpha < w_max),
        }
        if out["checkerboard_minima"]:
            out["per_dt"][dt_key(dt)]["checkerboard_minimum_stable"] = [
                bool(m["dt_max"] is not None and dt < m["dt_max"]) for m in out["checkerboard_minima"]
            ]
    out["transitioning_c"] = c
    return out


def dt_key(dt: float) -> str:
    """The JSON key of a step size.

    Examples:
      >>> from eos_jax.pde.nonlinear.theory import dt_key
      >>> dt_key(0.05), dt_key(1e-8)
      ('0.05', '1e-08')
    """
    return f"{dt:g}"


def chi(kernel: int) -> np.ndarray:
    """``chi(z) = (-1)^(z1+z2)`` on the ``kernel x kernel`` window (float64).

    Examples:
      >>> from eos_jax.pde.nonlinear.theory import chi
      >>> chi(3).astype(int).tolist()
      [[1, -1, 1], [-1, 1, -1], [1, -1, 1]]
    """
    i = np.arange(kernel)
    return np.where((i[:, None] + i[None, :]) % 2 == 0, 1.0, -1.0)
