"""Flat-vector eigen-solvers: power iteration (with a shift) and Lanczos, for any symmetric linear map.

One solver for the whole package: :mod:`eos_jax.hessian` runs them on Hessian-vector products of a
raveled parameter pytree, :mod:`eos_jax.pde.linear` on the windowed operator ``M`` of the linearized
CNN PDE (Eq. (13)). An operator is a function ``op: (n,) -> (n,)`` on flat vectors, linear and
symmetric; everything is a pure function that runs under ``jit`` (and ``vmap`` with ``tol=None``).

* :func:`power_iteration`: the largest ALGEBRAIC eigenvalue, by power iteration restarted on
  ``A - mu I`` when the dominant eigenvalue ``mu`` is negative; :class:`PowerState` carries it.
* :func:`lanczos`: the top-k algebraic eigenpairs by Lanczos with full reorthogonalization;
  :func:`lanczos_pairs` adds the error estimates of its stop rule (:func:`ritz_errors`).
* :func:`lanczos_quadrature`: the Gauss quadrature (nodes and weights) of a start vector's spectral
  measure from the same Lanczos iteration, for stochastic Lanczos quadrature
  (:func:`eos_jax.hessian.density`); :class:`Quadrature` carries it.
* :func:`psd_extremes`: ``lambda_min`` and ``lambda_max`` of a symmetric positive semidefinite map,
  the latter by power iteration on ``A``, the former on the shifted ``lambda_max I - A``.

Dot products inside the solvers use ``Precision.HIGHEST`` (no TF32/bf16 passes on GPU). Stopping:
``tol=None`` runs exactly ``num_iters`` products (``lax.fori_loop``); a float ``tol`` stops in
``lax.while_loop`` as soon as the stop rule holds (:data:`STOPS`). ``stop="residual"`` (the default):
``||A v - lambda v|| <= tol * |lambda|``. ``stop="eigenvalue"`` (Lanczos only): the estimated error of
the eigenvalue itself, :func:`ritz_errors`, is at most ``tol * |lambda|``. For a Ritz value at
distance ``gap`` from the rest of the spectrum the error is at most ``r**2 / gap`` for a residual ``r``
(the Kato-Temple inequality; Parlett, *The Symmetric Eigenvalue Problem*, 1998), far below ``r`` once
``r << gap``: a warm-started solver reaches a 1e-3 relative eigenvalue error with fewer products than
a 1e-3 residual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from eos_jax.errors import ConfigError

Operator = Callable[[jax.Array], jax.Array]

_HI = lax.Precision.HIGHEST  # no TF32/bf16 passes in the solver's own dot products on GPU

STOPS = ("residual", "eigenvalue")  # stop rules of a tolerance-mode solve (module docstring)
# Factor on the r**2 / gap term of ritz_errors: the Ritz gap overestimates the true one while the
# Krylov space is small (the next Ritz value lies below the next eigenvalue). Where the unscaled term
# first met 1e-3, the true error was up to 4.8 times it on the main job (python -m experiments.eos
# --layers 3 --lr 5, 110 warm-started estimates against the dense Hessian), 2.9-12 times on three
# small Edge-of-Stability runs of the same CNN (785 estimates).
EIGENVALUE_ERROR_SAFETY = 4.0
# ritz_errors never falls below residual / RESIDUAL_CAP. A Krylov space sees an eigenvalue that its
# start vector barely touches only through the residual: when the top two eigenvalues swap between
# two warm-started estimates, the start vector is close to the new second eigenvector and the Ritz
# value converges to the second eigenvalue with a small residual and a large Ritz gap. On one of the
# small runs above that estimate came out 12 % low without the cap; with it (and the factor above),
# all 895 estimates were within 0.72 tol of the dense Hessian's top eigenvalue at tol = 1e-3.
RESIDUAL_CAP = 5.0


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Inner product of two flat vectors at full precision."""
    return jnp.dot(a, b, precision=_HI)


def _normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x / ||x||`` (zeros when ``x`` is zero) and ``||x||``."""
    nrm = jnp.linalg.norm(x)
    safe = jnp.where(nrm > 0, nrm, jnp.ones_like(nrm))
    return x / safe, nrm


def start_vector(v0_flat: jax.Array | None, key: jax.Array, n: int, dtype) -> jax.Array:
    """Unit start vector: ``v0`` when given and nonzero, else a Gaussian draw from ``key``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.eigen import start_vector
      >>> start_vector(jnp.array([3.0, 0.0, 4.0]), jax.random.key(0), 3, jnp.float32).tolist()
      [0.6000000238418579, 0.0, 0.800000011920929]
      >>> v = start_vector(None, jax.random.key(0), 3, jnp.float32)  # random, unit norm
      >>> v.shape, round(float(jnp.linalg.norm(v)), 6)
      ((3,), 1.0)
    """
    rnd, _ = _normalize(jax.random.normal(key, (n,), dtype))
    if v0_flat is None:
        return rnd
    v, nrm = _normalize(v0_flat.astype(dtype))
    return jnp.where(nrm > 0, v, rnd)


class PowerState(NamedTuple):
    """Carry of power iteration: next iterate, and the last Rayleigh pair with its residual.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.eigen import PowerState
      >>> v = jnp.array([1.0, 0.0])
      >>> s = PowerState(v=v, vec=v, lam=jnp.float32(0), res=jnp.float32(jnp.inf), n=jnp.int32(0))
      >>> int(s.n), float(s.res)
      (0, inf)
    """

    v: jax.Array  # next iterate (unit)
    vec: jax.Array  # vector whose Rayleigh quotient is ``lam``
    lam: jax.Array
    res: jax.Array
    n: jax.Array  # products so far


def _power_step(op, shift: jax.Array, s: PowerState) -> PowerState:
    """One product: Rayleigh quotient and residual of ``s.v``; next iterate from ``(H - shift) v``."""
    w = op(s.v)
    lam = _dot(s.v, w)
    res = jnp.linalg.norm(w - lam * s.v)
    nxt, _ = _normalize(w - shift * s.v)
    return PowerState(nxt, s.v, lam, res, s.n + 1)


def power_iteration(op, v_init: jax.Array, num_iters: int, tol: float | None) -> tuple[PowerState, jax.Array]:
    """Largest algebraic eigenvalue by power iteration, shifted when the dominant one is negative.

    Phase 1 finds the eigenvalue of largest magnitude, ``mu``. If ``mu >= 0`` it is the largest
    algebraic one and phase 2 simply continues (shift 0). If ``mu < 0``, phase 2 restarts from the
    start vector on ``H - mu I``, whose spectrum ``lambda_i - mu >= 0`` is dominated by
    ``lambda_max - mu``; the Rayleigh quotient is always taken with ``H`` itself. Phase 1 takes at
    most ``num_iters // 2`` products (at least one), so phase 2 always has a budget when
    ``num_iters >= 2``; fixed mode uses the whole budget of each phase, tolerance mode stops each
    phase at the tolerance.

    Returns:
      ``(state, top)``: ``top`` is False when the returned quotient may not be the largest
      algebraic eigenvalue (phase 2 never ran after a negative ``mu``, or the unshifted iteration
      ended on a negative quotient).

    Examples:
      The dominant eigenvalue of ``diag(-4, 1, 2)`` is -4; the largest algebraic one, 2, is
      found after the shift:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.eigen import power_iteration
      >>> a = jnp.diag(jnp.array([-4.0, 1.0, 2.0]))
      >>> solve = jax.jit(lambda v: power_iteration(lambda x: a @ x, v, num_iters=100, tol=None))
      >>> state, top = solve(jnp.ones(3) / jnp.sqrt(3.0))
      >>> round(float(state.lam), 4), bool(top), int(state.n)
      (2.0, True, 100)
    """
    dtype = v_init.dtype
    inf = jnp.asarray(jnp.inf, dtype)
    s = PowerState(v_init, v_init, jnp.zeros((), dtype), inf, jnp.zeros((), jnp.int32))
    zero = jnp.zeros((), dtype)
    n1 = max(num_iters // 2, 1)
    if tol is None:
        s = lax.fori_loop(0, n1, lambda i, st: _power_step(op, zero, st), s)
    else:
        s = lax.while_loop(
            lambda st: (st.n < n1) & ~(st.res <= tol * jnp.abs(st.lam)), lambda st: _power_step(op, zero, st), s
        )
    shifted = s.lam < 0
    shift = jnp.minimum(s.lam, zero)
    # After a negative mu the old residual belongs to the bottom eigenvalue: phase 2 must run.
    s = s._replace(v=jnp.where(shifted, v_init, s.v), res=jnp.where(shifted, inf, s.res))
    if tol is None:
        s = lax.fori_loop(0, num_iters - n1, lambda i, st: _power_step(op, shift, st), s)
    else:
        s = lax.while_loop(
            lambda st: (st.n < num_iters) & ~(st.res <= tol * jnp.abs(st.lam)), lambda st: _power_step(op, shift, st), s
        )
    top = jnp.isfinite(s.res) & (shifted | (s.lam >= 0))
    return s, top


def _ritz(alpha: jax.Array, beta: jax.Array, n_active: jax.Array, k: int):
    """Top-k Ritz values (descending), Ritz coordinates and residual bounds of a Lanczos tridiagonal.

    Rows past ``n_active`` are decoupled and given a diagonal value below every eigenvalue of the
    active block (Gershgorin bound), so that they never rank among the top k; the pad stays of the
    order of ``||T||`` so that ``eigh``'s absolute accuracy is not degraded.
    """
    m = alpha.shape[0]
    idx = jnp.arange(m, dtype=jnp.int32)
    active = idx < n_active
    off = jnp.where(idx[:-1] + 1 < n_active, beta[:-1], jnp.zeros_like(beta[:-1]))
    radius = jnp.abs(jnp.concatenate([off, jnp.zeros((1,), off.dtype)])) + jnp.abs(
        jnp.concatenate([jnp.zeros((1,), off.dtype), off])
    )
    big = jnp.asarray(jnp.finfo(alpha.dtype).max, alpha.dtype)
    lo = jnp.min(jnp.where(active, alpha - radius, big))
    hi = jnp.max(jnp.where(active, alpha + radius, -big))
    pad = lo - (hi - lo) - jnp.abs(lo) - jnp.abs(hi) - jnp.asarray(jnp.finfo(alpha.dtype).tiny, alpha.dtype)
    diag = jnp.where(active, alpha, pad)
    t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, s = jnp.linalg.eigh(t)
    theta = theta[::-1][:k]
    s = s[:, ::-1][:, :k]
    last = jnp.clip(n_active - 1, 0, m - 1)
    res = jnp.abs(beta[last] * s[last, :])
    return theta, s, res


class LanczosState(NamedTuple):
    """Carry of Lanczos: basis rows ``q_0..q_m``, tridiagonal, products so far, norm estimate.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.eigen import LanczosState
      >>> st = LanczosState(q=jnp.zeros((8, 3)), alpha=jnp.zeros(2), beta=jnp.zeros(2),
      ...                   j=jnp.int32(0), hnorm=jnp.float32(0))
      >>> st.q.shape, int(st.j)
      ((8, 3), 0)
    """

    q: jax.Array  # (m + 1 rounded up to a multiple of _BLOCK, n); rows past j are zero
    alpha: jax.Array  # (m,)
    beta: jax.Array  # (m,), beta[j] couples q_j and q_{j+1}; 0 after a breakdown
    j: jax.Array
    hnorm: jax.Array


_BLOCK = 8  # basis rows per block of the reorthogonalization loop


def _orth(q: jax.Array, w: jax.Array, n_rows: jax.Array) -> jax.Array:
    """Full reorthogonalization of ``w`` against rows ``0..n_rows-1`` of ``q``, done twice.

    Block Gram-Schmidt over blocks of ``_BLOCK`` rows, looping only over the blocks in use, so the
    cost grows with the Krylov dimension reached, not with ``num_iters`` (rows not yet filled are
    zero and do nothing). ``q`` has a multiple of ``_BLOCK`` rows.
    """
    n_blocks = (n_rows + (_BLOCK - 1)) // _BLOCK

    def body(i, x):
        blk = lax.dynamic_slice_in_dim(q, i * _BLOCK, _BLOCK, axis=0)
        return x - jnp.dot(jnp.dot(blk, x, precision=_HI), blk, precision=_HI)

    w = lax.fori_loop(0, n_blocks, body, w)
    return lax.fori_loop(0, n_blocks, body, w)


def _lanczos_step(op, key: jax.Array, st: LanczosState) -> LanczosState:
    """One Lanczos product with full reorthogonalization; restarts orthogonally on breakdown.

    When the Krylov space becomes invariant (``beta`` at rounding level relative to ``||H||``) the
    next basis vector is a fresh random vector orthogonalized against the basis and the coupling is
    set to 0, so the tridiagonal stays valid (block diagonal) and no NaN appears; this is how
    eigenvalues outside the first Krylov space (and multiplicities) can still be found.
    """
    j = st.j
    qj = st.q[j]
    w = op(qj)
    a = _dot(qj, w)
    hnorm = jnp.maximum(st.hnorm, jnp.linalg.norm(w))
    w = _orth(st.q, w, j + 1)
    b = jnp.linalg.norm(w)
    eps = jnp.finfo(w.dtype).eps
    breakdown = b <= 64 * eps * hnorm

    def restart():
        r = jax.random.normal(jax.random.fold_in(key, j), w.shape, w.dtype)
        return _normalize(_orth(st.q, r, j + 1))[0]

    # lax.cond: the restart costs nothing unless taken (under vmap both branches run, as a select).
    q_next = lax.cond(breakdown, restart, lambda: w / jnp.where(b > 0, b, jnp.ones_like(b)))
    b = jnp.where(breakdown, jnp.zeros_like(b), b)
    return LanczosState(st.q.at[j + 1].set(q_next), st.alpha.at[j].set(a), st.beta.at[j].set(b), j + 1, hnorm)


def ritz_errors(theta: jax.Array, res: jax.Array, n_active: jax.Array, k: int) -> jax.Array:
    """Estimated errors of the top-k Ritz values: the stop rule ``stop="eigenvalue"`` of :func:`lanczos`.

    ``max(min(r_i, s * r_i**2 / gap_i), r_i / c)`` with ``s =`` :data:`EIGENVALUE_ERROR_SAFETY` and
    ``c =`` :data:`RESIDUAL_CAP`. A Ritz value ``theta_i`` with residual ``r_i`` lies within ``r_i`` of
    an eigenvalue, and within ``r_i**2 / gap_i`` when no other eigenvalue is closer than ``gap_i``
    (Kato-Temple). ``gap_i`` comes from the Ritz values themselves, the distance to the nearer of
    ``theta_{i-1}`` and ``theta_{i+1}``; the next Ritz value lies below the next eigenvalue, so early
    on that gap is too large, which ``s`` covers. The floor ``r_i / c`` keeps the residual itself
    bounded: an eigenvalue that the Krylov space has barely seen shows in the residual only (see
    :data:`RESIDUAL_CAP`). Until ``n_active > k`` (no Ritz value below the k-th yet), or for a zero
    gap, the estimate is the residual.

    Args:
      theta: ``(k + 1,)`` the top Ritz values, descending (``(k,)``: no gap known, residuals only).
      res: residual bounds of the same pairs.
      n_active: Lanczos steps taken (the tridiagonal's active size).
      k: pairs to estimate (static).

    Returns:
      ``(k,)`` estimated absolute errors.

    Examples:
      Residual 0.01 at distance 0.05 from the next Ritz value: ``4 * 0.01**2 / 0.05``; at distance
      1 the quadratic term, 0.0004, is below the floor ``0.01 / 5``; after one step there is no gap:

      >>> import jax.numpy as jnp
      >>> from eos_jax.eigen import ritz_errors
      >>> r = jnp.array([0.01, 0.5])
      >>> [round(float(ritz_errors(jnp.array([2.0, t2]), r, jnp.int32(n), k=1)[0]), 6) for t2, n in [(1.95, 2), (1.0, 2), (1.0, 1)]]
      [0.008, 0.002, 0.01]
    """
    r = res[:k]
    if theta.shape[0] <= k:
        return r
    above = jnp.concatenate([jnp.full((1,), jnp.inf, theta.dtype), theta[: k - 1]])
    gap = jnp.minimum(above - theta[:k], theta[:k] - theta[1 : k + 1])
    ok = (n_active > k) & (gap > 0)
    safety = jnp.asarray(EIGENVALUE_ERROR_SAFETY, r.dtype)
    quad = jnp.where(ok, safety * r * r / jnp.where(ok, gap, jnp.ones_like(gap)), jnp.full_like(r, jnp.inf))
    return jnp.maximum(jnp.minimum(r, quad), r / jnp.asarray(RESIDUAL_CAP, r.dtype))


class LanczosResult(NamedTuple):
    """What :func:`lanczos_pairs` returns: the top-k Ritz pairs with their residuals and error estimates.

    Attributes:
      theta: ``(k,)`` Ritz values, descending.
      vectors: ``(k, n)`` unit Ritz vectors.
      residual: ``(k,)`` the Lanczos bounds ``|beta_m s_m|`` (``||A y - theta y||`` up to rounding).
      error: ``(k,)`` what the stop rule compared with ``tol * |theta|``: the residual
        (``stop="residual"``) or :func:`ritz_errors` (``stop="eigenvalue"``).
      num_hvps: products used (int32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.eigen import LanczosResult
      >>> r = LanczosResult(jnp.array([2.0]), jnp.ones((1, 3)), jnp.array([0.0]), jnp.array([0.0]), jnp.int32(3))
      >>> float(r.theta[0]), int(r.num_hvps)
      (2.0, 3)
    """

    theta: jax.Array
    vectors: jax.Array
    residual: jax.Array
    error: jax.Array
    num_hvps: jax.Array


def lanczos_pairs(
    op, v_init: jax.Array, key: jax.Array, num_iters: int, tol: float | None, k: int, *, stop: str = "residual"
) -> LanczosResult:
    """Top-k algebraic eigenpairs by Lanczos with full reorthogonalization, with their error estimates.

    :func:`lanczos` with the estimate its stop rule used (:class:`LanczosResult`). ``stop``: the
    rule of a tolerance-mode solve, ``"residual"`` or ``"eigenvalue"`` (module docstring); in fixed
    mode (``tol=None``) it only chooses what ``error`` holds.

    Examples:
      Two steps on ``diag(1, 2, 10)``: the top Ritz value's residual is 0.69 while its estimated
      error ``4 r**2 / gap`` is 0.23 (the true error is 0.06):

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.eigen import lanczos_pairs
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 10.0]))
      >>> r = lanczos_pairs(lambda x: a @ x, jnp.ones(3) / jnp.sqrt(3.0), jax.random.key(0), 2, None, 1, stop="eigenvalue")
      >>> round(float(r.theta[0]), 2), round(float(r.residual[0]), 2), round(float(r.error[0]), 2), int(r.num_hvps)
      (9.94, 0.69, 0.23, 2)
    """
    if stop not in STOPS:
        raise ConfigError(f"stop must be one of {STOPS}, got {stop!r}")
    n = v_init.shape[0]
    dtype = v_init.dtype
    m = min(num_iters, n)  # a Krylov basis cannot exceed the dimension (static)
    if k > m:
        raise ConfigError(
            f"k={k} eigenpairs need num_iters >= k and at least k parameters; got num_iters={num_iters}, n={n}"
        )
    k_ritz = min(k + 1, m) if stop == "eigenvalue" else k  # the (k+1)-th Ritz value gives the gap

    def estimate(s: LanczosState):
        theta, coords, res = _ritz(s.alpha, s.beta, s.j, k_ritz)
        err = ritz_errors(theta, res, s.j, k) if stop == "eigenvalue" else res
        return theta[:k], coords[:, :k], res[:k], err

    rows = -(-(m + 1) // _BLOCK) * _BLOCK
    st = LanczosState(
        jnp.zeros((rows, n), dtype).at[0].set(v_init),
        jnp.zeros((m,), dtype),
        jnp.zeros((m,), dtype),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), dtype),
    )
    rkey = jax.random.fold_in(key, 1)
    if tol is None:
        st = lax.fori_loop(0, m, lambda i, s: _lanczos_step(op, rkey, s), st)
    else:

        def not_done(s):
            theta, _, _, err = estimate(s)
            conv = (s.j >= k) & jnp.all(err <= tol * jnp.abs(theta))
            return (s.j < m) & ~conv

        st = lax.while_loop(not_done, lambda s: _lanczos_step(op, rkey, s), st)
    theta, coords, res, err = estimate(st)
    vecs = jnp.dot(coords.T, st.q[:m], precision=_HI)  # (k, n); padded rows have zero coordinates
    vecs = jax.vmap(lambda x: _normalize(x)[0])(vecs)
    return LanczosResult(theta, vecs, res, err, st.j)


def lanczos(
    op, v_init: jax.Array, key: jax.Array, num_iters: int, tol: float | None, k: int, *, stop: str = "residual"
):
    """Top-k algebraic eigenpairs by Lanczos with full reorthogonalization (flat vectors).

    Returns ``(theta (k,), vectors (k, n), residual (k,), num_hvps)``. The residual is the Lanczos
    bound ``|beta_m s_m|``, equal to ``||H y - theta y||`` up to rounding when the basis is
    orthonormal (kept so by full reorthogonalization); it costs no product. ``stop``: the stop rule
    of a tolerance-mode solve (module docstring); :func:`lanczos_pairs` also returns its estimates.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.eigen import lanczos
      >>> a = jnp.diag(jnp.array([-4.0, 1.0, 2.0]))
      >>> top2 = jax.jit(lambda v, key: lanczos(lambda x: a @ x, v, key, num_iters=3, tol=None, k=2))
      >>> theta, vecs, res, n = top2(jnp.ones(3) / jnp.sqrt(3.0), jax.random.key(0))
      >>> [round(t, 4) for t in theta.tolist()], vecs.shape, int(n)
      ([2.0, 1.0], (2, 3), 3)
    """
    r = lanczos_pairs(op, v_init, key, num_iters, tol, k, stop=stop)
    return r.theta, r.vectors, r.residual, r.num_hvps


class Quadrature(NamedTuple):
    """Gauss quadrature of the spectral measure of a unit vector ``v`` from :func:`lanczos_quadrature`.

    The measure is ``mu_v = sum_j (u_j . v)^2 delta(lambda_j)`` over the eigenpairs ``(lambda_j, u_j)``
    of the map; ``sum_i weights[i] * f(nodes[i])`` approximates ``v^T f(A) v = int f dmu_v``.

    Attributes:
      nodes: ``(m,)`` Ritz values of ``v``'s Krylov space, descending; the first ``krylov_dim`` are
        the quadrature nodes, the rest repeat the smallest node (with weight 0).
      weights: ``(m,)`` squared first components of the tridiagonal's eigenvectors, nonnegative,
        summing to 1; exactly 0 past ``krylov_dim``.
      top: ``(k,)`` the largest eigenvalues of the whole tridiagonal, descending (restarted blocks
        included, as :func:`lanczos` reports them).
      krylov_dim: dimension of ``v``'s Krylov space reached: ``m`` unless it became invariant earlier.
      num_hvps: products used (``m``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.eigen import Quadrature
      >>> q = Quadrature(nodes=jnp.array([3.0, 1.0]), weights=jnp.array([0.5, 0.5]), top=jnp.array([3.0]),
      ...                krylov_dim=jnp.int32(2), num_hvps=jnp.int32(2))
      >>> float(jnp.sum(q.weights * q.nodes))  # v^T A v
      2.0
    """

    nodes: jax.Array
    weights: jax.Array
    top: jax.Array
    krylov_dim: jax.Array
    num_hvps: jax.Array


def lanczos_quadrature(op, v_init: jax.Array, key: jax.Array, num_steps: int, *, top_k: int = 1) -> Quadrature:
    """Nodes and weights of the ``m``-point Gauss quadrature of ``v``'s spectral measure, by Lanczos.

    ``m = min(num_steps, n)`` Lanczos steps with full reorthogonalization from ``v = v_init / ||v_init||``
    build the tridiagonal ``T``; its eigenvalues are the nodes and the squared first components of
    its eigenvectors the weights (Golub & Meurant; Ghorbani, Krishnan & Xiao 2019). In exact
    arithmetic ``sum_i w_i theta_i^p = v^T A^p v`` for ``p <= 2m - 1``, and for every ``p`` once the
    Krylov space is invariant.

    Breakdown: when the Krylov space of ``v`` becomes invariant after ``d < m`` steps (e.g. ``m >= n``,
    or ``A`` with fewer than ``m`` distinct eigenvalues seen by ``v``), :func:`lanczos`'s step restarts
    from a random orthogonal vector with a zero coupling. The later blocks of ``T`` belong to other
    vectors, not to ``v``'s measure: only the first block (``krylov_dim = d`` rows) gives nodes and
    weights, the ``m - d`` others get weight exactly 0, so the quadrature stays exact. ``top`` comes
    from the whole ``T`` (eigenvalues found after restarts count there). Fixed step count, no
    data-dependent Python control flow: runs under ``jit`` and ``vmap``.

    Args:
      op: symmetric linear map on flat vectors ``(n,) -> (n,)``.
      v_init: start vector ``(n,)`` (nonzero), in the working dtype.
      key: PRNG key of the restarts after a breakdown.
      num_steps: Lanczos steps (products), static; capped at ``n``.
      top_k: how many of the largest Ritz values to return in ``top`` (``<= m``).

    Returns:
      :class:`Quadrature`.

    Examples:
      ``A = diag(1, 1, 3)`` and ``v = (1, 1, 1) / sqrt(3)``: the measure puts 2/3 on 1 and 1/3 on 3;
      the Krylov space is invariant after 2 steps, so the third weight is 0:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.eigen import lanczos_quadrature
      >>> a = jnp.array([1.0, 1.0, 3.0])
      >>> quad = jax.jit(lambda v, key: lanczos_quadrature(lambda x: a * x, v, key, num_steps=3))
      >>> q = quad(jnp.ones(3), jax.random.key(0))
      >>> [round(t, 4) for t in q.nodes.tolist()], [round(w, 4) for w in q.weights.tolist()], int(q.krylov_dim)
      ([3.0, 1.0, 1.0], [0.3333, 0.6667, 0.0], 2)
    """
    n = v_init.shape[0]
    m = min(int(num_steps), n)
    if m < 1 or not 1 <= top_k <= m:
        raise ConfigError(f"need num_steps >= 1 and 1 <= top_k <= min(num_steps, n); got {num_steps}, {top_k}, n={n}")
    dtype = v_init.dtype
    rows = -(-(m + 1) // _BLOCK) * _BLOCK
    st = LanczosState(
        jnp.zeros((rows, n), dtype).at[0].set(_normalize(v_init)[0]),
        jnp.zeros((m,), dtype),
        jnp.zeros((m,), dtype),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), dtype),
    )
    rkey = jax.random.fold_in(key, 1)
    st = lax.fori_loop(0, m, lambda i, s: _lanczos_step(op, rkey, s), st)
    # A breakdown after step j leaves beta[j] == 0 exactly (j < m - 1 couples two rows of T).
    broke = st.beta[: m - 1] == 0
    dim = jnp.where(jnp.any(broke), jnp.argmax(broke).astype(jnp.int32) + 1, m).astype(jnp.int32)
    # _ritz decouples rows >= dim and pads them below the first block's spectrum: in descending
    # order the first block's dim Ritz values come first, the m - dim pads last.
    theta, s, _ = _ritz(st.alpha, st.beta, dim, m)
    live = jnp.arange(m, dtype=jnp.int32) < dim
    nodes = jnp.where(live, theta, theta[dim - 1])
    weights = jnp.where(live, s[0, :] ** 2, jnp.zeros_like(theta))
    top, _, _ = _ritz(st.alpha, st.beta, st.j, top_k)
    return Quadrature(nodes, weights, top, dim, st.j)


class Extremes(NamedTuple):
    """Extreme eigenvalues of a symmetric PSD linear map (:func:`psd_extremes`) and their cost.

    Attributes:
      mu_min, mu_max: the smallest and largest eigenvalue.
      iters_max, iters_min: operator products used by each power iteration.
      residual_max, residual_min: relative residuals ``||B v - lam v|| / |lam|`` at the stop
        (``B = A`` for ``mu_max``, ``B = mu_max I - A`` for ``mu_min``).

    Examples:
      >>> from eos_jax.eigen import Extremes
      >>> e = Extremes(mu_min=1.0, mu_max=5.0, iters_max=40, iters_min=25, residual_max=1e-7, residual_min=1e-7)
      >>> e.mu_max / e.mu_min  # the condition number
      5.0
    """

    mu_min: float
    mu_max: float
    iters_max: int
    iters_min: int
    residual_max: float
    residual_min: float


def _relative(res: jax.Array, lam: jax.Array) -> jax.Array:
    """``res / |lam|``, with ``|lam|`` floored at the dtype's tiny so that a zero map gives a finite value."""
    return res / jnp.maximum(jnp.abs(lam), jnp.finfo(lam.dtype).tiny)


def psd_extremes(
    op: Operator, v_max: jax.Array, v_min: jax.Array, *, tol: float = 1e-10, max_iters: int = 20000
) -> Extremes:
    """``mu_min`` and ``mu_max`` of a symmetric positive semidefinite map by power iteration.

    ``mu_max``: :func:`power_iteration` on ``A`` (PSD, so the largest magnitude is the largest
    algebraic eigenvalue and no shift is taken). ``mu_min``: :func:`power_iteration` on the shifted
    ``mu_max I - A`` (PSD, largest eigenvalue ``mu_max - mu_min``), so ``mu_min = mu_max - lam``.
    Each stops when the relative residual is at most ``tol``; the eigenvalue error is then of the
    order of ``(tol * lam)**2 / gap``. The two solves are jitted; ``op`` may close over its data
    (it is traced once per call).

    Args:
      op: the linear map on flat vectors of the dtype of ``v_max``.
      v_max, v_min: start vectors of the two iterations (any nonzero scale).
      tol: relative residual tolerance, in (0, 1).
      max_iters: products per eigenvalue, at most (>= 2).

    Returns:
      :class:`Extremes` with Python floats and ints.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 5.0]))
      >>> e = psd_extremes(lambda v: a @ v, jnp.ones(3), jnp.array([1.0, -1.0, 0.5]), tol=1e-6)
      >>> round(e.mu_min, 3), round(e.mu_max, 3)
      (1.0, 5.0)
    """
    if not (isinstance(tol, (float, int)) and 0 < tol < 1):
        raise ConfigError(f"tol must be a float in (0, 1), got {tol!r}")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 2:
        raise ConfigError(f"max_iters must be an int >= 2, got {max_iters!r}")

    def solve(o: Operator, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        st, _ = power_iteration(o, _normalize(v)[0], max_iters, tol)
        return st.lam, st.n, _relative(st.res, st.lam)

    lam, it, res = jax.jit(lambda v: solve(op, v))(v_max)
    mu_max = float(lam)
    shifted = lambda v: mu_max * v - op(v)  # noqa: E731
    lam2, it2, res2 = jax.jit(lambda v: solve(shifted, v))(v_min)
    return Extremes(
        mu_min=mu_max - float(lam2),
        mu_max=mu_max,
        iters_max=int(it),
        iters_min=int(it2),
        residual_max=float(res),
        residual_min=float(res2),
    )
