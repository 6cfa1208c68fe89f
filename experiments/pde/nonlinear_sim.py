"""The non-linear PDE (9) as what it is: the engine's ``dt x k`` sweep of a one-layer ``cnn`` on one image.

Gradient descent on the loss (7) with step ``dt`` is forward Euler on (9) (Section 5.1);
the ``k = 1`` and ``k = k_perturbed`` lanes of each ``dt`` are one lane pair of
:func:`eos_jax.train.fit`: same seed (the same ``K_0``), RelL1 of the perturbed lane to its
``k = 1`` twin computed inside the vmapped program, sharpness by the engine's warm-started
Lanczos. Table 3's per-step quantities (the cross-entropy part of the loss, the logit
``g`` and the regime fractions of ``K * I``) come through the engine's per-step hook
(``Problem.step_metrics``). :func:`simulate` turns the engine's :class:`~eos_jax.train.History`
into the ``(steps, n_dt, 2)`` arrays that :mod:`experiments.pde.nonlinear` classifies and
plots.

Conventions, the engine's:
  * record ``t`` describes ``K_t`` (before the update of step ``t``);
  * a lane's first non-finite step is the first step whose update did not complete
    finitely (``L(K_t)``, ``grad L(K_t)`` or ``K_{t+1}`` not finite); from then on the
    lane is frozen and its records are NaN (``null`` in JSON);
  * ``K_0 ~ N(0, 1)`` is drawn from the lane key tree of :mod:`eos_jax.train.state`
    (``fold_in(fold_in(key(0), seed), 0)``), as for every model the engine trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from eos_jax import optim
from eos_jax import train as tr
from eos_jax.models.layers import conv2d
from eos_jax.pde.common import checkerboard
from eos_jax.pde.nonlinear import (
    NonlinearConfig,
    kernel_of,
    make_batch,
    make_loss_fn,
    make_loss_parts,
    make_model,
    regime_fractions,
    regime_threshold,
)

__all__ = ["nonlinear_problem", "simulate"]


def nonlinear_problem(config: NonlinearConfig) -> tuple[tr.Problem, list[tr.Lane], tr.EngineConfig, Any]:
    """The engine's problem, lanes and schedule for ``config`` (and the model).

    Lanes are ``(dt, k)`` for ``dt`` in ``config.dts`` (slowest) and ``k`` in ``(1,
    config.k)``, all with ``seed=config.seed``, in one vmapped group (so each perturbed
    lane's RelL1 is taken to its twin in the same program). The loss (7) carries the
    weight decay ``alpha`` itself, so the lanes' ``weight_decay`` is 0 and the sharpness is
    that of (7). The sharpness runs exactly ``config.sharpness_iters`` Lanczos products
    (no tolerance) every ``config.sharpness_every`` steps.

    Examples:
      >>> from eos_jax.pde.nonlinear import NonlinearConfig
      >>> problem, lanes, engine, model = nonlinear_problem(NonlinearConfig(dts=(0.01, 0.1), size=8, kernel=3))
      >>> [(l.learning_rate, l.k) for l in lanes]
      [(0.01, 1), (0.01, 3), (0.1, 1), (0.1, 3)]
      >>> engine.max_lanes, engine.sharpness_tol, problem.l2_weight_decay
      (4, None, False)
    """
    config.validate()
    eps = regime_threshold(config.beta, config.regime_tol)
    image = checkerboard(config.size, square=config.square, dtype=np.float32)
    model = make_model(config.kernel, beta=config.beta, pool=config.pool, conv_impl=config.conv_impl)
    loss_parts = make_loss_parts(model, config.alpha)
    impl = model.info["conv_impl"]
    shape = (*image.shape, 1)

    def init_params(key: jax.Array) -> Any:
        return model.init(key, shape)["params"]

    def step_metrics(params: Any, batch: dict) -> dict[str, jax.Array]:
        _, (data, logit) = loss_parts(params, batch)
        kernel = jax.tree_util.tree_leaves(params)[0]
        # K * I with the model's own convolution, for the regime fractions of Table 3.
        pre = conv2d(batch["x"], kernel, padding="valid", impl=impl)
        return {"data_loss": data, "logit": logit, "fractions": regime_fractions(pre, eps)}

    problem = tr.Problem(
        init_params=init_params,
        loss_fn=make_loss_fn(model, config.alpha),
        make_optimizer=lambda hp: optim.sgd(hp.learning_rate, k=hp.k),
        data=make_batch(image, config.label),
        threshold=2.0,
        l2_weight_decay=False,
        name="nonlinear-pde",
        step_metrics=step_metrics,
    )
    lanes = tr.make_lanes(list(config.dts), ks=[1, config.k], seeds=config.seed)
    engine = tr.EngineConfig(
        steps=config.steps,
        chunk_steps=config.sharpness_every,
        log_every=1,
        sharpness_every=config.sharpness_every,
        sharpness_iters=config.sharpness_iters,
        sharpness_method="lanczos",
        sharpness_tol=None,
        checkpoint_every=None,
        max_lanes=len(lanes),
    )
    return problem, lanes, engine, model


def simulate(config: NonlinearConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs every lane of ``config`` through :func:`eos_jax.train.fit`; NumPy histories, no files.

    Returns:
      A dict with ``loss, data_loss, logit (steps, n_dt, 2)``, ``fractions (steps, n_dt,
      2, 3)``, ``rel_l1 (steps, n_dt)`` (NaN once a lane of the pair stopped),
      ``sharpness_steps (m,)`` (the multiples of ``sharpness_every`` up to ``steps``),
      ``sharpness (m, n_dt, 2)`` (``lambda_max`` of (7), NaN for stopped lanes),
      ``first_nonfinite`` (per dt a list of 2: the first non-finite step or None),
      ``final_params`` (leading ``(n_dt, 2)`` axes), ``initial_kernel``, ``eps``,
      ``model_info`` and the engine's wall-clock ``timing``.

    Several processes (``jax.distributed``): :func:`eos_jax.train.fit` shards the lanes over the
    devices of every process and gathers its histories and final parameters onto every process
    (:func:`eos_jax.distributed.to_host`, collectives every process calls in the same order:
    each runs this function once, with the same config); ``K_0`` is drawn on this process's own
    device; so every process returns the same NumPy arrays.
    """
    problem, lanes, engine, model = nonlinear_problem(config)
    n, steps = len(config.dts), config.steps
    # K_0 as the engine draws it (one compiled program: eagerly every op of the init would compile).
    initial_kernel = np.asarray(kernel_of(jax.jit(lambda s: problem.init_params(tr.lane_init_key(s)))(config.seed)))
    marks = {max(1, steps * p // 10) for p in range(1, 11)}  # a log line per 10 % of the run

    def on_chunk(s: int) -> None:
        if log is not None and s in marks:
            log(f"step {s}/{steps}")

    hist = tr.fit(problem, lanes, steps, config=engine, on_chunk=on_chunk if log is not None else None)
    assert np.array_equal(hist.step, np.arange(steps + 1))  # log_every=1: every step, then the final line

    def per_dt(a: np.ndarray) -> np.ndarray:  # (lanes, T, ...) -> (T, n_dt, 2, ...)
        a = a.reshape((n, 2, *a.shape[1:]))
        return np.moveaxis(a, 2, 0)

    finite = hist.finite[:, :steps]
    # Lane alive before step t: no earlier step failed (the engine's finite flag is "after step t").
    alive_before = np.concatenate([np.ones((len(lanes), 1), bool), finite[:, :-1]], axis=1)
    rec_ok = alive_before & np.isfinite(hist.loss[:, :steps])

    def masked(a: np.ndarray) -> np.ndarray:
        ok = rec_ok.reshape(rec_ok.shape + (1,) * (a.ndim - 2))
        return per_dt(np.where(ok, a[:, :steps], np.nan).astype(a.dtype))

    out: dict[str, Any] = {
        "loss": masked(hist.loss),
        "data_loss": masked(hist.aux["data_loss"]),
        "logit": masked(hist.aux["logit"]),
        "fractions": masked(hist.aux["fractions"]),
    }
    pair_ok = per_dt(rec_ok).all(axis=2)  # (steps, n_dt)
    out["rel_l1"] = np.where(pair_ok, per_dt(hist.rel_l1[:, :steps])[:, :, 1], np.nan).astype(hist.rel_l1.dtype)
    cols = np.arange(0, steps + 1, config.sharpness_every)
    alive_at = np.concatenate([alive_before, finite[:, -1:]], axis=1)  # alive at K_t, t = 0..steps
    sharp = np.where(alive_at[:, cols], hist.sharpness[:, cols], np.nan)
    first = [s.get("first_nonfinite_step") for s in hist.lane_summaries]
    final_params = jax.tree_util.tree_map(lambda x: x.reshape((n, 2, *x.shape[1:])), hist.params)
    out.update(
        sharpness_steps=cols.astype(np.int64),
        sharpness=per_dt(sharp),
        first_nonfinite=[[first[2 * i], first[2 * i + 1]] for i in range(n)],
        final_params=final_params,
        initial_kernel=initial_kernel,
        eps=regime_threshold(config.beta, config.regime_tol),
        model_info=model.info,
        timing=dict(hist.timing, chunk_steps=engine.chunk_steps, lanes=len(lanes)),
    )
    return out
