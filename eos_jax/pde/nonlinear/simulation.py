"""Gradient descent on the one-layer CNN, every ``dt`` with ``k = 1`` and ``k`` as one vmapped program (Eq. (9), Figures 5-6).

Lane state, one step, a chunk of steps in ``lax.scan``, the sharpness (Lanczos) of each lane, and
:func:`simulate`, which returns the histories as arrays (no file is written).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eos_jax import hessian, optim
from eos_jax.metrics import rel_l1
from eos_jax.models.layers import conv2d
from eos_jax.pde.common import checkerboard
from eos_jax.pde.nonlinear.model import (
    F32,
    NonlinearConfig,
    PyTree,
    kernel_of,
    make_batch,
    make_loss_fn,
    make_loss_parts,
    make_model,
    regime_fractions,
    regime_threshold,
)


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
            jnp.where(rec_ok, loss, nan),
            jnp.where(rec_ok, data, nan),
            jnp.where(rec_ok, logit, nan),
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
    def run_chunk(
        state: LaneState, dts: jax.Array, ks: jax.Array, t0: jax.Array, num_steps: jax.Array, batch: dict
    ) -> tuple[LaneState, dict]:
        def body(st: LaneState, i: jax.Array) -> tuple[LaneState, dict]:
            t = t0 + i
            new, rec = lanes(st, dts, ks, t, batch)
            # RelL1 at K_t; NaN once a lane of the pair is dead or its L(K_t) is not finite.
            r = pair_rel_l1(st)
            pair_ok = jnp.all(jnp.isfinite(rec.loss), axis=1)
            r = jnp.where(pair_ok, r, jnp.full_like(r, jnp.nan))
            active = t < num_steps
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, st)
            return new, {
                "loss": rec.loss,
                "data_loss": rec.data_loss,
                "logit": rec.logit,
                "fractions": rec.fractions,
                "rel_l1": r,
            }

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
        res = hessian.top_eigenvalue(
            loss_fn, params, batch, method="lanczos", num_iters=num_iters, tol=None, v0=v0, key=key
        )
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


def init_lanes(
    model: Any, config: NonlinearConfig, image_shape: tuple[int, int]
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
        jax.tree_util.tree_map(stack, params),
        jax.tree_util.tree_map(stack, opt_state),
        jnp.ones((n, 2), bool),
        jnp.zeros((n, 2), jnp.int32),
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
    lane_keys = jax.vmap(
        jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j), in_axes=(None, 0)),
        in_axes=(0, None),
    )(jnp.arange(n), jnp.arange(2))
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
            log(
                f"step {t}/{config.steps}  alive lanes {int(np.asarray(state.alive).sum())}/{2 * n}  "
                f"{time.perf_counter() - t_begin:.0f} s"
            )
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
        timing={
            "first_chunk_with_compile_s": t_first_chunk,
            "other_chunks_s": t_chunks,
            "first_sharpness_with_compile_s": t_first_sharp,
            "other_sharpness_s": t_sharp,
            "chunk_steps": chunk,
            "lanes": 2 * n,
        },
    )
    return out
