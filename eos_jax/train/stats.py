"""Per-lane statistics: every step's loss folded on device, the RelL1 to the k=1 twin, and the lane summaries.

The running loss statistics (:func:`update_loss_stats`) are updated inside the compiled
chunk from EVERY step's loss, so the stability verdict and spike counts do not depend on
``log_every``; :func:`loss_stats_reference` is the same computation in NumPy (tests).
The RelL1 to the k=1 twin (Section 4: perturbed vs plain SGD) is gathered across the
lane axis inside the compiled program (:func:`rel_l1_to_twin`) and smoothed over
:data:`REL_L1_WINDOW` steps. :func:`summarize_run` turns a run's final states and its
logged series (a :class:`eos_jax.train.History`'s arrays) into the per-lane records of
``results.json`` and of the ``History``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax import io as eio
from eos_jax.distributed import to_host
from eos_jax.metrics import layer_groups, rel_l1, tree_digest, ulp_diff
from eos_jax.train.config import PyTree, lane_threshold, uniform_threshold

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

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.train.stats import init_loss_stats
      >>> stats = init_loss_stats(jnp.float32)
      >>> float(stats["max_inc"]), float(stats["min_loss"]), int(stats["n_inc"])
      (-inf, inf, 0)
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


def update_loss_stats(
    stats: dict[str, jax.Array], step: jax.Array, loss: jax.Array, ok: jax.Array, late_from: int
) -> dict[str, jax.Array]:
    """Folds the loss of ``step`` into the running statistics (pure, jittable).

    Only finite steps (``ok``) count; the relative increase ``(loss - prev) / |prev|`` is
    taken between consecutive counted steps in the loss's dtype, and it is *late* when
    the earlier step is ``>= late_from`` (the first 10 % of a run are its transient).
    :func:`loss_stats_reference` is the same computation in NumPy.

    Examples:
      A period-2 oscillation: every other step rises by 25 %, which a log every 2 steps
      would not see:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.train.stats import init_loss_stats, summarize_loss_stats, update_loss_stats
      >>> losses = jnp.array([1.0, 0.8, 1.0, 0.8, 1.0], jnp.float32)
      >>> def fold(stats, t):
      ...     return update_loss_stats(stats, t, losses[t], jnp.bool_(True), late_from=1), None
      >>> stats, _ = jax.lax.scan(fold, init_loss_stats(jnp.float32), jnp.arange(5))
      >>> s = summarize_loss_stats(stats)
      >>> round(s["max_rel_loss_increase"], 4), s["num_loss_increases_1pct"], s["num_loss_increases_1pct_late"]
      (0.25, 2, 2)
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


def loss_stats_reference(
    losses: Sequence[float], finite: Sequence[bool], late_from: int, dtype: Any = np.float32
) -> dict[str, Any]:
    """NumPy recomputation of the statistics of :func:`update_loss_stats` over steps 0..T.

    Args:
      losses: the loss of every step (index = step).
      finite: whether each step counted (the engine's per-step ``finite``).
      late_from: pairs whose earlier step is ``>= late_from`` are late.
      dtype: the loss dtype the engine computed in.

    Returns:
      The summary fields :func:`summarize_loss_stats` reports.

    Examples:
      >>> from eos_jax.train.stats import loss_stats_reference
      >>> r = loss_stats_reference([1.0, 0.8, 1.0, 0.5], [True] * 4, late_from=2)
      >>> round(r["max_rel_loss_increase"], 4), r["num_loss_increases_1pct"], r["num_loss_increases_1pct_late"]
      (0.25, 1, 0)
      >>> r["min_loss"]
      0.5
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
    """The results.json fields of one lane's final running statistics (host values).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.train.stats import init_loss_stats, summarize_loss_stats
      >>> summarize_loss_stats(init_loss_stats(jnp.float32))  # no step yet
      ... # doctest: +NORMALIZE_WHITESPACE
      {'max_rel_loss_increase': 0.0, 'num_loss_increases_1pct': 0, 'max_rel_loss_increase_late': 0.0,
       'num_loss_increases_1pct_late': 0, 'min_loss': None}
    """

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


def push_rel(buf: jax.Array, count: jax.Array, rel: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pushes ``rel`` into the ring buffer; returns ``(buf, count, moving average)``.

    The average is the sum of the filled slots (empty ones hold 0) divided by their
    number, ``min(count, REL_L1_WINDOW)``, in the buffer's dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.train.stats import REL_L1_WINDOW, push_rel
      >>> buf, count = jnp.zeros(REL_L1_WINDOW, jnp.float32), jnp.int32(0)
      >>> buf, count, ma = push_rel(buf, count, jnp.float32(1.0))
      >>> buf, count, ma = push_rel(buf, count, jnp.float32(0.5))
      >>> int(count), float(ma)  # the mean of the two values pushed so far
      (2, 0.75)
    """
    buf = buf.at[count % REL_L1_WINDOW].set(rel.astype(buf.dtype))
    count = count + jnp.ones((), count.dtype)
    filled = jnp.minimum(count, REL_L1_WINDOW).astype(buf.dtype)
    return buf, count, jnp.sum(buf) / filled


def rel_l1_to_twin(params: PyTree, twin: jax.Array) -> jax.Array:
    """Per lane, :func:`eos_jax.metrics.rel_l1` of its parameters to those of lane ``twin[lane]``.

    ``params`` has a leading lane axis; the twin's parameters are gathered inside the
    compiled program (no transfer to the host).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.train.stats import rel_l1_to_twin
      >>> params = {"w": jnp.array([[1.0, 1.0], [1.0, 3.0]])}  # lane 1 (k=3) has lane 0 (k=1) as its twin
      >>> rel_l1_to_twin(params, jnp.array([0, 0])).tolist()
      [0.0, 0.5]
    """
    other = jax.tree_util.tree_map(lambda a: jnp.take(a, twin, axis=0), params)
    return jax.vmap(rel_l1)(params, other)


def rel_l1_layers_to_twin(params: PyTree, twin: jax.Array, level: int) -> jax.Array:
    """Per lane and layer (:func:`eos_jax.metrics.layer_groups` at ``level``), RelL1 to lane ``twin[lane]``.

    Returns:
      ``(lanes, layers)``, layers in ``layer_groups`` order of one lane's parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.train.stats import rel_l1_layers_to_twin
      >>> params = {"a": jnp.array([[1.0, 1.0], [1.0, 3.0]]), "b": jnp.array([[2.0], [2.0]])}
      >>> rel_l1_layers_to_twin(params, jnp.array([0, 0]), level=1).tolist()
      [[0.0, 0.0], [0.5, 0.0]]
    """
    leaves = jax.tree_util.tree_leaves(params)
    one = jax.tree_util.tree_map(lambda a: a[0], params)
    groups = layer_groups(one, level)
    other = [jnp.take(a, twin, axis=0) for a in leaves]
    per = [jax.vmap(rel_l1)([leaves[i] for i in idx], [other[i] for i in idx]) for idx in groups.values()]
    return jnp.stack(per, axis=1)


def index_lane(tree: PyTree, i: int) -> PyTree:
    """Lane ``i`` of a lane-stacked pytree, as NumPy arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.train.stats import index_lane
      >>> index_lane({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, 1)["w"].tolist()
      [3.0, 4.0]
    """
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[i], tree)


def _number(x: Any) -> float | None:
    """A float, or None when it is not finite (as a metrics line stores it)."""
    x = float(x)
    return x if math.isfinite(x) else None


def lane_summary(series: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """Loss and sharpness statistics of one lane from its logged series.

    Args:
      series: one lane's values at its logged steps, in step order (a row of a
        :class:`eos_jax.train.History` where ``logged``): ``step``, ``loss``, ``finite``,
        ``sharpness``, ``normalized_sharpness`` and ``measured`` (True where the sharpness was
        measured; NaN elsewhere).
      threshold: the stability threshold of ``lr * sharpness``.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.train.stats import lane_summary
      >>> nan = float("nan")
      >>> series = {"step": np.arange(3), "loss": np.array([1.0, 1.25, 0.5]), "finite": np.ones(3, bool),
      ...           "sharpness": np.array([3.0, nan, 4.4]), "normalized_sharpness": np.array([1.5, nan, 2.2]),
      ...           "measured": np.array([True, False, True])}
      >>> s = lane_summary(series, threshold=2.0)
      >>> s["final_loss"], s["max_rel_loss_increase"], s["num_loss_increases_1pct"], s["first_step_above_threshold"]
      (0.5, 0.25, 1, 2)
    """
    steps = [int(x) for x in series["step"]]
    losses = [
        (st, float(l)) for st, l, f in zip(steps, series["loss"], series["finite"]) if f and math.isfinite(float(l))
    ]
    sharp = [
        (st, float(x), _number(ns))
        for st, x, ns, m in zip(steps, series["sharpness"], series["normalized_sharpness"], series["measured"])
        if m and math.isfinite(float(x))
    ]
    out: dict[str, Any] = {
        "initial_loss": losses[0][1] if losses else None,
        "final_loss": _number(series["loss"][-1]) if steps else None,
        "min_loss": min((l for _, l in losses), default=None),
        "max_loss": max((l for _, l in losses), default=None),
    }
    # Largest relative increase of the loss between consecutive logged steps: GD below
    # the stability bound decreases the loss monotonically; spikes mark instabilities.
    incs = [(s, (b - a) / abs(a)) for (s, a), (_, b) in zip(losses, losses[1:]) if a != 0]
    out["max_rel_loss_increase"] = max((x for _, x in incs), default=0.0)
    out["num_loss_increases_1pct"] = sum(1 for _, x in incs if x > 0.01)
    # The same after the first 10% of the steps, to tell an initial transient (e.g. a blow-up
    # in the first steps that then settles) from persistent oscillations.
    last = steps[-1] if steps else 0
    late = [x for s, x in incs if s >= last // 10]
    out["max_rel_loss_increase_late"] = max(late, default=0.0)
    out["num_loss_increases_1pct_late"] = sum(1 for x in late if x > 0.01)
    # The loss over the last 10% of the steps: where a run ended up (a collapse to the constant
    # predictor's loss, eos_jax.stability.regime, is read from it).
    tail = [l for st, l in losses if st >= last - last // 10]
    out["tail_loss_min"] = min(tail, default=None)
    out["tail_loss_max"] = max(tail, default=None)
    if sharp:
        out["final_sharpness"] = sharp[-1][1]
        out["final_normalized_sharpness"] = sharp[-1][2]
        finite_ns = [ns for _, _, ns in sharp if ns is not None]
        out["max_normalized_sharpness"] = max(finite_ns, default=None)
        out["first_step_above_threshold"] = next((s for s, _, ns in sharp if ns is not None and ns > threshold), None)
    return out


def lane_series(series: dict[str, Any], lane: int) -> dict[str, Any]:
    """Lane ``lane``'s row of a run's series, at its logged steps only (what :func:`lane_summary` takes).

    Args:
      series: the arrays of a :class:`eos_jax.train.History` (``step``, ``(lanes, T)`` arrays with
        ``logged``, ``measured`` and ``evaluated`` masks, ``evals`` and ``curvature`` dicts).
      lane: the lane's index.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.train.stats import lane_series
      >>> series = {"step": np.arange(3), "loss": np.array([[1.0, 2.0, 3.0]]), "logged": np.array([[True, False, True]])}
      >>> row = lane_series(series, 0)
      >>> row["step"].tolist(), row["loss"].tolist()
      ([0, 2], [1.0, 3.0])
    """
    keep = np.asarray(series["logged"][lane], bool)
    row: dict[str, Any] = {"step": np.asarray(series["step"])[keep]}
    for name, v in series.items():
        if isinstance(v, dict):
            row[name] = {k: np.asarray(a[lane])[keep] for k, a in v.items()}
        elif name != "step" and isinstance(v, np.ndarray) and v.ndim >= 2:
            row[name] = v[lane][keep]
    return row


_REL_L1 = jax.jit(rel_l1)  # one program per parameter structure (eagerly, every op of every leaf compiles)


def compare_to_k1(
    lane_results: list[dict[str, Any]], final_params: dict[int, Any], twins: Sequence[dict[str, Any]]
) -> None:
    """Adds, to each lane with k != 1, how its final parameters differ from its k=1 twin.

    The twin is the lane of the same sweep with equal learning rate, seed and weight
    decay and k=1 (Section 4: perturbed vs plain SGD). Only a twin in the same vmapped
    program (lane group) is compared, so that a difference is the perturbation's, not
    the program's. Adds ``rel_l1_to_k1`` (the paper's RelL1), ``n_diff_to_k1`` and
    ``max_ulp_to_k1``; otherwise ``rel_l1_to_k1_missing`` says why there is none.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.train.stats import compare_to_k1
      >>> w = np.float32([1.0, 2.0])
      >>> w_k3 = w.copy(); w_k3[1] = np.nextafter(w[1], np.float32(3))  # one ulp apart
      >>> records = [{"lane": 0, "k": 1}, {"lane": 1, "k": 3}]
      >>> twins = [{"lane": 0, "in_group": False, "missing": None}, {"lane": 0, "in_group": True, "missing": None}]
      >>> compare_to_k1(records, {0: {"w": w}, 1: {"w": w_k3}}, twins)
      >>> records[1]["n_diff_to_k1"], records[1]["max_ulp_to_k1"], records[1]["rel_l1_to_k1"] > 0
      (1, 1, True)
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
        r["rel_l1_to_k1"] = float(_REL_L1(a, b))
        r["n_diff_to_k1"] = d.n_diff
        r["max_ulp_to_k1"] = d.max_ulp


def summarize_run(
    lanes: Sequence[Any],
    groups: list[list[int]],
    final_states: list[tuple[list[int], Any, dict[str, np.ndarray]]],
    series: dict[str, Any],
    threshold: Any,
    twins: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[int, PyTree]]:
    """The per-lane records and the summary of ``results.json``, from the final states and the logged series.

    Args:
      lanes: the run's :class:`eos_jax.train.Lane` list.
      groups: lane indices per vmapped group.
      final_states: per group ``(lane indices, final TrainState, final loss statistics)``.
      series: the run's logged arrays, as a :class:`eos_jax.train.History` holds them
        (:func:`lane_series`).
      threshold: the problem's stability threshold (a number, or ``Lane -> number``: each lane
        record gets its own ``threshold``; the summary's is None when they differ).
      twins: :func:`eos_jax.train.core.find_twins` of the run.

    Returns:
      ``(lane records sorted by lane, summary over lanes, final parameters by lane index)``.

    Examples:
      Two lanes at step 0, as :func:`eos_jax.train.init_state` makes them, with one logged step each:

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> from eos_jax.train.stats import summarize_run
      >>> problem = tr.Problem(lambda key: {"w": jnp.zeros(2, jnp.float32)},
      ...                      lambda p, b: jnp.mean(jnp.square(b - p["w"])),
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), jnp.ones((4, 2)))
      >>> lanes = tr.make_lanes([0.1, 0.5])
      >>> state = jax.jit(jax.vmap(lambda hp: tr.init_state(problem, hp)))(tr.stack_hparams(lanes, jnp.float32))
      >>> stats = {k: np.stack([np.asarray(v)] * 2) for k, v in tr.stats.init_loss_stats(jnp.float32).items()}
      >>> ones, nan = np.ones((2, 1), bool), np.full((2, 1), np.nan)
      >>> series = {"step": np.zeros(1, np.int64), "loss": np.ones((2, 1)), "finite": ones, "logged": ones,
      ...           "sharpness": nan, "normalized_sharpness": nan, "measured": ~ones, "evaluated": ~ones,
      ...           "evals": {}, "curvature": {}}
      >>> groups = [[0, 1]]
      >>> records, summary, params = summarize_run(lanes, groups, [([0, 1], state, stats)], series, 2.0,
      ...                                          tr.core.find_twins(lanes, groups))
      >>> [(r["lane"], r["learning_rate"], r["finite"], r["steps"]) for r in records]
      [(0, 0.1, True, 0), (1, 0.5, True, 0)]
      >>> summary["num_finite"], summary["final_loss_max"], params[1]["w"].tolist()
      (2, 1.0, [0.0, 0.0])
    """
    lane_records = []
    final_params: dict[int, Any] = {}
    for idx, state, stats in final_states:
        host = to_host(state)
        for li, lane_index in enumerate(idx):
            one = index_lane(host, li)
            rec = {"lane": lane_index, **lanes[lane_index].asdict()}
            rec["finite"] = bool(one.finite)
            rec["first_nonfinite_step"] = int(one.nonfinite_step) if not bool(one.finite) else None
            rec["steps"] = int(one.step)
            rec["stop_step"] = int(one.stop_step) if int(one.stop_step) >= 0 else None
            rec["threshold"] = lane_threshold(threshold, lanes[lane_index])
            row = lane_series(series, lane_index)
            rec.update(lane_summary(row, rec["threshold"]))
            # Spikes and the stability verdict from EVERY step's loss (running statistics kept
            # inside the scan), not from the logged lines only.
            rec.update(summarize_loss_stats({k: v[li] for k, v in stats.items()}))
            rec["loss_stats_from"] = "every step"
            rec["params_digest"] = tree_digest(one.params)
            if jax.tree_util.tree_leaves(one.model_state):
                rec["model_state_digest"] = tree_digest(one.model_state)
            rec.update(_last_eval_and_curvature(row))
            final_params[lane_index] = one.params
            lane_records.append(rec)
    lane_records.sort(key=lambda r: r["lane"])
    compare_to_k1(lane_records, final_params, twins)
    finite_lanes = [r for r in lane_records if r["finite"]]
    fl = [r["final_loss"] for r in finite_lanes if r["final_loss"] is not None]
    summary = {
        "num_lanes": len(lane_records),
        "num_groups": len(groups),
        "num_finite": len(finite_lanes),
        "diverged": [
            {"lane": r["lane"], "learning_rate": r["learning_rate"], "first_nonfinite_step": r["first_nonfinite_step"]}
            for r in lane_records
            if not r["finite"]
        ],
        "final_loss_min": min(fl, default=None),
        "final_loss_max": max(fl, default=None),
        "threshold": uniform_threshold(threshold, lanes),
    }
    return lane_records, summary, final_params


def _last_eval_and_curvature(row: dict[str, Any]) -> dict[str, Any]:
    """A lane's ``final_eval`` (its last evaluation) and ``curvature`` series (``EngineConfig.track``'s, at the
    sharpness steps), when it has them; non-finite values as None."""
    out: dict[str, Any] = {}
    evaluated = np.flatnonzero(row.get("evaluated", ()))
    if len(evaluated) and row["evals"]:
        t = evaluated[-1]
        out["final_eval"] = {"step": int(row["step"][t]), **{n: _number(v[t]) for n, v in row["evals"].items()}}
    measured = np.flatnonzero(row["measured"])
    if len(measured) and row["curvature"]:
        out["curvature"] = {"step": [int(row["step"][t]) for t in measured]}
        out["curvature"].update({n: eio.to_jsonable(v[measured]) for n, v in row["curvature"].items()})
    return out
