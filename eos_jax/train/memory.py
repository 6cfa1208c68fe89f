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
from typing import Any

import jax
import numpy as np

from eos_jax import io as eio
from eos_jax.distributed import to_host
from eos_jax.errors import ConfigError
from eos_jax.train.config import EngineConfig, Problem, PyTree, lane_threshold, uniform_threshold
from eos_jax.train.core import (
    LogBlock,
    Plan,
    logged_columns,
    metric_records,
    new_timing,
    normalized_sharpness,
    run_group,
)
from eos_jax.train.state import Lane, TrainState
from eos_jax.train.stats import index_lane, summarize_run


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


def fit(
    problem: Problem,
    lanes: Sequence[Lane],
    steps: int,
    *,
    config: EngineConfig | None = None,
    dtype: Any = None,
    devices: Sequence[Any] | None = None,
    on_chunk: Callable[[int], None] | None = None,
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
      steps: optimizer steps per lane (overrides ``config.steps``).
      config: the schedule (chunking, ``log_every``, sharpness, ``max_lanes``; the
        checkpoint fields only place chunk boundaries, as in ``train``); default
        ``EngineConfig(steps=steps)``.
      dtype: None: learning rate and weight decay take the parameters' dtype.
      devices: devices to spread the lane axis over (default: all).
      on_chunk: called with the step reached after each chunk.
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
    unknown = sorted(set(schedule) - {f.name for f in dataclasses.fields(EngineConfig)} - {"steps"})
    if unknown or "steps" in schedule:
        bad = unknown or ["steps"]
        raise ConfigError(
            f"fit: {', '.join(bad)} is not a schedule keyword; allowed: the EngineConfig fields but steps "
            "(given once, as fit's third argument)"
        )
    config = EngineConfig(steps=steps) if config is None else config
    config = dataclasses.replace(config, steps=steps, **schedule)
    plan = Plan.build(problem, lanes, config, dtype=dtype, devices=devices)
    blocks: list[LogBlock] = []
    final_states: list[tuple[list[int], TrainState, dict[str, Any]]] = []
    timing = new_timing()
    after = (lambda g, s, state, loss, sharp: on_chunk(s)) if on_chunk is not None else None
    for g, idx in enumerate(plan.groups):
        state, fstats = run_group(plan, g, None, 0, emit=blocks.append, after_chunk=after, timing=timing)
        final_states.append((idx, state, fstats))
    # The records as train() reads them back from metrics.jsonl (non-finite values as None), so
    # the summaries are computed from the same values.
    records = [eio.to_jsonable(r) for b in blocks for r in metric_records(b, config.log_every, problem.threshold)]
    lane_records, summary, final_params = summarize_run(
        lanes, plan.groups, final_states, records, problem.threshold, plan.twins
    )
    series = _series(blocks, len(lanes), config.log_every)
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


def _series(blocks: list[LogBlock], num_lanes: int, log_every: int) -> dict[str, np.ndarray]:
    """The logged values of ``blocks`` as ``(lanes, logged steps)`` arrays (NaN where absent)."""
    cols = [(b, logged_columns(b, log_every)) for b in blocks]
    steps = np.array(sorted({b.start + j for b, js in cols for j in js}), np.int64)
    pos = {int(s): t for t, s in enumerate(steps)}
    first = blocks[0]

    def empty(dtype: Any) -> np.ndarray:
        return np.full((num_lanes, len(steps)), np.nan, dtype)

    sharp_dtype = next((b.sharpness.dtype for b in blocks if b.sharpness is not None), first.loss.dtype)
    out = {
        "loss": empty(first.loss.dtype),
        "finite": np.zeros((num_lanes, len(steps)), bool),
        "sharpness": empty(sharp_dtype),
        "normalized_sharpness": empty(np.float64),
        "rel_l1": empty(first.rel_l1.dtype),
        "rel_l1_ma": empty(first.rel_l1_ma.dtype),
    }
    aux = {
        name: np.full(
            (num_lanes, len(steps), *v.shape[2:]), np.nan if np.issubdtype(v.dtype, np.inexact) else 0, v.dtype
        )
        for name, v in first.aux.items()
    }
    curv_first = next((b.curvature for b in blocks if b.curvature is not None), {})
    curvature = {
        name: np.full((num_lanes, len(steps), *v.shape[1:]), np.nan, v.dtype) for name, v in curv_first.items()
    }
    eval_names = sorted({name for b in blocks if b.evals is not None for name in b.evals})
    evals = {name: np.full((num_lanes, len(steps)), np.nan, np.float64) for name in eval_names}
    for b, js in cols:
        gi = b.inputs
        for li, lane_index in enumerate(gi.idx):
            ts = [pos[b.start + j] for j in js]
            if b.evals is not None:
                for name, v in b.evals.items():
                    evals[name][lane_index, pos[b.start]] = v[li]
            for name, v in (b.curvature or {}).items():
                curvature[name][lane_index, pos[b.start]] = v[li]
            out["loss"][lane_index, ts] = b.loss[li, js]
            for name, v in b.aux.items():
                aux[name][lane_index, ts] = v[li, js]
            out["finite"][lane_index, ts] = b.finite[li, js]
            if gi.has_twin[li]:
                out["rel_l1"][lane_index, ts] = b.rel_l1[li, js]
                out["rel_l1_ma"][lane_index, ts] = b.rel_l1_ma[li, js]
            if b.sharpness is not None:
                t0 = pos[b.start]
                out["sharpness"][lane_index, t0] = b.sharpness[li]
                out["normalized_sharpness"][lane_index, t0] = normalized_sharpness(
                    gi.lanes[li].learning_rate, b.sharpness[li]
                )
    return {"step": steps, **out, "aux": aux, "evals": evals, "curvature": curvature}
