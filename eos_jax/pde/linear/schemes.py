"""Time discretizations of (10): forward Euler (11) and semi-implicit Nesterov (16)-(17), their simulation and the
empirical stability bounds on alpha (bisection on simulated runs, Table 2 / Table 9).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError
from eos_jax.pde.common import require_x64
from eos_jax.pde.linear.operators import make_windowed_operator, operator_extremes, scaled_operator
from eos_jax.pde.linear.theory import (
    F64,
    IBARS,
    POOLS,
    Operator,
    _check_dt_momentum,
    _check_scheme,
    alpha_bounds,
    data_scale,
    image_bar,
    nesterov_coefficients,
)


class SchemeState(NamedTuple):
    """State of the two schemes: current and previous kernel (previous unused by "gd").

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.pde.linear import SchemeState
      >>> state = SchemeState(kernel=jnp.zeros((2, 2)), prev_kernel=jnp.ones((2, 2)))
      >>> state.kernel.shape, float(state.prev_kernel.sum())
      ((2, 2), 4.0)
    """

    kernel: jax.Array
    prev_kernel: jax.Array


def make_step(
    op: Operator, ibar: jax.typing.ArrayLike, *, scheme: str, dt: float, a: float, beta: float, momentum: float = 0.9
) -> Callable[[SchemeState, jax.Array], SchemeState]:
    """One step of forward Euler (11) or semi-implicit Nesterov (16)-(17) on (10).

    Args:
      op: ``M`` (windowed or periodic), or ``q M`` (:func:`scaled_operator`) for a mean pooling.
      ibar: ``Ibar``, the image mean or sum (:func:`image_bar`).
      scheme, dt, a, beta, momentum: see the module docstring.

    Returns:
      ``step(state, alpha) -> state`` (jittable, vmappable over ``alpha``).

    Examples:
      A ``1 x 1`` kernel on the 4x4 pixel checkerboard has ``M = 16``; with ``a = -1/2``,
      ``Ibar = 0`` and ``alpha = 10`` the gradient at ``K = 1`` is ``-4 + 10 = 6``, so one
      forward-Euler step with ``dt = 0.01`` gives ``1 - 0.06``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     op = linear.make_windowed_operator(checkerboard(4), 1)
      ...     step = linear.make_step(op, 0.0, scheme="gd", dt=0.01, a=-0.5, beta=1.0)
      ...     k1 = jnp.ones((1, 1))
      ...     print(jax.jit(step)(linear.SchemeState(k1, k1), 10.0).kernel.tolist())
      [[0.94]]
    """
    require_x64("linear.make_step")
    _check_scheme(scheme)
    ibar = jnp.asarray(ibar, dtype=F64)

    def grad(k: jax.Array, alpha: jax.Array) -> jax.Array:
        return 0.5 * a * (ibar + beta * op(k)) + alpha * k

    if scheme == "gd":

        def step(state: SchemeState, alpha: jax.Array) -> SchemeState:
            k = state.kernel
            return SchemeState(k - dt * grad(k, alpha), k)
    else:
        _, s = nesterov_coefficients(dt, momentum)

        def step(state: SchemeState, alpha: jax.Array) -> SchemeState:
            k = state.kernel
            v = k + momentum * (k - state.prev_kernel)
            return SchemeState(v - s * grad(v, alpha), k)

    return step


def simulate(
    step: Callable[[SchemeState, jax.Array], SchemeState],
    kernel0: jax.Array,
    alpha: jax.Array,
    num_steps: int,
    record: Callable[[SchemeState], jax.Array],
) -> tuple[SchemeState, jax.Array]:
    """Runs ``num_steps`` steps from ``kernel0`` (``K^{-1} = K^0``) in a ``lax.scan``; returns final state and records.

    Examples:
      The setting of :func:`make_step`: each step multiplies ``K`` by ``A = 1 - dt z = 0.94``
      (Eq. (13), ``z = alpha + (a beta/2) mu = 10 - 4``):

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     op = linear.make_windowed_operator(checkerboard(4), 1)
      ...     step = linear.make_step(op, 0.0, scheme="gd", dt=0.01, a=-0.5, beta=1.0)
      ...     final, ks = linear.simulate(step, jnp.ones((1, 1)), 10.0, 3, lambda s: s.kernel[0, 0])
      ...     print([round(k, 12) for k in ks.tolist()])
      [0.94, 0.8836, 0.830584]
    """

    def body(state: SchemeState, _: None) -> tuple[SchemeState, jax.Array]:
        new = step(state, alpha)
        return new, record(new)

    return jax.lax.scan(body, SchemeState(kernel0, kernel0), None, length=num_steps)


def make_instability_test(
    step: Callable[[SchemeState, jax.Array], SchemeState], num_steps: int
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``is_unstable(kernel0, alpha) -> bool`` by simulation (see :func:`is_unstable` for the rule).

    Examples:
      In the setting of :func:`make_step` forward Euler is stable iff ``0 < dt (alpha - 4) < 2``,
      i.e. ``4 < alpha < 204``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     op = linear.make_windowed_operator(checkerboard(4), 1)
      ...     step = linear.make_step(op, 0.0, scheme="gd", dt=0.01, a=-0.5, beta=1.0)
      ...     test = jax.jit(linear.make_instability_test(step, 64))
      ...     print([bool(test(jnp.ones((1, 1)), jnp.float64(alpha))) for alpha in (3.0, 100.0, 205.0)])
      [True, False, True]
      >>> linear.make_instability_test(step, 4)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: bisection steps=4; expected >= 8
    """
    if num_steps < 8:
        raise ConfigError(f"bisection steps={num_steps}; expected >= 8")
    q = num_steps // 8

    def test(kernel0: jax.Array, alpha: jax.Array) -> jax.Array:
        def record(state: SchemeState) -> jax.Array:
            return jnp.sqrt(jnp.sum((state.kernel - state.prev_kernel) ** 2))

        final, upd = simulate(step, kernel0, alpha, num_steps, record)
        last = jnp.max(upd[num_steps - q :])
        before = jnp.max(upd[num_steps - 2 * q : num_steps - q])
        finite = jnp.all(jnp.isfinite(final.kernel)) & jnp.all(jnp.isfinite(upd))
        return (~finite) | (last > before)

    return test


def is_unstable(test: Callable[[jax.Array, jax.Array], jax.Array], kernel0: jax.Array, alpha: float) -> bool:
    """The blow-up criterion used by the bisection.

    A run of ``N`` steps is *unstable* iff a value is non-finite, or the largest update
    norm ``||K^{n+1} - K^n||`` over the last eighth of the run (``n >= 7N/8``) exceeds the
    largest over the eighth before it (``3N/4 <= n < 7N/8``). For the affine recursion
    the updates obey the homogeneous recursion, so their norm is a sum of modes
    ``c_i rho_i^n``: the rule detects ``rho = max_i |A_i| > 1`` once the growing mode
    outweighs the decaying ones, and comparing window maxima keeps rotating (complex)
    Nesterov modes from passing for growth. Resolution: a growth ``rho = 1 + eps`` is
    seen when ``eps`` exceeds roughly the decaying modes' weight at ``3N/4``, i.e.
    ``N`` must be long against ``1/(1 - |A_2|)`` (the second largest mode).

    Examples:
      Stable iff ``4 < alpha < 204`` (see :func:`make_instability_test`):

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     op = linear.make_windowed_operator(checkerboard(4), 1)
      ...     step = linear.make_step(op, 0.0, scheme="gd", dt=0.01, a=-0.5, beta=1.0)
      ...     test = jax.jit(linear.make_instability_test(step, 64))
      ...     k0 = jnp.ones((1, 1))
      ...     print(linear.is_unstable(test, k0, 100.0), linear.is_unstable(test, k0, 205.0))
      False True
    """
    require_x64("linear.is_unstable")
    return bool(test(kernel0, jnp.asarray(alpha, F64)))


def bisect_bounds(
    test: Callable[[jax.Array, jax.Array], jax.Array],
    kernel0: jax.Array,
    *,
    scale: float,
    rel_tol: float = 1e-4,
    max_expand: int = 60,
) -> dict[str, Any]:
    """Empirical ``(alpha_min, alpha_max)`` by bisection on simulated runs.

    Starts from ``alpha = scale`` (``1/dt`` for GD, ``0.5/s`` for Nesterov: the middle of
    the stable band of the modes with ``mu = 0``), expands by ``scale * 2^k`` down and up
    until a run is unstable, then bisects both edges together (one vmapped program
    per round) until the bracket is below ``rel_tol * max(|edge|, scale * 1e-12)``.

    Returns:
      dict with ``alpha_min``, ``alpha_max`` (midpoints of the final brackets; ``None``
      when no stable alpha was found at ``scale``), brackets, rounds and simulations run.

    Examples:
      Bisection recovers the exact interval ``(4, 204)`` of the setting of :func:`make_step`
      to the relative tolerance:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> with jax.enable_x64(True):
      ...     op = linear.make_windowed_operator(checkerboard(4), 1)
      ...     step = linear.make_step(op, 0.0, scheme="gd", dt=0.01, a=-0.5, beta=1.0)
      ...     res = linear.bisect_bounds(linear.make_instability_test(step, 64), jnp.ones((1, 1)), scale=100.0)
      >>> bool(abs(res["alpha_min"] - 4.0) < 1e-3), bool(abs(res["alpha_max"] - 204.0) < 0.03)
      (True, True)
    """
    require_x64("linear.bisect_bounds")
    vtest = jax.jit(jax.vmap(test, in_axes=(None, 0)))
    one = lambda al: bool(vtest(kernel0, jnp.asarray([al], F64))[0])  # noqa: E731
    sims = 1
    if one(scale):
        return {
            "alpha_min": None,
            "alpha_max": None,
            "stable_start": None,
            "simulations": sims,
            "note": f"{scale:.6g} is unstable",
        }
    # Expand: lower probes s - scale 2^k, upper probes s + scale 2^k, until each side is unstable.
    lo = [None, scale]  # [unstable, stable]
    hi = [scale, None]  # [stable, unstable]
    for k in range(max_expand):
        delta = scale * 2.0**k
        probes = [scale - delta, scale + delta]
        res = np.asarray(vtest(kernel0, jnp.asarray(probes, F64)))
        sims += 2
        if lo[0] is None:
            if res[0]:
                lo[0] = probes[0]
            else:
                lo[1] = probes[0]
        if hi[1] is None:
            if res[1]:
                hi[1] = probes[1]
            else:
                hi[0] = probes[1]
        if lo[0] is not None and hi[1] is not None:
            break
    if lo[0] is None or hi[1] is None:
        raise RuntimeError("bisect_bounds: no unstable alpha found while expanding; is the scheme ever unstable?")
    rounds = 0
    floor = scale * 1e-12
    while True:
        done_lo = lo[1] - lo[0] <= rel_tol * max(abs(lo[0]), abs(lo[1]), floor)
        done_hi = hi[1] - hi[0] <= rel_tol * max(abs(hi[0]), abs(hi[1]), floor)
        if done_lo and done_hi:
            break
        mids = np.array([0.5 * (lo[0] + lo[1]), 0.5 * (hi[0] + hi[1])])
        res = np.asarray(vtest(kernel0, jnp.asarray(mids, F64)))
        sims += 2
        rounds += 1
        if res[0]:
            lo[0] = mids[0]
        else:
            lo[1] = mids[0]
        if res[1]:
            hi[1] = mids[1]
        else:
            hi[0] = mids[1]
    return {
        "alpha_min": 0.5 * (lo[0] + lo[1]),
        "alpha_max": 0.5 * (hi[0] + hi[1]),
        "bracket_min": lo,
        "bracket_max": hi,
        "stable_start": scale,
        "rounds": rounds,
        "simulations": sims,
    }


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Configuration of ``python -m experiments.pde linear`` (Table 2 / Table 9, Figure 4).

    Attributes:
      kernels: kernel sides ``w`` (each ``1 <= w <= size``).
      scheme: "gd" (forward Euler (11)) or "nesterov" ((16)-(17)).
      dt: time step ``Delta t`` > 0 (the learning rate for "gd").
      a: constant ``a = y_hat - y`` of (10).
      beta: Swish parameter ``beta`` > 0.
      momentum: Nesterov momentum ``m`` in (0, 1) (the damping ``d`` follows from it).
      size: side of the +1/-1 checkerboard ``I``.
      square: side of its squares in pixels (1: the pixel checkerboard ``(-1)^(i+j)``).
        The paper does not give it; the choice decides whether the periodic interval
        (14) is empty (``square=1``) or not (coarser squares spread the energy of
        ``|I_hat|^2`` over the odd harmonics of a square wave).
      seed: seed of ``K ~ N(0, 1)`` (per kernel size ``fold_in(key(seed), w)``).
      pool: data term summed ("sum", default, as in the authors' ``single_layer/linear.py``)
        or averaged ("mean") over the ``(n - w + 1)^2`` output positions.
      ibar: ``Ibar`` the image mean ("mean", default, as in linear.py) or sum ("sum", the
        paper's Eq. (47)).
      bisect_steps: iterations per simulated run of the bisection.
      rel_tol: relative bracket width at which bisection stops.
      plot_steps: iterations of the Figure-4 runs.

    Examples:
      >>> from eos_jax.pde.linear import LinearConfig
      >>> LinearConfig().kernels, LinearConfig().dt, LinearConfig(scheme="nesterov").momentum
      ((16, 32, 64), 1e-08, 0.9)
      >>> LinearConfig(kernels=(300,)).validate()
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: kernel size 300; expected 1 <= w <= size=256
    """

    kernels: tuple[int, ...] = (16, 32, 64)
    scheme: str = "gd"
    dt: float = 1e-8
    a: float = -0.5
    beta: float = 1.0
    momentum: float = 0.9
    size: int = 256
    square: int = 1
    seed: int = 0
    pool: str = "sum"
    ibar: str = "mean"
    bisect_steps: int = 400
    rel_tol: float = 1e-4
    plot_steps: int = 1000

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        _check_scheme(self.scheme)
        if not (self.dt > 0 and math.isfinite(self.dt)):
            raise ConfigError(f"dt={self.dt!r}; expected a positive finite float")
        if self.scheme == "nesterov":
            _check_dt_momentum(self.dt, self.momentum)
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta={self.beta!r}; expected a positive finite float")
        if not math.isfinite(self.a) or self.a == 0:
            raise ConfigError(f"a={self.a!r}; expected a finite nonzero float")
        if self.size < 2:
            raise ConfigError(f"size={self.size!r}; expected an integer >= 2")
        if not 1 <= self.square <= self.size // 2:
            raise ConfigError(f"square={self.square!r}; expected 1 <= square <= size/2={self.size // 2}")
        if not self.kernels:
            raise ConfigError("kernels is empty; expected at least one kernel size")
        for w in self.kernels:
            if not 1 <= w <= self.size:
                raise ConfigError(f"kernel size {w!r}; expected 1 <= w <= size={self.size}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool={self.pool!r}; allowed: {', '.join(POOLS)}")
        if self.ibar not in IBARS:
            raise ConfigError(f"ibar={self.ibar!r}; allowed: {', '.join(IBARS)}")
        if self.bisect_steps < 8:
            raise ConfigError(f"bisect_steps={self.bisect_steps!r}; expected an integer >= 8")
        if not 0 < self.rel_tol < 0.1:
            raise ConfigError(f"rel_tol={self.rel_tol!r}; expected 0 < rel_tol < 0.1")
        if self.plot_steps < 1:
            raise ConfigError(f"plot_steps={self.plot_steps!r}; expected an integer >= 1")


def analyze_window(
    image: np.ndarray, w: int, kernel0: jax.Array, config: LinearConfig, key: jax.Array
) -> dict[str, Any]:
    """Empirical bounds of the windowed scheme for one kernel size, by bisection and by spectrum.

    Examples:
      A ``1 x 1`` kernel on the 4x4 pixel checkerboard (``M = 16``): the spectral bounds are
      exact, the simulated ones agree to the bisection's tolerance:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.pde import linear
      >>> from eos_jax.pde.common import checkerboard
      >>> config = linear.LinearConfig(kernels=(1,), size=4, dt=0.01, bisect_steps=64)
      >>> with jax.enable_x64(True):
      ...     res = linear.analyze_window(checkerboard(4), 1, jnp.ones((1, 1)), config, jax.random.PRNGKey(0))
      >>> res["spectral"], res["eig"]["mu_max"], res["q"]
      ((4.0, 204.0), 16.0, 1.0)
      >>> round(float(res["bisection"]["alpha_min"]), 2), round(float(res["bisection"]["alpha_max"]), 1)
      (4.0, 204.0)
    """
    q = data_scale(config.pool, (image.shape[0] - w + 1) ** 2)
    op = scaled_operator(make_windowed_operator(image, w), q)  # q M: the pooled data term
    ibar = image_bar(image, config.ibar)
    step = make_step(
        op, ibar, scheme=config.scheme, dt=config.dt, a=config.a, beta=config.beta, momentum=config.momentum
    )
    t0 = time.perf_counter()
    eig = operator_extremes(op, (w, w), key)  # eigenvalues of q M
    t_spec = time.perf_counter() - t0
    spec_min, spec_max = alpha_bounds(
        eig.mu_min,
        eig.mu_max,
        scheme=config.scheme,
        dt=config.dt,
        a=config.a,
        beta=config.beta,
        momentum=config.momentum,
    )
    scale = 1.0 / config.dt if config.scheme == "gd" else 0.5 / nesterov_coefficients(config.dt, config.momentum)[1]
    t0 = time.perf_counter()
    test = make_instability_test(step, config.bisect_steps)
    bis = bisect_bounds(test, kernel0, scale=scale, rel_tol=config.rel_tol)
    t_bis = time.perf_counter() - t0
    return {
        "eig": eig._asdict(),
        "spectral": (spec_min, spec_max),
        "bisection": bis,
        "seconds_spectral": t_spec,
        "seconds_bisection": t_bis,
        "step": step,
        "op": op,
        "ibar": ibar,
        "q": q,
    }
