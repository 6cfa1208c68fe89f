"""``fit()``: the engine in memory, for a notebook: no run directory, no signal handler, arrays back.

:func:`fit` runs the same :class:`~eos_jax.train.core.Plan` (compiled init, chunk,
sharpness and final-line programs) and the same host loop
(:func:`~eos_jax.train.core.run_group`) as :func:`eos_jax.train.train`, over the same lane
groups, so the same problem, lanes and config give bitwise the same losses, sharpness,
RelL1 and final parameters. It keeps every logged value in a :class:`History` of NumPy
arrays instead of writing ``metrics.jsonl``, saves no checkpoint and leaves SIGINT/SIGTERM
to the caller (Ctrl-C in a notebook interrupts it as any other cell).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from eos_jax.distributed import to_host
from eos_jax.errors import ConfigError
from eos_jax.train.config import EngineConfig, Problem, PyTree, lane_threshold, uniform_threshold
from eos_jax.train.core import (
    LogBlock,
    Plan,
    build_plan,
    logged_columns,
    new_timing,
    normalized_sharpness,
    run_group,
)
from eos_jax.train.state import Lane, TrainState
from eos_jax.train.stats import REL_L1_WINDOW, index_lane, summarize_run


@dataclasses.dataclass(frozen=True, eq=False)  # no ==: its fields are arrays
class History:
    """What :func:`fit` returns: the logged series of every lane, its final parameters and summaries.

    Series have shape ``(lanes, len(step))``: lane ``i`` is ``lanes[i]``; column ``t`` is
    step ``step[t]`` (the logged steps: multiples of ``log_every``, sharpness steps and the
    last step, the loss being that at the parameters *before* the step's update). Values
    keep the dtype the engine computed them in (the losses', the eigenvalues').

    Attributes:
      lanes: the lanes, in order.
      step: ``int64 (T,)`` logged steps.
      loss: ``(lanes, T)`` loss at each logged step.
      finite: ``bool (lanes, T)``: False from a lane's first non-finite step on (its
        parameters stay those of its last finite step).
      sharpness: ``(lanes, T)`` largest algebraic Hessian eigenvalue of the objective; NaN
        where not measured (``config.sharpness_every``).
      normalized_sharpness: ``float64 (lanes, T)`` ``lr * sharpness`` (Section 6), NaN where
        not measured; compare with ``threshold``.
      rel_l1: ``(lanes, T)`` RelL1 of the lane's parameters to its k=1 twin's (same lr,
        seed, init seed, weight decay; same lane group); NaN for k=1 lanes and lanes without a twin in
        their group (``lane_summaries[i]["rel_l1_to_k1_missing"]`` says why).
      rel_l1_ma: ``(lanes, T)`` its trailing mean over ``eos_jax.train.stats.REL_L1_WINDOW`` steps, NaN likewise.
      params: the final parameters, a pytree of NumPy arrays with a leading lane axis.
      lane_summaries: per lane the record ``train`` writes to ``results.json``: ``finite``,
        ``first_nonfinite_step``, loss spikes of EVERY step (``num_loss_increases_1pct``,
        ``..._late``), ``min_loss``, sharpness statistics, ``params_digest`` and, for
        k != 1 lanes, ``rel_l1_to_k1``, ``n_diff_to_k1`` and ``max_ulp_to_k1``.
      summary: over lanes (number finite, diverged lanes, final loss range, threshold).
      groups: lane indices of each vmapped group (the programs compared like with like).
      threshold: the stability threshold of ``lr * sharpness`` for the optimizer; a
        ``float64 (lanes,)`` array when it differs between lanes (``Problem.threshold`` given
        as ``Lane -> threshold``, e.g. over a momentum axis).
      aux: the problem's ``step_metrics`` (``{}`` without them): per name a ``(lanes, T,
        ...)`` array at the logged steps, before each step's update (after a lane's first
        non-finite step, the values of its frozen parameters: mask with ``finite``).
      timing: wall-clock seconds: ``compile_and_first_chunk_s`` (the first chunk, with
        its compilation), ``train_s`` (the other chunks), ``compile_and_first_sharpness_s``
        (the first estimate, with its compilation), ``sharpness_s`` (the others), ``eval_s`` and,
        with ``config.track``, ``curvature_s`` (the trace and density, their compilation included).
      evals: the problem's ``eval_fn`` (``{}`` without one): per name a ``float64 (lanes,
        T)`` array, NaN where not evaluated (``config.eval_every``; always at step 0 and at
        the last step).
      model_state: the final model state (batch norm's running statistics; ``{}`` without
        one), NumPy arrays with a leading lane axis.
      lane_groups: how the lanes were grouped (``width``, ``groups``, ``max_lanes``), and
        the memory ``estimate`` (:class:`~eos_jax.train.sizing.LaneEstimate` as a dict)
        when ``config.max_lanes`` was None and there was a width to choose; ``line`` says it in words.
      curvature: ``config.track``'s values (``{}`` without it), NaN where not measured (they are
        measured at the sharpness steps): ``trace`` and ``trace_stderr`` ``(lanes, T)``; ``ritz``
        and ``weights`` ``(lanes, T, density_probes, density_steps)``, the nodes and Gauss weights
        of stochastic Lanczos quadrature (:func:`eos_jax.hessian.density`).
      logged: ``bool (lanes, T)``: the lane has a value at the step (every logged step of its
        group; groups that stop early, ``config.loss_goal``, end before the others). None: all.
      measured: ``bool (lanes, T)``: the sharpness (and ``curvature``) was measured there, so a NaN
        there is the estimate's, not a step without one. None: where ``sharpness`` is not NaN.
      evaluated: ``bool (lanes, T)``: the problem's ``eval_fn`` ran there. None: where an ``evals``
        value is not NaN.

    Examples:
      :func:`fit` builds it; a hand-made one of one lane and three logged steps reads the same way:

      >>> import numpy as np
      >>> from eos_jax.train import History, make_lanes
      >>> nan = float("nan")
      >>> h = History(lanes=tuple(make_lanes([0.5])), step=np.arange(3), loss=np.array([[0.5, 0.125, 0.03125]]),
      ...             finite=np.ones((1, 3), bool), sharpness=np.array([[4.0, nan, 4.0]]),
      ...             normalized_sharpness=np.array([[2.0, nan, 2.0]]), rel_l1=np.full((1, 3), nan),
      ...             rel_l1_ma=np.full((1, 3), nan), params={"w": np.zeros((1, 2, 1))}, lane_summaries=({},),
      ...             summary={}, groups=((0,),), threshold=2.0)
      >>> float(h.loss[0, -1]), bool(np.nanmax(h.normalized_sharpness) >= h.threshold)
      (0.03125, True)
    """

    lanes: tuple[Lane, ...]
    step: np.ndarray
    loss: np.ndarray
    finite: np.ndarray
    sharpness: np.ndarray
    normalized_sharpness: np.ndarray
    rel_l1: np.ndarray
    rel_l1_ma: np.ndarray
    params: PyTree
    lane_summaries: tuple[dict[str, Any], ...]
    summary: dict[str, Any]
    groups: tuple[tuple[int, ...], ...]
    threshold: float | np.ndarray
    aux: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)
    evals: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    model_state: PyTree = dataclasses.field(default_factory=dict)
    lane_groups: dict[str, Any] = dataclasses.field(default_factory=dict)
    curvature: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    logged: np.ndarray | None = None
    measured: np.ndarray | None = None
    evaluated: np.ndarray | None = None


class RunStart(NamedTuple):
    """Where a run starts, as a :class:`Callback` that resumes it says (:meth:`Callback.start`).

    Attributes:
      steps: the step each lane group starts from (0: its initial state).
      restore: ``(group, step, template) -> state``: the group's saved state at its start step.
      earlier: the metrics lines of the steps before (one dict per lane and logged step, as
        :func:`eos_jax.train.read_metrics` gives them): the first part of the :class:`History`.

    Examples:
      >>> RunStart([0, 40], restore=lambda g, step, template: template, earlier=[]).steps
      [0, 40]
    """

    steps: list[int]
    restore: Callable[[int, int, PyTree], TrainState]
    earlier: list[dict[str, Any]]


class Callback:
    """A hook into the host loop of :func:`fit`; every method is optional (this class does nothing).

    :func:`eos_jax.train.train` is ``fit`` with four of them: the run directory's metrics lines
    and checkpoints, the resume point, a progress bar and the SIGINT/SIGTERM handler
    (:mod:`eos_jax.train.loop`). Methods run in the order of ``fit``'s ``callbacks``.

    Examples:
      A callback that keeps the sharpness of lane 0 after every chunk:

      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> class Sharpness(tr.Callback):
      ...     def __init__(self):
      ...         self.seen = []
      ...     def after_chunk(self, g, step, state, loss, sharpness):
      ...         self.seen.append((step, None if sharpness is None else round(sharpness, 3)))
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)},
      ...                      lambda p, b: jnp.float32(0.5) * jnp.sum(b[0] * p["w"] ** 2),
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), jnp.array([[1.0, 4.0]], jnp.float32))
      >>> cb = Sharpness()
      >>> _ = tr.fit(problem, tr.make_lanes([0.1]), 4, sharpness_every=2, chunk_steps=2, callbacks=[cb])
      >>> cb.seen  # the Hessian is diag(1, 4)
      [(2, 4.0), (4, 4.0)]
    """

    def start(self, plan: Plan) -> RunStart | None:
        """Called once the plan is built, before any step; may return where the run resumes."""
        return None

    def on_block(self, block: LogBlock) -> None:
        """A chunk's (or the final line's) raw values of one group."""

    def save(self, g: int, step: int, state: TrainState) -> None:
        """A checkpoint of group ``g`` is due at ``step`` (``config.checkpoint_every`` and the end)."""

    def after_chunk(self, g: int, step: int, state: TrainState, loss: float, sharpness: float | None) -> None:
        """After each chunk: the step reached, the loss of lane 0 and its last sharpness (may raise to stop)."""

    def group_done(self, g: int) -> None:
        """Group ``g`` reached its last step."""

    def close(self) -> None:
        """The loop ended (normally or by an exception)."""


def _overrides(cb: Callback, name: str) -> bool:
    return getattr(type(cb), name) is not getattr(Callback, name)


class _OnChunk(Callback):
    """``fit``'s ``on_chunk(step)``."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def after_chunk(self, g: int, step: int, state: TrainState, loss: float, sharpness: float | None) -> None:
        self.fn(step)


def fit(
    problem: Problem,
    lanes: Sequence[Lane],
    steps: int | None = None,
    *,
    config: EngineConfig | None = None,
    dtype: Any = None,
    devices: Sequence[Any] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    callbacks: Sequence[Callback] = (),
    **schedule: Any,
) -> History:
    """Trains every lane for ``steps`` steps in memory and returns its :class:`History`.

    What a notebook calls: the engine of :func:`eos_jax.train.train` (one vmapped,
    scan-chunked program per lane group of at most ``config.max_lanes`` lanes, warm-started
    sharpness tracking, non-finite lanes frozen), without a run directory: no file is
    written, no checkpoint saved, no signal handler installed, no progress bar drawn.
    With the same problem, lanes and config, ``train`` writes bitwise the same losses,
    sharpness and final parameters into its run directory.

    Args:
      problem: what to train (:class:`eos_jax.train.Problem`).
      lanes: the hyperparameter points (:func:`eos_jax.train.make_lanes`).
      steps: optimizer steps per lane; given here or as ``config.steps``, not both.
      config: the schedule (chunking, ``log_every``, sharpness, ``max_lanes``; the
        checkpoint fields only place chunk boundaries, as in ``train``); default
        ``EngineConfig(steps=steps)``. A grouping left to be sized (``max_lanes=None``,
        ``lane_batch="auto"``) is sized first (:func:`eos_jax.train.core.size_lanes`).
      dtype: None: learning rate and weight decay take the parameters' dtype.
      devices: devices to spread the lane axis over (default: all).
      on_chunk: called with the step reached after each chunk (before the callbacks).
      callbacks: :class:`Callback` hooks into the loop (files, progress, interrupts).
      **schedule: :class:`EngineConfig` fields replacing ``config``'s (``sharpness_every=10``,
        ``batch_size=128``, ...), so a notebook needs no ``EngineConfig``.

    Returns:
      The :class:`History`.

    Raises:
      ConfigError: a bad config or lane list.

    Examples:
      Gradient descent on a least-squares problem, plain (k=1) next to perturbed (k=3), at two
      learning rates, sharpness every 2 steps:

      >>> import jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([[1.0], [0.0]])}
      >>> def loss(p, b):  # least squares; the Hessian is 2/N x^T x = diag(1, 4)
      ...     return jnp.mean(jnp.square(b["x"] @ p["w"] - b["y"]))
      >>> problem = tr.Problem(lambda key: {"w": jnp.zeros((2, 1), jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), batch)
      >>> config = tr.EngineConfig(steps=4, sharpness_every=2, sharpness_method="power", sharpness_tol=None)
      >>> hist = tr.fit(problem, tr.make_lanes([0.1, 0.5], ks=[1, 3]), 4, config=config)
      >>> hist.loss.shape, hist.step.tolist()  # 4 lanes; steps 0..4 logged
      ((4, 5), [0, 1, 2, 3, 4])
      >>> hist.lanes[2].learning_rate, hist.loss[2].tolist()  # lr=0.5: the residual halves each step
      (0.5, [0.5, 0.125, 0.03125, 0.0078125, 0.001953125])
      >>> np.round(hist.sharpness[0], 4).tolist()  # lambda_max = 4, measured at steps 0, 2, 4
      [4.0, nan, 4.0, nan, 4.0]
      >>> np.round(hist.normalized_sharpness[:, 0], 4).tolist(), hist.threshold  # lr=0.5: at the edge 2 / lambda_max
      ([0.4, 0.4, 2.0, 2.0], 2.0)
      >>> bool(np.isnan(hist.rel_l1[0]).all()), hist.lanes[3].k, hist.lane_summaries[3]["n_diff_to_k1"]
      (True, 3, 0)
    """
    config = _schedule(steps, config, schedule)
    plan = build_plan(problem, lanes, config, dtype=dtype, devices=devices)
    cbs = [*([_OnChunk(on_chunk)] if on_chunk is not None else []), *callbacks]  # on_chunk first
    timing = new_timing()
    try:
        start = _start(cbs, plan)
        blocks, final_states = _run(plan, cbs, start, timing)
    finally:
        for cb in cbs:
            cb.close()
    return _history(plan, blocks, final_states, start.earlier if start is not None else [], timing)


def _schedule(steps: int | None, config: EngineConfig | None, schedule: dict[str, Any]) -> EngineConfig:
    """The run's config: ``config`` (default ``EngineConfig()``) with ``steps`` and ``schedule``'s fields."""
    unknown = sorted(set(schedule) - {f.name for f in dataclasses.fields(EngineConfig)} - {"steps"})
    if unknown or "steps" in schedule:
        bad = unknown or ["steps"]
        raise ConfigError(
            f"fit: {', '.join(bad)} is not a schedule keyword; allowed: the EngineConfig fields but steps "
            "(given once, as fit's third argument)"
        )
    config = EngineConfig() if config is None else config
    if steps is not None and config.steps is not None and steps != config.steps:
        raise ConfigError(
            f"fit: steps={steps} and config.steps={config.steps}: give the step count once "
            "(fit's steps, or the config's)"
        )
    return dataclasses.replace(config, steps=steps if steps is not None else config.steps, **schedule)


def _start(cbs: Sequence[Callback], plan: Plan) -> RunStart | None:
    """Every callback's ``start``; the resume point one of them gives (at most one may)."""
    starts = [r for r in (cb.start(plan) for cb in cbs) if r is not None]
    if len(starts) > 1:
        raise ConfigError(f"fit: {len(starts)} callbacks say where the run starts; at most one may")
    return starts[0] if starts else None


def _run(
    plan: Plan, cbs: Sequence[Callback], start: RunStart | None, timing: dict[str, Any]
) -> tuple[list[LogBlock], list[tuple[list[int], TrainState, dict[str, Any]]]]:
    """Every group from its start step to the end: the logged blocks and the final states."""
    blocks: list[LogBlock] = []

    def emit(block: LogBlock) -> None:
        blocks.append(block)
        for cb in cbs:
            cb.on_block(block)

    savers = [cb for cb in cbs if _overrides(cb, "save")]
    save = (lambda g, s, state: [cb.save(g, s, state) for cb in savers]) if savers else None
    watchers = [cb for cb in cbs if _overrides(cb, "after_chunk")]
    after = (lambda *a: [cb.after_chunk(*a) for cb in watchers]) if watchers else None
    final_states = []
    for g, idx in enumerate(plan.groups):
        s = start.steps[g] if start is not None else 0
        state = plan.place(start.restore(g, s, plan.template(g))) if s > 0 else None
        state, fstats = run_group(plan, g, state, s, emit=emit, save=save, after_chunk=after, timing=timing)
        for cb in cbs:
            cb.group_done(g)
        final_states.append((idx, state, fstats))
    return blocks, final_states


def _history(
    plan: Plan,
    blocks: list[LogBlock],
    final_states: list[tuple[list[int], TrainState, dict[str, Any]]],
    earlier: list[dict[str, Any]],
    timing: dict[str, Any],
) -> History:
    """The :class:`History` of a run: its logged values (``earlier`` lines, then ``blocks``) and final states."""
    problem, lanes = plan.problem, plan.lanes
    series = _series(blocks, earlier, len(lanes), plan.config.log_every)
    lane_records, summary, final_params = summarize_run(
        lanes, plan.groups, final_states, series, problem.threshold, plan.twins
    )
    params = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[final_params[i] for i in range(len(lanes))])
    model_state: dict[int, PyTree] = {}
    for idx, state, _ in final_states:
        host = to_host(state.model_state)
        for li, lane_index in enumerate(idx):
            model_state[lane_index] = index_lane(host, li)
    model_state_all = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[model_state[i] for i in range(len(lanes))])
    return History(
        lanes=tuple(lanes),
        params=params,
        lane_summaries=tuple(lane_records),
        summary=summary,
        groups=tuple(tuple(idx) for idx in plan.groups),
        threshold=_threshold(problem, lanes),
        timing=dict(timing),
        model_state=model_state_all,
        lane_groups=plan.lane_record(),
        **series,
    )


def _threshold(problem: Problem, lanes: Sequence[Lane]) -> float | np.ndarray:
    """The problem's threshold: one number, or one per lane when they differ."""
    same = uniform_threshold(problem.threshold, lanes)
    return same if same is not None else np.array([lane_threshold(problem.threshold, l) for l in lanes])


def _series(blocks: list[LogBlock], earlier: list[dict[str, Any]], num_lanes: int, log_every: int) -> dict[str, Any]:
    """The logged values as ``(lanes, logged steps)`` arrays (NaN where absent), with their masks.

    ``earlier`` are metrics lines of steps before the blocks' (a resumed run's first part, read
    from its run directory); the arrays take the dtypes the blocks were computed in.
    """
    cols = [(b, logged_columns(b, log_every)) for b in blocks]
    steps = np.array(sorted({b.start + j for b, js in cols for j in js} | {r["step"] for r in earlier}), np.int64)
    pos = {int(s): t for t, s in enumerate(steps)}
    out = _empty_series(blocks, earlier, num_lanes, len(steps))
    for r in earlier:
        _fill_line(out, r, pos[r["step"]])
    for b, js in cols:
        _fill_block(out, b, js, pos)
    return {"step": steps, **out}


def series_from_lines(lines: list[dict[str, Any]], num_lanes: int | None = None) -> dict[str, Any]:
    """A run directory's metrics lines (:func:`eos_jax.train.read_metrics`) as a :class:`History`'s arrays.

    The values are those the run computed (the lines keep every float's digits), in float64.

    Examples:
      >>> lines = [{"lane": 0, "step": 0, "loss": 1.0, "finite": True, "sharpness": 4.0, "normalized_sharpness": 2.0},
      ...          {"lane": 0, "step": 1, "loss": None, "finite": False}]
      >>> s = series_from_lines(lines)
      >>> s["step"].tolist(), s["loss"].tolist(), s["measured"].tolist()
      ([0, 1], [[1.0, nan]], [[True, False]])
    """
    n = num_lanes if num_lanes is not None else 1 + max((r["lane"] for r in lines), default=-1)
    return _series([], lines, n, 1)


def _empty_series(blocks: list[LogBlock], earlier: list[dict[str, Any]], n: int, t: int) -> dict[str, Any]:
    """The arrays of :func:`_series`, NaN-filled (masks False), in the blocks' dtypes (float64 without blocks)."""
    first = blocks[0] if blocks else None
    loss_dt = first.loss.dtype if first is not None else np.float64
    sharp_dt = next((b.sharpness.dtype for b in blocks if b.sharpness is not None), loss_dt)
    rel_dt = first.rel_l1.dtype if first is not None else np.float64

    def empty(dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.full((n, t, *shape), np.nan if np.issubdtype(dtype, np.inexact) else 0, dtype)

    if first is not None:
        aux = {name: empty(v.dtype, v.shape[2:]) for name, v in first.aux.items()}
        curv_first = next((b.curvature for b in blocks if b.curvature is not None), {})
        curvature = {name: empty(v.dtype, v.shape[1:]) for name, v in curv_first.items()}
    else:  # every logged step was before the resume point: shapes from the lines
        r0 = next((r for r in earlier if "aux" in r), {})
        aux = {name: empty(np.float64, np.shape(v)) for name, v in r0.get("aux", {}).items()}
        c0 = next((r for r in earlier if "curvature" in r), {})
        curvature = {name: empty(np.float64, np.shape(v)) for name, v in c0.get("curvature", {}).items()}
    eval_names = sorted(
        {name for b in blocks if b.evals is not None for name in b.evals}
        | {name for r in earlier for name in r.get("eval", {})}
    )
    mask = lambda: np.zeros((n, t), bool)  # noqa: E731
    return {
        "loss": empty(loss_dt),
        "finite": mask(),
        "sharpness": empty(sharp_dt),
        "normalized_sharpness": empty(np.float64),
        "rel_l1": empty(rel_dt),
        "rel_l1_ma": empty(rel_dt),
        "aux": aux,
        "evals": {name: empty(np.float64) for name in eval_names},
        "curvature": curvature,
        "logged": mask(),
        "measured": mask(),
        "evaluated": mask(),
    }


def _nan(x: Any) -> Any:
    """A metrics line's value with its nulls (non-finite numbers) back as NaN."""
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return np.nan if x is None else x


def _fill_line(out: dict[str, Any], r: dict[str, Any], t: int) -> None:
    """Puts one metrics line (a lane at a step) into the arrays at column ``t``."""
    i = r["lane"]
    out["logged"][i, t] = True
    out["loss"][i, t] = _nan(r["loss"])
    out["finite"][i, t] = r["finite"]
    if "rel_l1_to_k1" in r:
        out["rel_l1"][i, t] = _nan(r["rel_l1_to_k1"])
        out["rel_l1_ma"][i, t] = _nan(r[f"rel_l1_to_k1_ma{REL_L1_WINDOW}"])
    if "sharpness" in r:
        out["measured"][i, t] = True
        out["sharpness"][i, t] = _nan(r["sharpness"])
        out["normalized_sharpness"][i, t] = _nan(r["normalized_sharpness"])
    if "eval" in r:
        out["evaluated"][i, t] = True
        for name, v in r["eval"].items():
            out["evals"][name][i, t] = _nan(v)
    for name, v in r.get("curvature", {}).items():
        out["curvature"][name][i, t] = _nan(v)
    for name, v in r.get("aux", {}).items():
        out["aux"][name][i, t] = _nan(v)


def _fill_block(out: dict[str, Any], b: LogBlock, js: list[int], pos: dict[int, int]) -> None:
    """Puts the logged columns ``js`` of one block into the arrays."""
    gi = b.inputs
    t0 = pos[b.start]
    for li, lane_index in enumerate(gi.idx):
        ts = [pos[b.start + j] for j in js]
        out["logged"][lane_index, ts] = True
        out["loss"][lane_index, ts] = b.loss[li, js]
        out["finite"][lane_index, ts] = b.finite[li, js]
        for name, v in b.aux.items():
            out["aux"][name][lane_index, ts] = v[li, js]
        if gi.has_twin[li]:
            out["rel_l1"][lane_index, ts] = b.rel_l1[li, js]
            out["rel_l1_ma"][lane_index, ts] = b.rel_l1_ma[li, js]
        if b.evals is not None:
            out["evaluated"][lane_index, t0] = True
            for name, v in b.evals.items():
                out["evals"][name][lane_index, t0] = v[li]
        for name, v in (b.curvature or {}).items():
            out["curvature"][name][lane_index, t0] = v[li]
        if b.sharpness is not None:
            out["measured"][lane_index, t0] = True
            out["sharpness"][lane_index, t0] = b.sharpness[li]
            out["normalized_sharpness"][lane_index, t0] = normalized_sharpness(
                gi.lanes[li].learning_rate, b.sharpness[li]
            )
