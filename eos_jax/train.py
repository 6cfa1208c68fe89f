"""The training engine: one state pytree, a pure step, scan-chunked loops, vmapped sweeps.

A run trains one or more *lanes*, each a point of the product of lists of learning
rate, perturbation factor k, seed and weight decay (:func:`make_lanes`). All lanes of
a group run as one vmapped program; the optimizer is built *inside* the vmapped step
from the lane's traced hyperparameters (:class:`HParams`), so one compilation serves
every learning rate. Groups hold at most ``max_lanes`` lanes (memory); with several
devices the lane axis is sharded over them.

Steps run in chunks inside :func:`jax.lax.scan`. Between chunks the host writes
``metrics.jsonl``, tracks the sharpness (largest algebraic Hessian eigenvalue,
warm-started from the eigenvector kept in the state), saves orbax checkpoints, redraws
the progress bar and reacts to SIGINT/SIGTERM (checkpoint, then stop). Chunk
boundaries fall on multiples of ``chunk_steps``, ``checkpoint_every``,
``sharpness_every`` and ``log_every``, so an interrupted and resumed run performs the
same computations, in the same order, as an uninterrupted one.

Divergence is a result: a lane whose loss, parameters or optimizer state become
non-finite records the step and keeps its last finite state from then on, so the
other lanes and the summary stay finite (Section 6's sweeps cross the stability
boundary on purpose).

The normalized sharpness ``lr * lambda_max`` is compared with the threshold of the
optimizer in use (2 for gradient descent: the classical bound ``lr < 2/lambda_max``
that the Edge of Stability exceeds, Section 6).

Randomness is a pure function of the lane's seed. The key tree (every edge a
``jax.random.fold_in``; no key is used for two purposes)::

    key(0) -> seed -> 0: init key           problem.init_params
                   -> 1: data key           TrainState.key
                           -> STREAM_BATCH_ORDER (0) -> epoch e: permutation of epoch e
                           -> STREAM_SHARPNESS (1)   -> step t:  eigensolver key at step t
                   -> 2: eigenvector key    first guess of TrainState.eigvec

The two streams of the data key hang off distinct tags, so the sharpness key of step
``t`` and the batch-order key of epoch ``e`` differ even when ``t == e`` (before the
tags, both were ``fold_in(data key, n)`` and collided whenever step == epoch).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eos_jax import io as eio
from eos_jax import optim
from eos_jax.checkpoint import CheckpointStore
from eos_jax.data.transforms import epoch_permutation
from eos_jax.errors import CheckpointMismatchError, ConfigError
from eos_jax.metrics import rel_l1, tree_digest, ulp_diff
from eos_jax.progress import ProgressBar

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], jax.Array]
# eig_fn(objective, params, batch, v0, key) -> (eigenvalue, eigenvector); must be vmappable
# (no host-side convergence test: a fixed number of iterations or a lax.while_loop).
EigFn = Callable[[LossFn, PyTree, Batch, PyTree, jax.Array], tuple[jax.Array, PyTree]]

_ROOT_SEED = 0  # every lane key is fold_in(key(_ROOT_SEED), seed): seeds are plain integers.
_MAX_SEED = 2**31 - 1
STREAM_BATCH_ORDER = 0  # fold_in tag of the data key's batch-order stream (one key per epoch)
STREAM_SHARPNESS = 1  # fold_in tag of the data key's eigensolver stream (one key per step)


def batch_order_key(key_data: jax.Array) -> jax.Array:
    """The batch-order stream of a lane's data key (raw ``uint32[2]``); epoch ``e`` folds in ``e``."""
    return jax.random.fold_in(jax.random.wrap_key_data(key_data), STREAM_BATCH_ORDER)


def sharpness_key(key_data: jax.Array, step: jax.Array | int) -> jax.Array:
    """The eigensolver key of a lane at ``step``: ``fold_in(fold_in(data key, STREAM_SHARPNESS), step)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), STREAM_SHARPNESS), step)


# ----------------------------------------------------------------------------- lanes


@dataclasses.dataclass(frozen=True)
class Lane:
    """One run of a sweep: Python values of its hyperparameters."""

    learning_rate: float
    k: int = 1
    seed: int = 0
    weight_decay: float = 0.0

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_list(name: str, values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        out = list(values)
    else:
        out = [values]
    if not out:
        raise ConfigError(f"{name}: empty list; give at least one value")
    return out


def make_lanes(
    learning_rates: float | Sequence[float],
    ks: int | Sequence[int] = 1,
    seeds: int | Sequence[int] = 0,
    weight_decays: float | Sequence[float] = 0.0,
) -> list[Lane]:
    """The product of the hyperparameter lists, learning rate varying slowest.

    Args:
      learning_rates: finite values > 0.
      ks: perturbation factors, integers >= 1 (k=1 is plain SGD/GD; Section 4.1).
      seeds: integers in [0, 2**31 - 1].
      weight_decays: finite values >= 0.

    Returns:
      ``len(lr) * len(k) * len(seed) * len(wd)`` lanes.

    Raises:
      ConfigError: a bad value (named) or a duplicated lane.
    """
    lrs = _as_list("learning rate", learning_rates)
    kk = _as_list("k", ks)
    ss = _as_list("seed", seeds)
    wds = _as_list("weight decay", weight_decays)
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rate {lr!r} is not allowed; expected a finite float > 0")
    for k in kk:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k={k!r} is not allowed; expected an integer >= 1")
    for s in ss:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= _MAX_SEED:
            raise ConfigError(f"seed {s!r} is not allowed; expected an integer in [0, {_MAX_SEED}]")
    for wd in wds:
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ConfigError(f"weight decay {wd!r} is not allowed; expected a finite float >= 0")
    lanes = [
        Lane(float(lr), int(k), int(s), float(wd)) for lr, k, s, wd in itertools.product(lrs, kk, ss, wds)
    ]
    if len(set(lanes)) != len(lanes):
        raise ConfigError("the hyperparameter lists contain duplicates; every lane must be distinct")
    return lanes


class HParams(NamedTuple):
    """Traced hyperparameters of one lane (a leading lane axis when stacked)."""

    learning_rate: jax.Array  # working float dtype
    k: jax.Array  # int32
    weight_decay: jax.Array  # working float dtype
    seed: jax.Array  # int32


def stack_hparams(lanes: Sequence[Lane], dtype: Any = jnp.float32) -> HParams:
    """Stacks lanes into an :class:`HParams` of arrays with a leading lane axis.

    Learning rate and weight decay are rounded once to ``dtype``, which must be the
    dtype of the parameters (:func:`hparam_dtype`; :func:`init_state` and the step
    refuse another): float64 parameters get ``float64(lr)``, never
    ``float64(float32(lr))``.
    """
    return HParams(
        learning_rate=jnp.asarray(np.array([l.learning_rate for l in lanes], dtype=dtype)),
        k=jnp.asarray(np.array([l.k for l in lanes], dtype=np.int32)),
        weight_decay=jnp.asarray(np.array([l.weight_decay for l in lanes], dtype=dtype)),
        seed=jnp.asarray(np.array([l.seed for l in lanes], dtype=np.int32)),
    )


# ----------------------------------------------------------------------------- state and step


class TrainState(NamedTuple):
    """Everything a run carries from one step to the next (jitted, vmapped, checkpointed).

    Attributes:
      step: steps taken (int32 scalar).
      params: the parameter pytree.
      opt_state: the optax state.
      key: raw key data (uint32[2]) of the lane's data key (minibatch order).
      eigvec: last top Hessian eigenvector, shaped like ``params`` (warm start).
      finite: False once a step produced a non-finite loss, parameter or optimizer state.
      nonfinite_step: the first such step (meaningful only when ``finite`` is False);
        the state is frozen at the parameters of that step.
      loss_stats: running statistics of EVERY step's loss (:func:`init_loss_stats`),
        updated inside the scan, so the stability verdict does not depend on
        ``log_every`` (an even ``log_every`` would hide a period-2 oscillation).
      rel_buf: the last :data:`REL_L1_WINDOW` values of the lane's RelL1 to its k=1
        twin (a ring buffer, for the moving average the authors plot).
      rel_count: RelL1 values pushed so far.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    key: jax.Array
    eigvec: PyTree
    finite: jax.Array
    nonfinite_step: jax.Array
    loss_stats: dict[str, jax.Array]
    rel_buf: jax.Array
    rel_count: jax.Array


# Window of the RelL1 moving average (the paper's Figure 3 / Figure 5 right are smoothed over
# 100 steps; the released scripts, scripts/oscillation_plot.py and scripts/loss_plot.py of
# sunyx523/surprising-instabilities, plot raw arrays and do not say how): a trailing uniform
# mean of the last min(t + 1, 100) values, i.e. a partial window over the first 99 steps.
REL_L1_WINDOW = 100
SPIKE_REL_INCREASE = 0.01  # a "spike": the loss rises by more than 1 % from one step to the next


def init_loss_stats(dtype: Any) -> dict[str, jax.Array]:
    """Running statistics of the per-step loss before the first step.

    ``max_inc`` and ``max_inc_late`` start at -inf (no pair yet; reported as 0.0),
    ``min_loss`` at +inf (no finite loss yet; reported as None).
    """
    return {
        "prev": jnp.zeros((), dtype),
        "has_prev": jnp.zeros((), jnp.bool_),
        "max_inc": jnp.full((), -jnp.inf, dtype),
        "n_inc": jnp.zeros((), jnp.int32),
        "max_inc_late": jnp.full((), -jnp.inf, dtype),
        "n_inc_late": jnp.zeros((), jnp.int32),
        "min_loss": jnp.full((), jnp.inf, dtype),
    }


def update_loss_stats(stats: dict[str, jax.Array], step: jax.Array, loss: jax.Array, ok: jax.Array,
                      late_from: int) -> dict[str, jax.Array]:
    """Folds the loss of ``step`` into the running statistics (pure, jittable).

    Only finite steps (``ok``) count; the relative increase ``(loss - prev) / |prev|`` is
    taken between consecutive counted steps in the loss's dtype, and it is *late* when
    the earlier step is ``>= late_from`` (the first 10 % of a run are its transient).
    :func:`loss_stats_reference` is the same computation in NumPy.
    """
    dt = stats["prev"].dtype
    loss = loss.astype(dt)
    prev = stats["prev"]
    pair = ok & stats["has_prev"] & (prev != 0)
    inc = (loss - prev) / jnp.abs(jnp.where(prev != 0, prev, jnp.ones_like(prev)))
    spike = pair & (inc > jnp.asarray(SPIKE_REL_INCREASE, dt))
    late = (step - jnp.ones((), step.dtype)) >= late_from
    return {
        "prev": jnp.where(ok, loss, prev),
        "has_prev": stats["has_prev"] | ok,
        "max_inc": jnp.where(pair, jnp.maximum(stats["max_inc"], inc), stats["max_inc"]),
        "n_inc": stats["n_inc"] + spike.astype(jnp.int32),
        "max_inc_late": jnp.where(pair & late, jnp.maximum(stats["max_inc_late"], inc), stats["max_inc_late"]),
        "n_inc_late": stats["n_inc_late"] + (spike & late).astype(jnp.int32),
        "min_loss": jnp.where(ok, jnp.minimum(stats["min_loss"], loss), stats["min_loss"]),
    }


def loss_stats_reference(losses: Sequence[float], finite: Sequence[bool], late_from: int,
                         dtype: Any = np.float32) -> dict[str, Any]:
    """NumPy recomputation of the statistics of :func:`update_loss_stats` over steps 0..T.

    Args:
      losses: the loss of every step (index = step).
      finite: whether each step counted (the engine's per-step ``finite``).
      late_from: pairs whose earlier step is ``>= late_from`` are late.
      dtype: the loss dtype the engine computed in.

    Returns:
      The summary fields :func:`summarize_loss_stats` reports.
    """
    x = np.asarray(losses, dtype=dtype)
    kept = [(t, x[t]) for t in range(len(x)) if finite[t]]
    incs = [(s, (b - a) / np.abs(a)) for (s, a), (_, b) in zip(kept, kept[1:]) if a != 0]
    late = [v for t, v in incs if t >= late_from]
    return {
        "max_rel_loss_increase": float(max((v for _, v in incs), default=0.0)),
        "num_loss_increases_1pct": sum(1 for _, v in incs if v > dtype(SPIKE_REL_INCREASE)),
        "max_rel_loss_increase_late": float(max(late, default=0.0)),
        "num_loss_increases_1pct_late": sum(1 for v in late if v > dtype(SPIKE_REL_INCREASE)),
        "min_loss": float(min((v for _, v in kept), default=np.nan)) if kept else None,
    }


def summarize_loss_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The results.json fields of one lane's final running statistics (host values)."""
    def fin(v: Any, default: Any) -> Any:
        v = float(v)
        return v if math.isfinite(v) else default

    return {
        "max_rel_loss_increase": fin(stats["max_inc"], 0.0),
        "num_loss_increases_1pct": int(stats["n_inc"]),
        "max_rel_loss_increase_late": fin(stats["max_inc_late"], 0.0),
        "num_loss_increases_1pct_late": int(stats["n_inc_late"]),
        "min_loss": fin(stats["min_loss"], None),
    }


def _push_rel(buf: jax.Array, count: jax.Array, rel: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pushes ``rel`` into the ring buffer; returns ``(buf, count, moving average)``.

    The average is the sum of the filled slots (empty ones hold 0) divided by their
    number, ``min(count, REL_L1_WINDOW)``, in the buffer's dtype.
    """
    buf = buf.at[count % REL_L1_WINDOW].set(rel.astype(buf.dtype))
    count = count + jnp.ones((), count.dtype)
    filled = jnp.minimum(count, REL_L1_WINDOW).astype(buf.dtype)
    return buf, count, jnp.sum(buf) / filled


def rel_l1_to_twin(params: PyTree, twin: jax.Array) -> jax.Array:
    """Per lane, :func:`eos_jax.metrics.rel_l1` of its parameters to those of lane ``twin[lane]``.

    ``params`` has a leading lane axis; the twin's parameters are gathered inside the
    compiled program (no transfer to the host).
    """
    other = jax.tree_util.tree_map(lambda a: jnp.take(a, twin, axis=0), params)
    return jax.vmap(rel_l1)(params, other)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What to train, apart from the per-lane hyperparameters.

    Attributes:
      init_params: ``key -> params`` (pure).
      loss_fn: ``(params, batch) -> scalar`` data loss, a mean over the batch.
      make_optimizer: ``HParams -> optax.GradientTransformation`` (or an
        ``eos_jax.optim`` ``rounding="torch"`` optimizer: steps use ``optim.apply_step``) for one lane; called
        inside vmap with traced values, so it must accept traced lr, k, weight decay.
      data: the training set, a pytree of arrays with a leading example axis.
      threshold: stability threshold of the normalized sharpness ``lr * lambda_max``
        for the optimizer (2 for gradient descent).
      l2_weight_decay: the optimizer's weight decay is an L2 term ``wd/2 |p|^2`` added to
        the objective (coupled); the sharpness is then that of ``loss + wd/2 |p|^2``.
      eig_fn: how to compute the top eigenpair; default :func:`make_eig_fn`.
      name: for the progress bar and plots.
    """

    init_params: Callable[[jax.Array], PyTree]
    loss_fn: LossFn
    make_optimizer: Callable[[HParams], optax.GradientTransformation | optim.TorchRoundedOptimizer]
    data: Batch
    threshold: float = 2.0
    l2_weight_decay: bool = True
    eig_fn: EigFn | None = None
    name: str = ""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How to run: steps, chunking, logging, sharpness and checkpoint schedule.

    Attributes:
      steps: total optimizer steps (>= 1).
      batch_size: ``None`` for full-batch gradient descent, else minibatch size
        (epochs of a per-epoch permutation from the lane key; the remainder is dropped).
      chunk_steps: steps per ``lax.scan`` (at most; boundaries also fall on the
        other schedules).
      log_every: a metrics line every this many steps (and at every sharpness step).
      sharpness_every: track sharpness every this many steps (``None``: never).
      sharpness_iters: eigensolver iterations (Hessian-vector products): exactly this many
        with ``sharpness_tol=None``, at most this many otherwise.
      sharpness_tol: stop the warm-started solver once the relative residual
        ``||H v - lambda v|| <= tol * |lambda|`` (eigenvalue error at most ``tol * |lambda|``,
        typically ``(tol * lambda)**2 / gap``); ``None``: always ``sharpness_iters``.
        Warm-started from the previous eigenvector, 1e-3 takes 3-5 products on the main
        job instead of 20 (``benchmarks/bench_main.py``); under vmap the lanes' loop runs
        until every lane has converged, each lane keeping its own converged state.
      sharpness_method: ``"lanczos"`` or ``"power"`` (see :func:`make_eig_fn`).
      sharpness_examples: sharpness on the first n examples (``None``: full batch;
        for minibatch SGD a fixed subset keeps the cost bounded).
      checkpoint_every: checkpoint every this many steps (``None``: only at the end and
        on SIGINT/SIGTERM).
      max_lanes: lanes per vmapped program (memory).
      checkpoint_keep: committed checkpoints kept per group (>= 2).
    """

    steps: int
    batch_size: int | None = None
    chunk_steps: int = 50
    log_every: int = 1
    sharpness_every: int | None = 10
    sharpness_iters: int = 20
    sharpness_method: str = "lanczos"
    sharpness_examples: int | None = None
    sharpness_tol: float | None = 1e-3
    checkpoint_every: int | None = 100
    max_lanes: int = 64
    checkpoint_keep: int = 3

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        for name in ("steps", "chunk_steps", "log_every", "sharpness_iters", "max_lanes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is not allowed; expected an integer >= 1")
        for name in ("batch_size", "sharpness_every", "sharpness_examples", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}={v!r} is not allowed; expected an integer >= 1 or None")
        tol = self.sharpness_tol
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
            raise ConfigError(f"sharpness_tol={tol!r} is not allowed; expected a float in (0, 1) or None")
        if self.sharpness_method not in ("lanczos", "power"):
            raise ConfigError(f"sharpness_method={self.sharpness_method!r}; allowed: lanczos, power")
        if self.checkpoint_keep < 2:
            raise ConfigError(f"checkpoint_keep={self.checkpoint_keep}; expected >= 2")


def _lane_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init key, data key, eigenvector key) of a lane, all derived with fold_in."""
    lane = jax.random.fold_in(jax.random.key(_ROOT_SEED), seed)
    return jax.random.fold_in(lane, 0), jax.random.fold_in(lane, 1), jax.random.fold_in(lane, 2)


def hparam_dtype(problem: Problem, dtype: Any = None) -> np.dtype:
    """The dtype of a run's learning rate and weight decay: that of the parameters.

    Args:
      problem: whose ``init_params`` gives the parameters (traced abstractly, not run).
      dtype: None, or the dtype the caller expects (must then equal the parameters').

    Raises:
      ConfigError: ``dtype`` is given and is not the parameters' dtype.
    """
    shapes = jax.eval_shape(problem.init_params, jax.random.key(_ROOT_SEED))
    want = np.dtype(_param_dtype(shapes))
    if dtype is not None and np.dtype(dtype) != want:
        raise ConfigError(f"dtype={np.dtype(dtype)} for the hyperparameters, but the parameters are {want}: "
                          "learning rate and weight decay take the parameters' dtype (pass dtype=None)")
    return want


def _check_hparams(hp: HParams, params: PyTree) -> None:
    """Refuses (at trace time) hyperparameters of another float dtype than the parameters."""
    want = np.dtype(_param_dtype(params))
    for name in ("learning_rate", "weight_decay"):
        got = np.dtype(jnp.result_type(getattr(hp, name)))
        if got != want:
            raise ConfigError(f"{name} is {got} but the parameters are {want}: stack the hyperparameters with "
                              f"stack_hparams(lanes, {want}) (hyperparameters take the parameters' dtype)")


def _random_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Unit-norm Gaussian pytree shaped like ``tree`` (per-leaf dtype)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    vs = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    sq = sum(jnp.sum(jnp.square(v)).astype(jnp.float32) for v in vs)
    inv = jax.lax.rsqrt(sq)
    return jax.tree_util.tree_unflatten(treedef, [v * inv.astype(v.dtype) for v in vs])


def init_state(problem: Problem, hp: HParams) -> TrainState:
    """The state of one lane at step 0 (pure; vmap it over stacked HParams)."""
    init_key, data_key, eig_key = _lane_keys(hp.seed)
    params = problem.init_params(init_key)
    _check_hparams(hp, params)
    opt_state = problem.make_optimizer(hp).init(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        key=jax.random.key_data(data_key),
        eigvec=_random_like(eig_key, params),
        finite=jnp.ones((), jnp.bool_),
        nonfinite_step=jnp.zeros((), jnp.int32),
        loss_stats=init_loss_stats(_param_dtype(params)),
        rel_buf=jnp.zeros((REL_L1_WINDOW,), _param_dtype(params)),
        rel_count=jnp.zeros((), jnp.int32),
    )


def _param_dtype(params: PyTree) -> Any:
    """The floating dtype of the parameters (RelL1 and loss statistics are kept in it)."""
    leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.result_type(*leaves) if leaves else jnp.float32


def _all_finite(tree: PyTree) -> jax.Array:
    """True iff every inexact leaf of ``tree`` is finite."""
    ok = jnp.ones((), jnp.bool_)
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def select_batch(data: Batch, key_data: jax.Array, step: jax.Array, batch_size: int | None) -> Batch:
    """The batch of ``step``: all of ``data``, or a minibatch of a per-epoch permutation.

    Epoch ``e`` uses the permutation from ``fold_in(batch_order_key(key), e)`` (the key
    tree of the module docstring); step ``t`` takes slice ``t % steps_per_epoch`` of it.
    Pure in (key, step), hence exactly resumable.
    """
    if batch_size is None:
        return data
    n = int(jax.tree_util.tree_leaves(data)[0].shape[0])
    if batch_size > n:
        raise ConfigError(f"batch_size={batch_size} exceeds the {n} training examples")
    per_epoch = n // batch_size
    epoch = step // per_epoch
    i = step - epoch * per_epoch
    perm = epoch_permutation(batch_order_key(key_data), epoch, n)
    idx = jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data)


def make_train_step(
    problem: Problem, batch_size: int | None = None
) -> Callable[[TrainState, HParams, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step of one lane: ``(state, hparams, data) -> (state, metrics)``.

    The optimizer is built from ``hparams`` inside the step (traced lr, k, weight
    decay). ``metrics["loss"]`` is the loss at the parameters *before* the update (the
    loss of step ``state.step``). A step whose loss, new parameters or new optimizer
    state are not all finite leaves the state unchanged apart from ``step``, and sets
    ``finite=False`` and ``nonfinite_step`` (first time only).
    """

    def step(state: TrainState, hp: HParams, data: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_hparams(hp, state.params)
        batch = select_batch(data, state.key, state.step, batch_size)
        opt = problem.make_optimizer(hp)
        loss, grads = jax.value_and_grad(problem.loss_fn)(state.params, batch)
        params, opt_state = optim.apply_step(opt, grads, state.opt_state, state.params)
        ok = state.finite & jnp.isfinite(loss) & _all_finite(params) & _all_finite(opt_state)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + jnp.ones((), jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            key=state.key,
            eigvec=state.eigvec,
            finite=ok,
            nonfinite_step=jnp.where(state.finite & ~ok, state.step, state.nonfinite_step),
            loss_stats=state.loss_stats,
            rel_buf=state.rel_buf,
            rel_count=state.rel_count,
        )
        return new_state, {"loss": loss, "finite": ok}

    return step


def make_chunk_fn(
    problem: Problem, batch_size: int | None = None, chunk_steps: int = 50, late_from: int = 0
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Jitted ``(states, hparams, data, n, twin=None) -> (states, metrics)``: ``n`` steps of every lane.

    One ``lax.scan`` of static length ``chunk_steps`` over the lane-vmapped step, whose
    iterations ``i >= n`` are skipped by a ``lax.cond`` on the (unbatched) predicate
    ``i < n``: every chunk length up to ``chunk_steps`` shares one compiled program.
    Before each step, the RelL1 of every lane's parameters to those of lane
    ``twin[lane]`` (its k=1 twin in this group; itself when it has none, giving 0) is
    computed inside the program by a gather over the lane axis, pushed into the lane's
    ring buffer, and returned with its trailing moving average. Every step's loss, as the
    scan emitted it, is then folded into the lane's running loss statistics
    (:func:`update_loss_stats`, pairs whose earlier step is ``>= late_from`` are late) by
    a second compiled program on device (no host round trip). Metrics ``loss``, ``finite``,
    ``rel_l1`` and ``rel_l1_ma`` have shape ``(lanes, chunk_steps)``; entries ``>= n``
    are padding.
    """
    vstep = jax.vmap(make_train_step(problem, batch_size), in_axes=(0, 0, None))
    vpush = jax.vmap(_push_rel)
    vstats = jax.vmap(lambda st, step, loss, ok: update_loss_stats(st, step, loss, ok, late_from))

    def chunk(states: TrainState, hp: HParams, data: Batch, n: jax.Array, twin: jax.Array):
        def run(s: TrainState):
            rel = rel_l1_to_twin(s.params, twin)
            buf, count, ma = vpush(s.rel_buf, s.rel_count, rel)
            new, met = vstep(s, hp, data)
            new = new._replace(rel_buf=buf, rel_count=count)
            return new, {**met, "rel_l1": rel.astype(buf.dtype), "rel_l1_ma": ma}

        def skip(s: TrainState):
            shapes = jax.eval_shape(run, s)[1]
            return s, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        def body(s: TrainState, i: jax.Array):
            return jax.lax.cond(i < n, run, skip, s)

        states, met = jax.lax.scan(body, states, jnp.arange(chunk_steps, dtype=jnp.int32))
        return states, jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), met)

    def fold(stats: dict[str, jax.Array], step0: jax.Array, losses: jax.Array, finite: jax.Array, n: jax.Array):
        # Every step's loss, as the scan emitted it, folded in order (steps >= n are padding).
        def body(st, x):
            i, loss, ok = x
            return jax.lax.cond(i < n, lambda st_: vstats(st_, step0 + i, loss, ok), lambda st_: st_, st), None

        xs = (jnp.arange(chunk_steps, dtype=jnp.int32), jnp.swapaxes(losses, 0, 1), jnp.swapaxes(finite, 0, 1))
        return jax.lax.scan(body, stats, xs)[0]

    jitted = jax.jit(chunk)
    jfold = jax.jit(fold)

    def call(states: TrainState, hp: HParams, data: Batch, n: jax.Array, twin: jax.Array | None = None):
        if twin is None:
            twin = jnp.arange(jnp.shape(states.step)[0], dtype=jnp.int32)
        step0 = states.step
        states, met = jitted(states, hp, data, n, twin)
        # The loss statistics are folded in a second program from the materialized per-step losses:
        # inside the step's program XLA may compute the loss twice (two fusions) and round the copies
        # differently, so the statistics would not be those of the logged losses (measured: 2 ulps).
        stats = jfold(states.loss_stats, step0, met["loss"], met["finite"], n)
        return states._replace(loss_stats=stats), met

    return call


def make_final_fn(problem: Problem, batch_size: int | None, late_from: int = 0):
    """``(states, hparams, data, twin) -> (loss, finite, rel_l1, rel_l1_ma, loss_stats)`` at the last step.

    The loss and RelL1 of the final parameters (the line of step ``steps``), with the
    final loss folded into the statistics, without changing the state (so a run resumed
    from its last checkpoint recomputes the same values). The statistics are updated in
    a second program from the materialized loss: inside one program XLA may compute the
    loss twice (in two fusions) and round the copies differently, so that the logged loss
    and the one in the statistics would differ by an ulp.
    """
    vpush = jax.vmap(_push_rel)
    vstats = jax.jit(jax.vmap(lambda st, step, loss, ok: update_loss_stats(st, step, loss, ok, late_from)))

    def one_loss(state: TrainState, data: Batch):
        return problem.loss_fn(state.params, select_batch(data, state.key, state.step, batch_size))

    def final(states: TrainState, hp: HParams, data: Batch, twin: jax.Array):
        del hp
        loss = jax.vmap(one_loss, in_axes=(0, None))(states, data)
        finite = states.finite & jnp.isfinite(loss)
        rel = rel_l1_to_twin(states.params, twin)
        _, _, ma = vpush(states.rel_buf, states.rel_count, rel)
        return loss, finite, rel.astype(ma.dtype), ma

    jitted = jax.jit(final)

    def call(states: TrainState, hp: HParams, data: Batch, twin: jax.Array):
        loss, finite, rel, ma = jitted(states, hp, data, twin)
        return loss, finite, rel, ma, vstats(states.loss_stats, states.step, loss, finite)

    return call


def make_eig_fn(num_iters: int = 20, method: str = "lanczos", tol: float | None = None,
                linearize: bool = False) -> EigFn:
    """Top Hessian eigenpair with :func:`eos_jax.hessian.top_eigenvalue`.

    Args:
      num_iters: Hessian-vector products per call (the maximum when ``tol`` is set).
      method: ``"lanczos"`` (full reorthogonalization) or ``"power"`` (shifted by the
        Hessian module so that it finds the largest algebraic eigenvalue).
      tol: None for exactly ``num_iters`` products, or the relative residual at which to
        stop (a ``lax.while_loop``: still vmappable, no host-side test).
      linearize: products through one ``jax.linearize`` (True) or a fresh ``jvp(grad)`` each
        (False, default). Measured on the main job (2,000 images, shared 2-core VM,
        benchmarks/bench_main.py): a linearized product cost 3.4 gradients, ``jvp(grad)``
        1.3: the linearization keeps full-batch residuals whose reads and fresh temporaries
        cost more than recomputing the forward pass.
    """

    def eig(objective: LossFn, params: PyTree, batch: Batch, v0: PyTree, key: jax.Array):
        from eos_jax import hessian

        res = hessian.top_eigenvalue(objective, params, batch, method=method, num_iters=num_iters, tol=tol, v0=v0,
                                     key=key, linearize=linearize)
        return res.eigenvalue, res.eigenvector

    return eig


def objective_fn(problem: Problem, hp: HParams) -> LossFn:
    """The function gradient descent descends for lane ``hp``: the loss, plus ``wd/2 |p|^2`` when coupled."""
    if not problem.l2_weight_decay:
        return problem.loss_fn

    def objective(params: PyTree, batch: Batch) -> jax.Array:
        loss = problem.loss_fn(params, batch)
        sq = sum(jnp.sum(jnp.square(p)).astype(loss.dtype) for p in jax.tree_util.tree_leaves(params))
        return loss + (hp.weight_decay.astype(loss.dtype) * jnp.asarray(0.5, loss.dtype)) * sq

    return objective


def make_sharpness_fn(problem: Problem, eig_fn: EigFn) -> Callable[[TrainState, HParams, Batch], tuple[TrainState, jax.Array]]:
    """Jitted, lane-vmapped ``(states, hparams, batch) -> (states with new eigvec, lambda_max)``.

    Warm-started from ``state.eigvec``; a non-finite eigenvector is not kept. The
    eigensolver's key (random start when the warm start is zero, Lanczos restarts) is
    :func:`sharpness_key` of the lane's data key and step.
    """

    def one(state: TrainState, hp: HParams, batch: Batch):
        key = sharpness_key(state.key, state.step)  # its own stream: never a batch-order key
        val, vec = eig_fn(objective_fn(problem, hp), state.params, batch, state.eigvec, key)
        ok = _all_finite(vec)
        vec = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a.astype(b.dtype), b), vec, state.eigvec)
        return state._replace(eigvec=vec), val

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


def make_eval_fn(problem: Problem, batch_size: int | None) -> Callable[[TrainState, HParams, Batch], jax.Array]:
    """Jitted, lane-vmapped loss at the current parameters on the batch of the current step."""

    def one(state: TrainState, hp: HParams, data: Batch):
        return problem.loss_fn(state.params, select_batch(data, state.key, state.step, batch_size))

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


# ----------------------------------------------------------------------------- host loop


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of ``step`` was saved before stopping."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum = signum
        self.step = step
        self.run_dir = run_dir
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {run_dir}; continue with --resume")


class _SignalCatcher:
    """Records SIGINT/SIGTERM instead of raising, while active (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_SignalCatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _next_boundary(s: int, total: int, periods: Iterable[int | None]) -> int:
    """The first step after ``s`` that is a multiple of one of ``periods``, capped at ``total``."""
    nxt = total
    for p in periods:
        if p:
            nxt = min(nxt, (s // p + 1) * p)
    return nxt


def group_lanes(num_lanes: int, max_lanes: int, num_devices: int = 1) -> list[list[int]]:
    """Splits lane indices into groups of at most ``max_lanes`` (a multiple of ``num_devices`` when possible)."""
    size = max_lanes
    if num_devices > 1 and max_lanes >= num_devices:
        size = (max_lanes // num_devices) * num_devices
    return [list(range(i, min(i + size, num_lanes))) for i in range(0, num_lanes, size)]


def _index_lane(tree: PyTree, i: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[i], tree)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parses metrics.jsonl, dropping a torn last line."""
    out = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write of a killed run
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _json_line(rec: dict[str, Any]) -> str:
    return json.dumps(eio.to_jsonable(rec), sort_keys=True, allow_nan=False) + "\n"


def _lane_summary(lines: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Loss and sharpness statistics of one lane from its metrics lines (sorted by step)."""
    losses = [(r["step"], r["loss"]) for r in lines if r.get("finite") and r.get("loss") is not None]
    sharp = [(r["step"], r["sharpness"], r["normalized_sharpness"]) for r in lines if r.get("sharpness") is not None]
    out: dict[str, Any] = {
        "initial_loss": losses[0][1] if losses else None,
        "final_loss": lines[-1].get("loss") if lines else None,
        "min_loss": min((l for _, l in losses), default=None),
    }
    # Largest relative increase of the loss between consecutive logged steps: GD below
    # the stability bound decreases the loss monotonically; spikes mark instabilities.
    incs = [(s, (b - a) / abs(a)) for (s, a), (_, b) in zip(losses, losses[1:]) if a != 0]
    out["max_rel_loss_increase"] = max((x for _, x in incs), default=0.0)
    out["num_loss_increases_1pct"] = sum(1 for _, x in incs if x > 0.01)
    # The same after the first 10% of the steps, to tell an initial transient (e.g. a blow-up
    # in the first steps that then settles) from persistent oscillations.
    last = lines[-1]["step"] if lines else 0
    late = [x for s, x in incs if s >= last // 10]
    out["max_rel_loss_increase_late"] = max(late, default=0.0)
    out["num_loss_increases_1pct_late"] = sum(1 for x in late if x > 0.01)
    if sharp:
        out["final_sharpness"] = sharp[-1][1]
        out["final_normalized_sharpness"] = sharp[-1][2]
        finite_ns = [ns for _, _, ns in sharp if ns is not None]
        out["max_normalized_sharpness"] = max(finite_ns, default=None)
        out["first_step_above_threshold"] = next((s for s, _, ns in sharp if ns is not None and ns > threshold), None)
    return out


def _pad_lanes(ls: list[Lane], num_devices: int) -> list[Lane]:
    """A group's lanes, padded (repeating the last) to a multiple of ``num_devices`` when sharded."""
    if num_devices > 1 and len(ls) % num_devices:
        ls = ls + [ls[-1]] * (num_devices - len(ls) % num_devices)  # padding lanes, dropped later
    return ls


def check_resume(
    problem: Problem,
    lanes: Sequence[Lane],
    config: EngineConfig,
    run_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    devices: Sequence[Any] | None = None,
) -> None:
    """Checks that ``run_dir``'s checkpoints hold the states this run would resume; writes nothing.

    Each lane group's checkpoints must hold a state of the same arrays (number, shapes,
    dtypes) as the group would train now: the lane grouping (``max_lanes``, and the padding
    to a multiple of the device count) and the model must be those of the run that wrote
    them. Checkpoints whose record cannot be read are left to the corruption fallback of
    :meth:`eos_jax.checkpoint.CheckpointStore.restore_latest`.

    Args:
      problem, lanes, config, dtype, devices: as for :func:`train`.
      run_dir: the run directory to resume.

    Raises:
      CheckpointMismatchError: one line naming the group and what differs (nothing is moved).
    """
    devices = list(devices) if devices is not None else jax.devices()
    groups = group_lanes(len(lanes), config.max_lanes, len(devices))
    dtype = hparam_dtype(problem, dtype)
    vinit = jax.vmap(lambda hp: init_state(problem, hp))
    root = Path(run_dir) / "checkpoints"
    how = ("resume with the same max_lanes and number of devices as the run that wrote it, "
           "or start a new run directory")
    for g, idx in enumerate(groups):
        d = root / f"group_{g:03d}"
        if not d.is_dir():
            continue
        glanes = _pad_lanes([lanes[i] for i in idx], len(devices))
        template = jax.eval_shape(vinit, stack_hparams(glanes, dtype))
        store = CheckpointStore(d, max_to_keep=config.checkpoint_keep)
        try:
            store.check_all(template)
        except CheckpointMismatchError as e:
            saved = e.saved or []
            n_saved = saved[0][0][0] if saved and saved[0][0] else None
            n_wanted = len(glanes)
            ndev = f"{len(devices)} device{'s' if len(devices) > 1 else ''}"
            padding = f", padded to a multiple of {ndev}" if n_wanted != len(idx) else ""
            if n_saved is not None and n_saved != n_wanted:
                msg = (f"checkpoints/group_{g:03d} of {run_dir} holds {n_saved} lanes, this run would put "
                       f"{n_wanted} there (lanes {idx[0]}..{idx[-1]} of {len(lanes)}{padding}; "
                       f"max_lanes={config.max_lanes}, {ndev}): {how}")
            else:
                msg = (f"checkpoints/group_{g:03d} of {run_dir} holds another model's state ({e.difference}): "
                       "resume with the model that wrote it, or start a new run directory")
            raise CheckpointMismatchError(msg) from None
        finally:
            store.close()
    extra = sorted(p.name for p in root.glob("group_*") if p.is_dir() and p.name[6:].isdigit()
                   and int(p.name[6:]) >= len(groups) and any(c.name.isdigit() for c in p.iterdir()))
    if extra:
        raise CheckpointMismatchError(
            f"checkpoints/{extra[0]} of {run_dir} belongs to a lane group this run does not have ({len(groups)} "
            f"group{'s' if len(groups) > 1 else ''} of at most {config.max_lanes} lanes on {len(devices)} "
            f"device{'s' if len(devices) > 1 else ''}): {how}")


def train(
    problem: Problem,
    lanes: Sequence[Lane],
    config: EngineConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    quiet: bool = False,
    dtype: Any = None,
    devices: Sequence[Any] | None = None,
    progress_stream: Any = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Runs every lane to ``config.steps``; writes metrics.jsonl, checkpoints/, results.json.

    Args:
      problem: what to train.
      lanes: the hyperparameter points (:func:`make_lanes`).
      config: the schedule.
      run_dir: an opened run directory (see :func:`eos_jax.io.open_run_dir`).
      resume: continue from the newest valid checkpoint of each group; metrics lines
        past it are dropped so the file ends identical to an uninterrupted run's.
      quiet: no progress bar.
      dtype: None (default): learning rate and weight decay take the parameters' dtype
        (:func:`hparam_dtype`); a dtype given must be that one (ConfigError otherwise).
      devices: devices to spread the lane axis over (default: all).
      progress_stream: where the progress bar goes (default stderr).
      on_chunk: called with the step reached after each chunk (e.g. to report elsewhere).

    Returns:
      The results dict also written to ``results.json``: per lane its hyperparameters,
      ``finite``/``first_nonfinite_step``, loss and sharpness statistics and the SHA-256
      of its final parameters; a summary over lanes; timings.

    Raises:
      ConfigError: bad config.
      TrainingInterrupted: SIGINT/SIGTERM (after saving a checkpoint).
    """
    config.validate()
    if not lanes:
        raise ConfigError("no lanes to train")
    dtype = hparam_dtype(problem, dtype)
    run_dir = Path(run_dir)
    devices = list(devices) if devices is not None else jax.devices()
    groups = group_lanes(len(lanes), config.max_lanes, len(devices))
    metrics_path = run_dir / "metrics.jsonl"
    eig_fn = problem.eig_fn or make_eig_fn(config.sharpness_iters, config.sharpness_method, config.sharpness_tol)
    n_examples = int(jax.tree_util.tree_leaves(problem.data)[0].shape[0])
    if config.batch_size is not None and config.batch_size > n_examples:
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {n_examples} training examples")

    mesh = None
    if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("lanes",))
        lane_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("lanes"))
        data = jax.device_put(problem.data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    else:
        data = jax.device_put(problem.data, devices[0])
    if config.sharpness_examples is not None:
        m = min(config.sharpness_examples, n_examples)
        sharp_data = jax.tree_util.tree_map(lambda a: a[:m], data)
    else:
        sharp_data = data

    def padded(idx: list[int]) -> list[Lane]:
        return _pad_lanes([lanes[i] for i in idx], len(devices))

    init_fn = jax.jit(jax.vmap(lambda hp: init_state(problem, hp)))

    def place(tree: PyTree) -> PyTree:
        if mesh is None:
            return jax.device_put(tree, devices[0])
        return jax.device_put(tree, lane_sharding)

    def template(group_lanes_: list[Lane]) -> PyTree:
        hp = stack_hparams(group_lanes_, dtype)
        shapes = jax.eval_shape(init_fn, hp)
        if mesh is None:
            return shapes
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=lane_sharding), shapes)

    if resume:
        # Another lane grouping, device count or model is an error (nothing moved), never a restart.
        check_resume(problem, lanes, config, run_dir, dtype=dtype, devices=devices)
    stores = [
        CheckpointStore(run_dir / "checkpoints" / f"group_{g:03d}", max_to_keep=config.checkpoint_keep)
        for g in range(len(groups))
    ]
    start_steps = [0] * len(groups)
    if resume:
        for g, idx in enumerate(groups):
            got = stores[g].restore_latest(template(padded(idx)))
            start_steps[g] = got[0] if got is not None else 0
        kept = [
            r
            for r in _read_metrics(metrics_path)
            if 0 <= r.get("group", -1) < len(groups) and r.get("step", math.inf) < start_steps[r["group"]]
        ]
        eio.atomic_write_text(metrics_path, "".join(_json_line(r) for r in kept))
    else:
        eio.atomic_write_text(metrics_path, "")

    late_from = config.steps // 10  # spikes after the first 10 % of the steps are "late"
    chunk_fn = make_chunk_fn(problem, config.batch_size, config.chunk_steps, late_from)
    final_fn = make_final_fn(problem, config.batch_size, late_from)
    twins = find_twins(lanes, groups)
    sharp_fn = make_sharpness_fn(problem, eig_fn)
    total = config.steps
    bar = ProgressBar(total * len(groups), enabled=not quiet, stream=progress_stream, label=f"{problem.name} " if problem.name else "")
    timing = {"train_s": 0.0, "sharpness_s": 0.0, "checkpoint_s": 0.0, "compile_and_first_chunk_s": None}
    final_states: list[tuple[list[int], TrainState, dict[str, np.ndarray]]] = []

    with _SignalCatcher() as sig:
        for g, idx in enumerate(groups):
            glanes = padded(idx)
            n_real = len(idx)
            hp = place(stack_hparams(glanes, dtype))
            # Twin of each lane as an index into this group (itself when it has none here).
            twin_local = [idx.index(twins[i]["lane"]) if twins[i]["in_group"] else li for li, i in enumerate(idx)]
            twin_local += list(range(len(idx), len(glanes)))  # padding lanes
            twin_arr = place(jnp.asarray(np.array(twin_local, np.int32)))
            has_twin = np.array([twins[i]["in_group"] for i in idx], bool)
            store = stores[g]
            s = start_steps[g]
            if s > 0:
                state = place(store.restore(s, template(glanes)))
            else:
                state = init_fn(hp)
            last_sharp: float | None = None
            pending_sharp: np.ndarray | None = None
            while True:
                # 1. checkpoint the state at boundary s (before its sharpness step).
                if s != start_steps[g] and (s == total or (config.checkpoint_every and s % config.checkpoint_every == 0)):
                    t0 = time.perf_counter()
                    store.save(s, state)
                    timing["checkpoint_s"] += time.perf_counter() - t0
                # 2. sharpness at s.
                if config.sharpness_every and (s % config.sharpness_every == 0 or s == total):
                    t0 = time.perf_counter()
                    state, lam = sharp_fn(state, hp, sharp_data)
                    pending_sharp = np.asarray(jax.device_get(lam))
                    timing["sharpness_s"] += time.perf_counter() - t0
                    last_sharp = float(pending_sharp[0])
                if s == total:
                    fl, ff, frel, fma, fstats = jax.device_get(final_fn(state, hp, data, twin_arr))
                    _write_lines(metrics_path, g, idx, glanes, s, np.asarray(fl)[:, None], np.asarray(ff)[:, None],
                                 pending_sharp, problem.threshold, config.log_every, total, force=True,
                                 rel=(np.asarray(frel)[:, None], np.asarray(fma)[:, None], has_twin))
                    break
                # 3. one chunk.
                nxt = _next_boundary(s, total, (config.chunk_steps, config.checkpoint_every, config.sharpness_every))
                t0 = time.perf_counter()
                state, met = chunk_fn(state, hp, data, jnp.asarray(nxt - s, jnp.int32), twin_arr)
                met = jax.tree_util.tree_map(lambda a: np.asarray(a)[:, : nxt - s], jax.device_get(met))
                dt = time.perf_counter() - t0
                if timing["compile_and_first_chunk_s"] is None:
                    timing["compile_and_first_chunk_s"] = dt
                else:
                    timing["train_s"] += dt
                losses = np.asarray(met["loss"])
                _write_lines(metrics_path, g, idx, glanes, s, losses, np.asarray(met["finite"]), pending_sharp,
                             problem.threshold, config.log_every, total,
                             rel=(np.asarray(met["rel_l1"]), np.asarray(met["rel_l1_ma"]), has_twin))
                pending_sharp = None
                s = nxt
                bar.update(g * total + s, float(losses[0, -1]), last_sharp, extra=f"lanes {n_real}" if n_real > 1 else "")
                if on_chunk is not None:
                    on_chunk(s)
                if sig.signum is not None:
                    store.save(s, state)
                    for st in stores:
                        st.close()  # waits for the save to commit
                    bar.close()
                    raise TrainingInterrupted(sig.signum, s, run_dir)
            store.wait()
            final_states.append((idx, state, {k: np.asarray(v) for k, v in fstats.items()}))
    bar.close()
    for st in stores:
        st.close()
    timing["num_devices"] = len(devices)
    return _write_results(run_dir, problem, lanes, groups, final_states, metrics_path, timing, twins)


def find_twins(lanes: Sequence[Lane], groups: list[list[int]]) -> list[dict[str, Any]]:
    """For each lane, its k=1 twin (same lr, seed, weight decay) and whether it runs in the same group.

    Returns:
      Per lane ``{"lane": twin index or None, "in_group": bool, "missing": reason or None}``;
      ``missing`` is None for k=1 lanes and for k != 1 lanes whose twin is in their group.
      A twin in another group is not compared: the series is gathered inside one program,
      and a group of another width is another program whose rounding may differ (the
      difference would be the program's, not the perturbation's).
    """
    group_of = {i: g for g, idx in enumerate(groups) for i in idx}
    width = {g: len(idx) for g, idx in enumerate(groups)}
    k1 = {(l.learning_rate, l.seed, l.weight_decay): i for i, l in enumerate(lanes) if l.k == 1}
    out = []
    for i, l in enumerate(lanes):
        if l.k == 1:
            out.append({"lane": i, "in_group": False, "missing": None})
            continue
        t = k1.get((l.learning_rate, l.seed, l.weight_decay))
        if t is None:
            out.append({"lane": None, "in_group": False,
                        "missing": "no k=1 lane with the same learning rate, seed and weight decay in this sweep"})
        elif group_of[t] != group_of[i]:
            gt, gi = group_of[t], group_of[i]
            why = (f"its k=1 twin (lane {t}) ran in lane group {gt}, not in this lane's group {gi}: the series is "
                   "gathered inside one vmapped program")
            if width[gt] != width[gi]:
                why += (f", and the groups are programs of different widths ({width[gt]} vs {width[gi]} lanes), "
                        "whose roundings may differ: a difference would be the program's, not the perturbation's")
            out.append({"lane": t, "in_group": False, "missing": why + " (raise --max-lanes to put them in one group)"})
        else:
            out.append({"lane": t, "in_group": True, "missing": None})
    return out


def _write_lines(
    path: Path,
    group: int,
    idx: list[int],
    glanes: list[Lane],
    start: int,
    losses: np.ndarray,
    finite: np.ndarray,
    sharp: np.ndarray | None,
    threshold: float,
    log_every: int,
    total: int,
    force: bool = False,
    rel: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """Appends the lines of steps ``start .. start+n-1`` (logged ones) for the real lanes, then fsyncs.

    ``rel`` is ``(rel_l1, moving average, has_twin)``: lanes with a k=1 twin in their group
    get ``rel_l1_to_k1`` and ``rel_l1_to_k1_ma100`` on every line.
    """
    out = []
    for j in range(losses.shape[1]):
        step = start + j
        has_sharp = sharp is not None and j == 0
        if not (force or has_sharp or step % log_every == 0):
            continue
        for li, lane_index in enumerate(idx):
            lane = glanes[li]
            rec: dict[str, Any] = {
                "group": group,
                "lane": lane_index,
                "step": step,
                "loss": float(losses[li, j]),
                "finite": bool(finite[li, j]),
                "learning_rate": lane.learning_rate,
                "k": lane.k,
                "seed": lane.seed,
                "weight_decay": lane.weight_decay,
            }
            if rel is not None and rel[2][li]:
                rec["rel_l1_to_k1"] = float(rel[0][li, j])
                rec[f"rel_l1_to_k1_ma{REL_L1_WINDOW}"] = float(rel[1][li, j])
            if has_sharp:
                lam = float(sharp[li])
                ns = float(np.float64(lane.learning_rate) * lam)
                rec.update(sharpness=lam, normalized_sharpness=ns, threshold_ratio=ns / threshold)
            out.append(_json_line(rec))
    if not out:
        return
    with open(path, "a") as f:
        f.write("".join(out))
        f.flush()
        os.fsync(f.fileno())


def _compare_to_k1(lane_results: list[dict[str, Any]], final_params: dict[int, Any],
                   twins: Sequence[dict[str, Any]]) -> None:
    """Adds, to each lane with k != 1, how its final parameters differ from its k=1 twin.

    The twin is the lane of the same sweep with equal learning rate, seed and weight
    decay and k=1 (Section 4: perturbed vs plain SGD). Only a twin in the same vmapped
    program (lane group) is compared, so that a difference is the perturbation's, not
    the program's. Adds ``rel_l1_to_k1`` (the paper's RelL1), ``n_diff_to_k1`` and
    ``max_ulp_to_k1``; otherwise ``rel_l1_to_k1_missing`` says why there is none.
    """
    for r in lane_results:
        if r["k"] == 1:
            continue
        t = twins[r["lane"]]
        if not t["in_group"]:
            r["rel_l1_to_k1_missing"] = t["missing"]
            continue
        a, b = final_params[r["lane"]], final_params[t["lane"]]
        d = ulp_diff(a, b)
        r["rel_l1_to_k1"] = float(rel_l1(a, b))
        r["n_diff_to_k1"] = d.n_diff
        r["max_ulp_to_k1"] = d.max_ulp


def _write_results(
    run_dir: Path,
    problem: Problem,
    lanes: Sequence[Lane],
    groups: list[list[int]],
    final_states: list[tuple[list[int], TrainState, dict[str, np.ndarray]]],
    metrics_path: Path,
    timing: dict[str, Any],
    twins: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Builds and atomically writes results.json from the final states and metrics.jsonl."""
    lines = _read_metrics(metrics_path)
    by_lane: dict[int, list[dict[str, Any]]] = {}
    for r in lines:
        by_lane.setdefault(r["lane"], []).append(r)
    lane_results = []
    final_params: dict[int, Any] = {}
    for idx, state, stats in final_states:
        host = jax.device_get(state)
        for li, lane_index in enumerate(idx):
            one = _index_lane(host, li)
            rec = {"lane": lane_index, **lanes[lane_index].asdict()}
            rec["finite"] = bool(one.finite)
            rec["first_nonfinite_step"] = int(one.nonfinite_step) if not bool(one.finite) else None
            rec["steps"] = int(one.step)
            rec.update(_lane_summary(sorted(by_lane.get(lane_index, []), key=lambda r: r["step"]), problem.threshold))
            # Spikes and the stability verdict from EVERY step's loss (running statistics kept
            # inside the scan), not from the logged lines only.
            rec.update(summarize_loss_stats({k: v[li] for k, v in stats.items()}))
            rec["loss_stats_from"] = "every step"
            rec["params_digest"] = tree_digest(one.params)
            final_params[lane_index] = one.params
            lane_results.append(rec)
    lane_results.sort(key=lambda r: r["lane"])
    _compare_to_k1(lane_results, final_params, twins)
    finite_lanes = [r for r in lane_results if r["finite"]]
    fl = [r["final_loss"] for r in finite_lanes if r["final_loss"] is not None]
    summary = {
        "num_lanes": len(lane_results),
        "num_groups": len(groups),
        "num_finite": len(finite_lanes),
        "diverged": [{"lane": r["lane"], "learning_rate": r["learning_rate"], "first_nonfinite_step": r["first_nonfinite_step"]} for r in lane_results if not r["finite"]],
        "final_loss_min": min(fl, default=None),
        "final_loss_max": max(fl, default=None),
        "threshold": problem.threshold,
    }
    results = {"lanes": lane_results, "summary": summary, "timing": timing}
    eio.atomic_write_json(run_dir / "results.json", results)
    return results
