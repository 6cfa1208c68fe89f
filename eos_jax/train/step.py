"""The pure pieces a run compiles: the step of one lane, the scanned chunk, the final line, the sharpness.

``train_step(state, hparams, data) -> (state, metrics)`` is pure; the optimizer is built
*inside* the (lane-vmapped) step from the lane's traced hyperparameters, so one
compilation serves every learning rate. :func:`make_chunk_fn` runs up to
``chunk_steps`` steps of every lane of a group in one :func:`jax.lax.scan`;
:func:`make_sharpness_fn` tracks the largest algebraic Hessian eigenvalue, warm-started
from the eigenvector kept in the state. Divergence is a result: a lane whose loss,
parameters or optimizer state become non-finite records the step and keeps its last
finite state from then on, so the other lanes stay finite (Section 6's sweeps cross the
stability boundary on purpose).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from eos_jax import hessian, optim
from eos_jax.data.transforms import epoch_permutation
from eos_jax.errors import ConfigError
from eos_jax.train.config import Batch, EigFn, LossFn, Problem, PyTree
from eos_jax.train.state import (
    HParams,
    TrainState,
    all_finite,
    augment_key,
    batch_order_key,
    check_hparams,
    curvature_key,
    sharpness_key,
)
from eos_jax.train.stats import push_rel, rel_l1_layers_to_twin, rel_l1_to_twin, update_loss_stats


def select_batch(data: Batch, key_data: jax.Array, step: jax.Array, batch_size: int | None) -> Batch:
    """The batch of ``step``: all of ``data``, or a minibatch of a per-epoch permutation.

    Epoch ``e`` uses the permutation from ``fold_in(batch_order_key(key), e)`` (the key
    tree of the module docstring); step ``t`` takes slice ``t % steps_per_epoch`` of it.
    Pure in (key, step), hence exactly resumable.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> data = {"x": jnp.arange(6.0)}
      >>> key = jax.random.key_data(jax.random.key(0))
      >>> select_batch(data, key, jnp.int32(0), None)["x"].shape  # full batch
      (6,)
      >>> epoch = [select_batch(data, key, jnp.int32(t), 2)["x"] for t in range(3)]
      >>> sorted(jnp.concatenate(epoch).tolist())  # one epoch of minibatches of 2: every example once
      [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
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


def problem_loss(problem: Problem, params: PyTree, batch: Batch, model_state: PyTree) -> tuple[jax.Array, PyTree]:
    """``(loss, new model_state)`` of ``problem`` in train mode (``model_state`` passes through without one).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2)}, lambda p, b: jnp.sum(p["w"] * b),
      ...                      lambda hp: optim.sgd(hp.learning_rate), jnp.ones(2))
      >>> loss, model_state = problem_loss(problem, {"w": jnp.ones(2)}, jnp.ones(2), {})
      >>> float(loss), model_state
      (2.0, {})
    """
    if problem.init_model_state is None:
        return problem.loss_fn(params, batch), model_state
    return problem.loss_fn(params, batch, model_state)


def step_batch(problem: Problem, data: Batch, state: TrainState, batch_size: int | None) -> Batch:
    """The batch lane ``state`` trains on at ``state.step``: its minibatch, augmented when the problem augments.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> flip = lambda b, key: -b  # an "augmentation" that ignores its key
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2)}, lambda p, b: jnp.sum(p["w"] * b),
      ...                      lambda hp: optim.sgd(hp.learning_rate), jnp.ones(2), augment=flip)
      >>> hp = tr.HParams(jnp.float32(0.1), jnp.int32(1), jnp.float32(0.0), jnp.int32(0))
      >>> state = jax.jit(lambda h: tr.init_state(problem, h))(hp)
      >>> step_batch(problem, problem.data, state, None).tolist()
      [-1.0, -1.0]
    """
    batch = select_batch(data, state.key, state.step, batch_size)
    if problem.augment is not None:
        batch = problem.augment(batch, augment_key(state.key, state.step))
    return batch


def make_train_step(
    problem: Problem,
    batch_size: int | None = None,
    loss_goal: float | None = None,
    acc_goal: float | None = None,
) -> Callable[[TrainState, HParams, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step of one lane: ``(state, hparams, data) -> (state, metrics)``.

    The optimizer is built from ``hparams`` inside the step (traced lr, k, weight
    decay). ``metrics["loss"]`` is the loss at the parameters *before* the update (the
    loss of step ``state.step``). A step whose loss, new parameters or new optimizer
    state are not all finite leaves the state unchanged apart from ``step``, and sets
    ``finite=False`` and ``nonfinite_step`` (first time only). With
    ``problem.step_metrics``, ``metrics["aux"]`` holds its values at the parameters
    before the update, on the same batch.

    Stopping rule (Cohen et al.'s ``src/gd.py``, locuslab/edge-of-stability): a lane whose
    loss at the parameters before the update is below ``loss_goal``, or whose accuracy
    (``problem.accuracy_fn``) is above ``acc_goal``, takes no update: ``stop_step`` records
    the step and the state stays frozen from then on (its loss keeps being reported).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> hp = jax.tree_util.tree_map(lambda a: a[0], tr.stack_hparams(tr.make_lanes([0.25]), jnp.float32))
      >>> state = jax.jit(lambda h: tr.init_state(problem, h))(hp)
      >>> state, met = jax.jit(make_train_step(problem))(state, hp, problem.data)
      >>> float(met["loss"]), bool(met["finite"]), state.params["w"].tolist()  # w <- (1 - 0.25 h) w
      (2.5, True, [0.75, 0.0])
    """

    def step(state: TrainState, hp: HParams, data: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        check_hparams(hp, state.params)
        batch = step_batch(problem, data, state, batch_size)
        opt = problem.make_optimizer(hp)
        (loss, model_state), grads = jax.value_and_grad(
            lambda p: problem_loss(problem, p, batch, state.model_state), has_aux=True
        )(state.params)
        params, opt_state = optim.apply_step(opt, grads, state.opt_state, state.params, batch=batch)
        ok = state.finite & jnp.isfinite(loss) & all_finite(params) & all_finite(opt_state) & all_finite(model_state)
        update = ok
        stop_step = state.stop_step
        if loss_goal is not None or acc_goal is not None:
            reached = jnp.zeros((), jnp.bool_)
            if loss_goal is not None:
                reached = reached | (loss < jnp.asarray(loss_goal, loss.dtype))
            if acc_goal is not None:
                if problem.accuracy_fn is None:
                    raise ConfigError("acc_goal needs Problem.accuracy_fn")
                acc = problem.accuracy_fn(state.params, batch)
                reached = reached | (acc > jnp.asarray(acc_goal, acc.dtype))
            stop_now = (state.stop_step < 0) & reached & state.finite
            update = ok & (state.stop_step < 0) & ~stop_now
            stop_step = jnp.where(stop_now, state.step, state.stop_step)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(update, a, b), new, old)  # noqa: E731
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
            stop_step=stop_step,
            model_state=keep(model_state, state.model_state),
        )
        met = {"loss": loss, "finite": ok}
        if problem.step_metrics is not None:
            met["aux"] = problem.step_metrics(state.params, batch)
        return new_state, met

    return step


def lane_map(
    fn: Callable[..., Any], lane_batch: int | None = None, in_axes: tuple[int | None, ...] = (0, 0, None)
) -> Callable[..., Any]:
    """``fn`` of one lane applied to every lane (leading axis of the arguments with ``in_axes`` 0).

    ``lane_batch=None``: ``jax.vmap`` over all lanes at once (one vectorized program: every
    array of the step exists for every lane at the same time). An int: ``lax.map`` over
    groups of ``lane_batch`` lanes, each group vmapped, one group after another inside the
    same program: memory for ``lane_batch`` lanes' temporaries instead of all of them, and a
    ``while`` loop inside ``fn`` (a warm-started eigensolver) stops at each group's own
    convergence. The lanes' results are the same functions of their inputs either way, but
    not the same bits (vectorized and looped programs round their reductions differently):
    runs compare like with like.

    How the speed compares with all lanes at once and with separate runs is measured by
    ``benchmarks/bench_main.py`` and ``bench_sweep.py`` (``docs/performance.md``): with many lanes
    all at once, their temporaries can outgrow the memory a CPU process keeps between calls. A
    ``lane_batch`` larger than the number of lanes vectorizes them all (as one remainder batch).
    The engine's default, ``EngineConfig.lane_batch="auto"``, picks it from the programs'
    temporaries (:func:`eos_jax.train.sizing.choose_lane_batch`).

    Examples:
      >>> import jax.numpy as jnp
      >>> f = lambda w, hp, data: w * hp + data  # one lane
      >>> w, hp = jnp.arange(4.0), jnp.full(4, 2.0)
      >>> lane_map(f)(w, hp, 1.0).tolist(), lane_map(f, lane_batch=3)(w, hp, 1.0).tolist()
      ([1.0, 3.0, 5.0, 7.0], [1.0, 3.0, 5.0, 7.0])
    """
    if lane_batch is None:
        return jax.vmap(fn, in_axes=in_axes)

    def mapped(*args: Any) -> Any:
        lane_args = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

        def one(xs: tuple[Any, ...]) -> Any:
            it = iter(xs)
            return fn(*(next(it) if ax == 0 else a for a, ax in zip(args, in_axes)))

        return jax.lax.map(one, lane_args, batch_size=lane_batch)

    return mapped


def _lane_loss_stats(late_from: int) -> Callable[..., dict[str, jax.Array]]:
    """Lane-vmapped :func:`~eos_jax.train.stats.update_loss_stats`: one step's losses into the statistics."""
    return jax.vmap(lambda st, step, loss, ok: update_loss_stats(st, step, loss, ok, late_from))


@functools.cache
def _loss_stats_update(late_from: int) -> Callable[..., dict[str, jax.Array]]:
    """Jitted :func:`_lane_loss_stats`.

    It does not depend on the problem, so every run with the same ``late_from`` shares one jitted
    function (one compilation per shape in the process, not one per run).
    """
    return jax.jit(_lane_loss_stats(late_from))


@functools.cache
def _loss_stats_fold(chunk_steps: int, late_from: int) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``(stats, step0, losses, finite, n) -> stats``: a chunk's per-step losses folded in order.

    Steps ``>= n`` are the scan's padding. Problem-independent and shared as
    :func:`_loss_stats_update`.
    """
    vstats = _lane_loss_stats(late_from)

    def fold(stats: dict[str, jax.Array], step0: jax.Array, losses: jax.Array, finite: jax.Array, n: jax.Array):
        def body(st, x):
            i, loss, ok = x
            return jax.lax.cond(i < n, lambda st_: vstats(st_, step0 + i, loss, ok), lambda st_: st_, st), None

        xs = (jnp.arange(chunk_steps, dtype=jnp.int32), jnp.swapaxes(losses, 0, 1), jnp.swapaxes(finite, 0, 1))
        return jax.lax.scan(body, stats, xs)[0]

    return jax.jit(fold)


def make_chunk_fn(
    problem: Problem,
    batch_size: int | None = None,
    chunk_steps: int = 50,
    late_from: int = 0,
    lane_batch: int | None = None,
    loss_goal: float | None = None,
    acc_goal: float | None = None,
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
    ``rel_l1`` and ``rel_l1_ma`` have shape ``(lanes, chunk_steps)``, and each value of
    ``aux`` (``problem.step_metrics``) ``(lanes, chunk_steps, ...)``; entries ``>= n``
    are padding. ``lane_batch``: the step runs on that many lanes at a time (:func:`lane_map`);
    ``None`` vectorizes all lanes. ``loss_goal`` / ``acc_goal``: the stopping rule of
    :func:`make_train_step`.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})
      >>> hp = tr.stack_hparams(tr.make_lanes([0.25, 0.5]), jnp.float32)
      >>> states = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(hp)
      >>> chunk = make_chunk_fn(problem, chunk_steps=4)
      >>> states, met = chunk(states, hp, problem.data, jnp.int32(3))  # 3 of at most 4 steps
      >>> met["loss"][:, :3].tolist(), states.step.tolist()
      ([[2.5, 0.28125, 0.158203125], [2.5, 2.125, 2.03125]], [3, 3])
    """
    vstep = lane_map(make_train_step(problem, batch_size, loss_goal, acc_goal), lane_batch)
    vpush = jax.vmap(push_rel)

    def chunk(states: TrainState, hp: HParams, data: Batch, n: jax.Array, twin: jax.Array):
        def run(s: TrainState):
            rel = rel_l1_to_twin(s.params, twin)
            buf, count, ma = vpush(s.rel_buf, s.rel_count, rel)
            new, met = vstep(s, hp, data)
            new = new._replace(rel_buf=buf, rel_count=count)
            if problem.rel_l1_level is not None:
                layers = rel_l1_layers_to_twin(s.params, twin, problem.rel_l1_level)
                met = {**met, "aux": {**met.get("aux", {}), "rel_l1_layers": layers}}
            return new, {**met, "rel_l1": rel.astype(buf.dtype), "rel_l1_ma": ma}

        def skip(s: TrainState):
            shapes = jax.eval_shape(run, s)[1]
            return s, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        def body(s: TrainState, i: jax.Array):
            return jax.lax.cond(i < n, run, skip, s)

        states, met = jax.lax.scan(body, states, jnp.arange(chunk_steps, dtype=jnp.int32))
        return states, jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), met)

    jitted = jax.jit(chunk)
    jfold = _loss_stats_fold(chunk_steps, late_from)

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

    call.lower = jitted.lower  # type: ignore[attr-defined]  # the scan's program, for its memory analysis
    return call


def make_final_fn(problem: Problem, batch_size: int | None, late_from: int = 0):
    """``(states, hparams, data, twin) -> (loss, finite, rel_l1, rel_l1_ma, loss_stats, aux)`` at the last step.

    The loss and RelL1 of the final parameters (the line of step ``steps``), with the
    final loss folded into the statistics, without changing the state (so a run resumed
    from its last checkpoint recomputes the same values). The statistics are updated in
    a second program from the materialized loss: inside one program XLA may compute the
    loss twice (in two fusions) and round the copies differently, so that the logged loss
    and the one in the statistics would differ by an ulp. ``aux`` holds the values of
    ``problem.step_metrics`` at the final parameters (``{}`` without it).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})
      >>> hp = tr.stack_hparams(tr.make_lanes([0.25, 0.5]), jnp.float32)
      >>> states = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(hp)
      >>> final = make_final_fn(problem, batch_size=None)
      >>> loss, finite, rel, rel_ma, stats, aux = final(states, hp, problem.data, jnp.arange(2, dtype=jnp.int32))
      >>> loss.tolist(), finite.tolist(), rel.tolist()  # each lane its own twin: RelL1 0
      ([2.5, 2.5], [True, True], [0.0, 0.0])
    """
    vpush = jax.vmap(push_rel)
    vstats = _loss_stats_update(late_from)

    def one_loss(state: TrainState, data: Batch):
        batch = step_batch(problem, data, state, batch_size)
        aux = problem.step_metrics(state.params, batch) if problem.step_metrics is not None else {}
        return problem_loss(problem, state.params, batch, state.model_state)[0], aux

    def final(states: TrainState, hp: HParams, data: Batch, twin: jax.Array):
        del hp
        loss, aux = jax.vmap(one_loss, in_axes=(0, None))(states, data)
        finite = states.finite & jnp.isfinite(loss)
        rel = rel_l1_to_twin(states.params, twin)
        if problem.rel_l1_level is not None:
            aux = {**aux, "rel_l1_layers": rel_l1_layers_to_twin(states.params, twin, problem.rel_l1_level)}
        _, _, ma = vpush(states.rel_buf, states.rel_count, rel)
        return loss, finite, rel.astype(ma.dtype), ma, aux

    jitted = jax.jit(final)

    def call(states: TrainState, hp: HParams, data: Batch, twin: jax.Array):
        loss, finite, rel, ma, aux = jitted(states, hp, data, twin)
        return loss, finite, rel, ma, vstats(states.loss_stats, states.step, loss, finite), aux

    return call


def make_eig_fn(
    num_iters: int = 20,
    method: str = "lanczos",
    tol: float | None = None,
    linearize: bool = False,
    stop: str = "residual",
) -> EigFn:
    """Top Hessian eigenpair with :func:`eos_jax.hessian.top_eigenvalue`.

    Args:
      num_iters: Hessian-vector products per call (the maximum when ``tol`` is set).
      method: ``"lanczos"`` (full reorthogonalization) or ``"power"`` (shifted by the
        Hessian module so that it finds the largest algebraic eigenvalue).
      tol: None for exactly ``num_iters`` products, or the relative tolerance at which to
        stop (a ``lax.while_loop``: still vmappable, no host-side test).
      stop: what ``tol`` bounds: ``"residual"`` (``||Hv - lambda v|| <= tol |lambda|``) or
        ``"eigenvalue"`` (Lanczos: the estimated error of the eigenvalue,
        :func:`eos_jax.eigen.ritz_errors`); see :func:`eos_jax.hessian.top_eigenvalue`.
      linearize: products through one ``jax.linearize`` (True) or a fresh ``jvp(grad)`` each
        (False, default). Measured on the main job (2,000 images, shared 2-core VM,
        benchmarks/bench_main.py): a linearized product cost 3.4 gradients, ``jvp(grad)``
        1.3: the linearization keeps full-batch residuals whose reads and fresh temporaries
        cost more than recomputing the forward pass.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> eig = make_eig_fn(num_iters=2)  # Lanczos: 2 products span the 2-dimensional space
      >>> val, vec = jax.jit(lambda p, v, key: eig(loss, p, problem.data, v, key))({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, jax.random.key(0))
      >>> round(float(val), 4), [round(abs(float(x)), 4) for x in vec["w"]]
      (4.0, [0.0, 1.0])
    """

    def eig(objective: LossFn, params: PyTree, batch: Batch, v0: PyTree, key: jax.Array):
        res = hessian.top_eigenvalue(
            objective,
            params,
            batch,
            method=method,
            num_iters=num_iters,
            tol=tol,
            v0=v0,
            key=key,
            linearize=linearize,
            stop=stop,
        )
        return res.eigenvalue, res.eigenvector

    return eig


def objective_fn(problem: Problem, hp: HParams, model_state: PyTree = None) -> LossFn:
    """The function gradient descent descends for lane ``hp``: the loss, plus ``wd/2 |p|^2`` when coupled.

    ``model_state``: the lane's (for a problem with ``init_model_state``: the train-mode loss
    at these running statistics, which the objective does not update).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> hp = tr.HParams(jnp.float32(0.1), jnp.int32(1), jnp.float32(0.5), jnp.int32(0))
      >>> float(objective_fn(problem, hp)({"w": jnp.ones(2)}, problem.data))  # 2.5 + (0.5 / 2) * 2
      3.0
    """
    if problem.init_model_state is not None and model_state is None:
        raise ConfigError("objective_fn: this problem has a model state; pass the lane's model_state")

    def data_loss(params: PyTree, batch: Batch) -> jax.Array:
        return problem_loss(problem, params, batch, model_state)[0]

    if not problem.l2_weight_decay:
        return problem.loss_fn if problem.init_model_state is None else data_loss

    def objective(params: PyTree, batch: Batch) -> jax.Array:
        loss = data_loss(params, batch)
        sq = sum(jnp.sum(jnp.square(p)).astype(loss.dtype) for p in jax.tree_util.tree_leaves(params))
        return loss + (hp.weight_decay.astype(loss.dtype) * jnp.asarray(0.5, loss.dtype)) * sq

    return objective


def make_sharpness_fn(
    problem: Problem, eig_fn: EigFn, lane_batch: int | None = None, twin_start: bool = False
) -> Callable[..., tuple[TrainState, jax.Array]]:
    """Jitted, lane-vmapped ``(states, hparams, batch[, twin]) -> (states with new eigvec, lambda_max)``.

    Warm-started from ``state.eigvec``; a non-finite eigenvector is not kept. The
    eigensolver's key (random start when the warm start is zero, Lanczos restarts) is
    :func:`sharpness_key` of the lane's data key and step. ``lane_batch``: lanes per
    vectorized group (:func:`lane_map`; ``None``: all).

    ``twin_start=True`` (with ``lane_batch=1``: one lane after another, so a lane's solver
    stops at its own convergence) takes ``twin``, each lane's k=1 twin in the group (itself
    when none, as the chunk program takes it): the lanes that are their own twin are
    estimated first, then every other lane starts from its twin's new eigenvector instead
    of its own from the previous estimate. While a last-bit perturbation has not grown,
    a lane and its twin have nearly the same Hessian, and the solver accepts the twin's
    vector after the products its stop rule needs to confirm it. Where they have parted
    (Section 4's amplification), the twin's vector is the top eigenvector of a nearby
    Hessian, as the lane's own previous one is. The stop rule is the same for every lane, so the accuracy is the
    same; the estimates of lanes with a twin are other bits than without ``twin_start``.
    With ``lane_batch`` other than 1 the lanes of a vectorized group run the same number
    of products, so nothing would be saved: ``twin_start`` is then an error.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})
      >>> hp = tr.stack_hparams(tr.make_lanes([0.25, 0.5]), jnp.float32)
      >>> states = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(hp)
      >>> states, lam = make_sharpness_fn(problem, make_eig_fn(num_iters=2))(states, hp, problem.data)
      >>> [round(float(x), 4) for x in lam], [round(float(x) * float(l), 4) for x, l in zip(lam, hp.learning_rate)]
      ([4.0, 4.0], [1.0, 2.0])

      Lane 1 (k = 3) starts from lane 0's (k = 1) new eigenvector:

      >>> hp3 = tr.stack_hparams(tr.make_lanes([0.25], [1, 3]), jnp.float32)
      >>> states = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(hp3)
      >>> shared = make_sharpness_fn(problem, make_eig_fn(num_iters=2), lane_batch=1, twin_start=True)
      >>> states, lam = shared(states, hp3, problem.data, jnp.array([0, 0], jnp.int32))
      >>> [round(float(x), 4) for x in lam]
      [4.0, 4.0]
    """

    def one(state: TrainState, hp: HParams, batch: Batch, v0: PyTree | None = None):
        key = sharpness_key(state.key, state.step)  # its own stream: never a batch-order key
        start = state.eigvec if v0 is None else v0
        val, vec = eig_fn(objective_fn(problem, hp, state.model_state), state.params, batch, start, key)
        ok = all_finite(vec)
        vec = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a.astype(b.dtype), b), vec, state.eigvec)
        return state._replace(eigvec=vec), val

    if not twin_start:
        return jax.jit(lane_map(one, lane_batch))
    if lane_batch != 1:
        raise ConfigError(f"twin_start needs lane_batch=1 (one lane after another); got lane_batch={lane_batch!r}")

    def skip_or(run: bool, state: TrainState, hp: HParams, batch: Batch, v0: PyTree | None):
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(state.eigvec))  # the solver's: its vectors'

        def estimate():
            new, val = one(state, hp, batch, v0)
            return new, val.astype(dtype)

        return jax.lax.cond(run, estimate, lambda: (state, jnp.full((), jnp.nan, dtype)))

    def shared(states: TrainState, hps: HParams, batch: Batch, twin: jax.Array):
        own = twin == jnp.arange(twin.shape[0], dtype=twin.dtype)
        states, first = jax.lax.map(lambda a: skip_or(a[2], a[0], a[1], batch, None), (states, hps, own))
        starts = jax.tree_util.tree_map(lambda a: a[twin], states.eigvec)  # the twins' new vectors
        states, second = jax.lax.map(lambda a: skip_or(~a[2], a[0], a[1], batch, a[3]), (states, hps, own, starts))
        return states, jnp.where(own, first, second)

    return jax.jit(shared)


def make_curvature_fn(
    problem: Problem,
    track: tuple[str, ...],
    *,
    trace_probes: int = 8,
    density_probes: int = 1,
    density_steps: int = 20,
    lane_batch: int | None = None,
) -> Callable[[TrainState, HParams, Batch], dict[str, jax.Array]]:
    """Jitted, lane-vmapped ``(states, hparams, batch) -> {name: (lanes, ...)}``: the tracked trace and density.

    Of the same objective as the sharpness (:func:`objective_fn`), with probes from
    :func:`~eos_jax.train.state.curvature_key` of the lane's data key and step (pure: a resumed
    run draws the same probes). ``"trace"`` gives ``trace`` and ``trace_stderr`` (Hutchinson,
    :func:`eos_jax.hessian.trace`); ``"density"`` gives ``ritz`` and ``weights``
    ``(lanes, density_probes, density_steps)``: stochastic Lanczos quadrature's nodes and Gauss
    weights per probe (:func:`eos_jax.hessian.density`), from which any smoothed density is drawn.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4), trace 5
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})
      >>> hp = tr.stack_hparams(tr.make_lanes([0.25, 0.5]), jnp.float32)
      >>> states = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(hp)
      >>> out = make_curvature_fn(problem, ("trace", "density"), density_steps=2)(states, hp, problem.data)
      >>> out["trace"].tolist(), out["trace_stderr"].tolist()  # exact for a diagonal Hessian
      ([5.0, 5.0], [0.0, 0.0])
      >>> np.round(np.sort(out["ritz"][0, 0]), 4).tolist(), out["weights"].shape
      ([1.0, 4.0], (2, 1, 2))
    """

    def one(state: TrainState, hp: HParams, batch: Batch) -> dict[str, jax.Array]:
        key = curvature_key(state.key, state.step)
        objective = objective_fn(problem, hp, state.model_state)
        out: dict[str, jax.Array] = {}
        if "trace" in track:
            t = hessian.trace(objective, state.params, batch, jax.random.fold_in(key, 0), num_probes=trace_probes)
            out.update(trace=t.estimate, trace_stderr=t.stderr)
        if "density" in track:
            d = hessian.density(
                objective,
                state.params,
                batch,
                jax.random.fold_in(key, 1),
                num_probes=density_probes,
                num_steps=density_steps,
            )
            out.update(ritz=d.ritz_values, weights=d.weights)
        return out

    return jax.jit(lane_map(one, lane_batch))


def make_eval_fn(problem: Problem, batch_size: int | None) -> Callable[[TrainState, HParams, Batch], jax.Array]:
    """Jitted, lane-vmapped loss at the current parameters on the batch of the current step.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})
      >>> hp = tr.stack_hparams(tr.make_lanes([0.25, 0.5]), jnp.float32)
      >>> states = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(hp)
      >>> make_eval_fn(problem, batch_size=None)(states, hp, problem.data).tolist()
      [2.5, 2.5]
    """

    def one(state: TrainState, hp: HParams, data: Batch):
        return problem_loss(problem, state.params, step_batch(problem, data, state, batch_size), state.model_state)[0]

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


def make_test_fn(problem: Problem) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Jitted, lane-vmapped ``(states, eval_data) -> {name: (lanes,)}``: the problem's ``eval_fn`` per lane.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> def evaluate(params, model_state, data):  # the loss on held-out targets
      ...     return {"test_loss": jnp.mean(jnp.square(params["w"] - data))}
      >>> problem = tr.Problem(lambda key: {"w": jnp.zeros(2)}, lambda p, b: jnp.mean(jnp.square(p["w"] - b)),
      ...                      lambda hp: optim.sgd(hp.learning_rate), jnp.ones((1, 2)),
      ...                      eval_fn=evaluate, eval_data=jnp.full((2,), 2.0))
      >>> states = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(tr.stack_hparams(tr.make_lanes([0.1, 0.2])))
      >>> make_test_fn(problem)(states, problem.eval_data)["test_loss"].tolist()
      [4.0, 4.0]
    """
    if problem.eval_fn is None:
        raise ConfigError("make_test_fn: the problem has no eval_fn")

    def one(state: TrainState, data: Batch) -> dict[str, jax.Array]:
        return dict(problem.eval_fn(state.params, state.model_state, data))

    return jax.jit(jax.vmap(one, in_axes=(0, None)))
