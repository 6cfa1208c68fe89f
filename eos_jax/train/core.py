"""The host loop shared by :func:`eos_jax.train.train` and :func:`eos_jax.train.fit`.

A run's lanes are split into groups of at most ``max_lanes`` (:func:`group_lanes`); each
group is one vmapped program, its lane axis sharded over the devices when there are
several. A :class:`Plan` holds what every group shares: the placed data and the compiled
init, chunk, final-line and sharpness functions. :func:`run_group` drives one group from
a start step to ``config.steps``: between chunks it tracks the sharpness and hands the
host a :class:`LogBlock` of raw per-step values; what happens to them (lines in
``metrics.jsonl`` and orbax checkpoints for ``train``, arrays in memory for ``fit``) is
the caller's, through callbacks. Both callers therefore run the same computations in the
same order, and give the same bits.

Chunk boundaries fall on multiples of ``chunk_steps``, ``checkpoint_every``,
``sharpness_every`` and the end, so an interrupted and resumed run performs the same
computations, in the same order, as an uninterrupted one. The normalized sharpness
``lr * lambda_max`` is compared with the optimizer's threshold (2 for gradient descent:
the classical bound ``lr < 2/lambda_max`` that the Edge of Stability exceeds, Section 6).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.distributed import min_over_processes, to_host
from eos_jax.errors import ConfigError
from eos_jax.train.config import EngineConfig, Problem, PyTree, lane_threshold
from eos_jax.train.sizing import (
    AUTO_LANE_BATCH,
    LaneBatchChoice,
    LaneEstimate,
    available_bytes,
    choose_lane_batch,
    fit_lanes,
    program_bytes,
    program_temp_bytes,
)
from eos_jax.train.state import HParams, Lane, TrainState, hparam_dtype, init_state, stack_hparams
from eos_jax.train.stats import REL_L1_WINDOW
from eos_jax.train.step import (
    make_chunk_fn,
    make_curvature_fn,
    make_eig_fn,
    make_final_fn,
    make_sharpness_fn,
    make_test_fn,
)


def next_boundary(s: int, total: int, periods: Iterable[int | None]) -> int:
    """The first step after ``s`` that is a multiple of one of ``periods``, capped at ``total``.

    Examples:
      >>> next_boundary(0, 100, (50, 30, None))
      30
      >>> next_boundary(90, 100, (50, 30))
      100
    """
    nxt = total
    for p in periods:
        if p:
            nxt = min(nxt, (s // p + 1) * p)
    return nxt


def sharpness_due(s: int, every: int | None, alternate: bool) -> bool:
    """Whether the sharpness is estimated at step ``s`` (the end of the run aside).

    Plain schedule: every multiple of ``every``. ``alternate``: the ``j``-th sample is at
    ``j * every + (j % 2)`` when ``every`` is even (steps 0, 21, 40, 61, ... for 20), so
    consecutive samples alternate the parity of the step and a period-2 orbit is seen in both
    of its phases; an odd ``every`` alternates by itself and keeps its multiples.

    Examples:
      >>> [s for s in range(70) if sharpness_due(s, 20, alternate=True)]
      [0, 21, 40, 61]
      >>> [s for s in range(70) if sharpness_due(s, 20, alternate=False)]
      [0, 20, 40, 60]
    """
    if not every:
        return False
    if not alternate or every % 2:
        return s % every == 0
    j, r = divmod(s, every)
    return r == j % 2


def next_sharpness_step(s: int, every: int | None, alternate: bool) -> int | None:
    """The first step after ``s`` at which :func:`sharpness_due` holds (``None``: never).

    Examples:
      >>> next_sharpness_step(0, 20, True), next_sharpness_step(21, 20, True), next_sharpness_step(0, 20, False)
      (21, 40, 20)
    """
    if not every:
        return None
    j = s // every
    for c in (j, j + 1, j + 2):
        t = c * every + (c % 2 if alternate and every % 2 == 0 else 0)
        if t > s:
            return t
    raise AssertionError("unreachable: two periods ahead is always after s")  # pragma: no cover


def group_lanes(num_lanes: int, max_lanes: int, num_devices: int = 1) -> list[list[int]]:
    """Splits lane indices into groups of at most ``max_lanes`` (a multiple of ``num_devices`` when possible).

    Examples:
      >>> group_lanes(5, 2)
      [[0, 1], [2, 3], [4]]
      >>> group_lanes(5, 3, num_devices=2)  # groups of 2: a multiple of the device count
      [[0, 1], [2, 3], [4]]
    """
    size = max_lanes
    if num_devices > 1 and max_lanes >= num_devices:
        size = (max_lanes // num_devices) * num_devices
    return [list(range(i, min(i + size, num_lanes))) for i in range(0, num_lanes, size)]


def first_width(num_lanes: int, config: EngineConfig, num_devices: int = 1) -> int:
    """The group width an automatic grouping starts from (before memory is measured).

    ``config.auto_lane_cap`` rounded down to a multiple of ``lcm(devices, lane_multiple)``
    (at least one such multiple), and no more than the lanes there are, rounded up to it.

    Examples:
      >>> first_width(100, EngineConfig(steps=1, auto_lane_cap=16))
      16
      >>> first_width(5, EngineConfig(steps=1, auto_lane_cap=16), num_devices=4)  # 5 lanes padded to 8
      8
      >>> first_width(30, EngineConfig(steps=1, auto_lane_cap=16, lane_multiple=6))
      12
    """
    step = math.lcm(num_devices, config.lane_multiple)
    return max(step, min(config.auto_lane_cap // step * step, math.ceil(num_lanes / step) * step))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of the arrays of ``tree`` (``None`` leaves: none).

    Examples:
      >>> import jax, numpy as np
      >>> tree_bytes({"a": np.zeros((3, 4), np.float32), "b": jax.ShapeDtypeStruct((2,), np.float64), "c": None})
      64
    """
    return int(sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def pad_lanes(ls: list[Lane], num_devices: int) -> list[Lane]:
    """A group's lanes, padded (repeating the last) to a multiple of ``num_devices`` when sharded.

    Examples:
      >>> from eos_jax.train import make_lanes
      >>> [l.learning_rate for l in pad_lanes(make_lanes([0.1, 0.2, 0.3]), num_devices=2)]
      [0.1, 0.2, 0.3, 0.3]
    """
    if num_devices > 1 and len(ls) % num_devices:
        ls = ls + [ls[-1]] * (num_devices - len(ls) % num_devices)  # padding lanes, dropped later
    return ls


def _late_from(config: EngineConfig) -> int:
    """The first "late" step: spikes after the first 10 % of the steps are late."""
    return config.steps // 10


def _place_data(
    problem: Problem, config: EngineConfig, devices: list[Any]
) -> tuple[jax.sharding.Mesh | None, PyTree, PyTree, PyTree]:
    """``(mesh, data, sharpness data, eval data)``: the data replicated on the devices (a lane mesh for several)."""
    mesh = None
    if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.array(devices), ("lanes",))
        replicated: Any = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        replicated = devices[0]
    data = jax.device_put(problem.data, replicated)
    eval_data = jax.device_put(problem.eval_data, replicated) if problem.eval_fn is not None else None
    if config.sharpness_examples is not None:
        n_examples = int(jax.tree_util.tree_leaves(problem.data)[0].shape[0])
        m = min(config.sharpness_examples, n_examples)
        sharp_data = jax.tree_util.tree_map(lambda a: a[:m], data)
    else:
        sharp_data = data
    return mesh, data, sharp_data, eval_data


def _step_programs(problem: Problem, config: EngineConfig, eig_fn: Any, lane_batch: int | None) -> tuple[Any, Any, Any]:
    """The chunk, sharpness and (with ``config.track``) curvature programs of a run at ``lane_batch`` lanes per batch (jitted, not compiled)."""
    chunk_fn = make_chunk_fn(
        problem,
        config.batch_size,
        config.chunk_steps,
        _late_from(config),
        lane_batch,
        config.loss_goal,
        config.acc_goal,
    )
    curv_fn = None
    if config.track:
        curv_fn = make_curvature_fn(
            problem,
            config.track,
            trace_probes=config.trace_probes,
            density_probes=config.density_probes,
            density_steps=config.density_steps,
            lane_batch=lane_batch,
        )
    sharp_fn = make_sharpness_fn(problem, eig_fn, lane_batch, twin_start=config.sharpness_twin_start)
    return chunk_fn, sharp_fn, curv_fn


def _twin_key(lane: Lane) -> tuple[Any, ...]:
    """What a lane shares with its k=1 twin: every hyperparameter but k."""
    return (lane.learning_rate, lane.seed, lane.used_init_seed, lane.weight_decay, lane.hyper)


def find_twins(lanes: Sequence[Lane], groups: list[list[int]]) -> list[dict[str, Any]]:
    """For each lane, its k=1 twin (same lr, seed, init seed, weight decay, named hyperparameters) and whether it runs in the same group.

    Init seeds compare as used (:attr:`Lane.used_init_seed`): a lane without one is the twin
    of a k=1 lane whose init seed equals its seed, which starts from the same parameters.

    Returns:
      Per lane ``{"lane": twin index or None, "in_group": bool, "missing": reason or None}``;
      ``missing`` is None for k=1 lanes and for k != 1 lanes whose twin is in their group.
      A twin in another group is not compared: the series is gathered inside one program,
      and a group of another width is another program whose rounding may differ (the
      difference would be the program's, not the perturbation's).

    Examples:
      >>> from eos_jax.train import make_lanes
      >>> lanes = make_lanes(0.1, ks=[1, 3, 5])
      >>> [(t["lane"], t["in_group"]) for t in find_twins(lanes, [[0, 1, 2]])]
      [(0, False), (0, True), (0, True)]
      >>> print(find_twins(lanes, [[0, 1], [2]])[2]["missing"])
      its k=1 twin (lane 0) ran in lane group 0, not in this lane's group 1: ...

      Lanes of another initialization are no twins:

      >>> from eos_jax.train import Lane
      >>> print(find_twins([Lane(0.1, k=1, init_seed=1), Lane(0.1, k=3, init_seed=2)], [[0, 1]])[1]["missing"])
      no k=1 lane with the same learning rate, seed, init seed, weight decay and named hyperparameters in this sweep
    """
    group_of = {i: g for g, idx in enumerate(groups) for i in idx}
    width = {g: len(idx) for g, idx in enumerate(groups)}
    k1 = {_twin_key(l): i for i, l in enumerate(lanes) if l.k == 1}
    out = []
    for i, l in enumerate(lanes):
        if l.k == 1:
            out.append({"lane": i, "in_group": False, "missing": None})
            continue
        t = k1.get(_twin_key(l))
        if t is None:
            out.append(
                {
                    "lane": None,
                    "in_group": False,
                    "missing": "no k=1 lane with the same learning rate, seed, init seed, weight decay and named hyperparameters in this sweep",
                }
            )
        elif group_of[t] != group_of[i]:
            gt, gi = group_of[t], group_of[i]
            why = (
                f"its k=1 twin (lane {t}) ran in lane group {gt}, not in this lane's group {gi}: the series is "
                "gathered inside one vmapped program"
            )
            if width[gt] != width[gi]:
                why += (
                    f", and the groups are programs of different widths ({width[gt]} vs {width[gi]} lanes), "
                    "whose roundings may differ: a difference would be the program's, not the perturbation's"
                )
            out.append({"lane": t, "in_group": False, "missing": why + " (raise max_lanes to put them in one group)"})
        else:
            out.append({"lane": t, "in_group": True, "missing": None})
    return out


class GroupInputs(NamedTuple):
    """The placed per-group inputs: lanes (padded), hyperparameters, twin indices into the group.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> plan = build_plan(problem, tr.make_lanes([0.25, 0.5], ks=[1, 3]), tr.EngineConfig(steps=2))
      >>> gi = plan.inputs(0)
      >>> gi.idx, gi.twin.tolist(), gi.has_twin.tolist()
      ([0, 1, 2, 3], [0, 0, 2, 2], [False, True, False, True])
    """

    idx: list[int]  # indices of the group's real lanes in the run
    lanes: list[Lane]  # the group's lanes, padded to a multiple of the device count
    hp: HParams
    twin: jax.Array  # int32 (padded lanes,): the k=1 twin of each lane in this group (itself when none)
    has_twin: np.ndarray  # bool (real lanes,): the lane has a k=1 twin in this group


@dataclasses.dataclass
class Plan:
    """What every lane group of a run shares: placement, data and the compiled programs.

    Build it with :func:`build_plan` (or :func:`size_lanes`, then :meth:`Plan.build`);
    :func:`run_group` runs one group with it.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> plan = Plan.build(problem, tr.make_lanes([0.25, 0.5], ks=[1, 3]), tr.EngineConfig(steps=2, max_lanes=2, lane_batch=None))
      >>> plan.groups, plan.dtype  # the k=3 lanes' twins sit in their groups
      ([[0, 1], [2, 3]], dtype('float32'))
      >>> plan.template(0).params["w"].shape  # what a checkpoint of group 0 restores into
      (2, 2)
    """

    problem: Problem
    lanes: Sequence[Lane]
    config: EngineConfig
    dtype: np.dtype
    devices: list[Any]
    groups: list[list[int]]
    twins: list[dict[str, Any]]
    mesh: jax.sharding.Mesh | None
    data: PyTree
    sharp_data: PyTree
    init_fn: Callable[[HParams], TrainState]
    chunk_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    final_fn: Callable[..., Any]
    sharp_fn: Callable[..., tuple[TrainState, jax.Array]]
    eval_data: PyTree = None
    test_fn: Callable[..., dict[str, jax.Array]] | None = None
    curv_fn: Callable[..., dict[str, jax.Array]] | None = None  # config.track's trace / density
    width: int = 0  # the group width passed to group_lanes (reproduces the groups)
    sizing: LaneSizing | None = None  # how the grouping was chosen (size_lanes), when it was

    @classmethod
    def build(
        cls,
        problem: Problem,
        lanes: Sequence[Lane],
        config: EngineConfig,
        *,
        dtype: Any = None,
        devices: Sequence[Any] | None = None,
        sizing: LaneSizing | None = None,
    ) -> Plan:
        """Validates the run, places its data and builds its programs (each compiles on its first call).

        ``config`` must give the grouping as plain numbers: ``max_lanes`` an integer and
        ``lane_batch`` an integer or None. ``max_lanes=None`` (size to memory) and
        ``lane_batch="auto"`` are resolved first, by :func:`size_lanes`, whose result is
        passed here as ``sizing`` (``config=sizing.config``): the plan then reuses the
        programs the sizing compiled when they are the ones the run calls, and records how
        the grouping was chosen (:meth:`lane_record`). :func:`build_plan` does both.

        Raises:
          ConfigError: a bad config, no lanes, a grouping not yet sized, a hyperparameter dtype
            other than the parameters', or a batch larger than the training set.
        """
        config.validate()
        if not lanes:
            raise ConfigError("no lanes to train")
        if config.max_lanes is None or config.lane_batch == AUTO_LANE_BATCH:
            raise ConfigError(
                f"max_lanes={config.max_lanes!r}, lane_batch={config.lane_batch!r}: Plan.build takes the grouping as "
                "numbers; size it first (eos_jax.train.core.size_lanes, or build_plan, which sizes and builds)"
            )
        dtype = hparam_dtype(problem, dtype)
        devices = list(devices) if devices is not None else jax.devices()
        groups = group_lanes(len(lanes), config.max_lanes, len(devices))
        probe = sizing.probe if sizing is not None else None
        if probe is not None and probe.devices == devices and probe.dtype == dtype:
            # The sizing's programs (and the executables it compiled), rebuilt only for another lane batch.
            plan = dataclasses.replace(probe, config=config, groups=groups, twins=find_twins(lanes, groups))
            if probe.config.lane_batch != config.lane_batch:
                chunk_fn, sharp_fn, curv_fn = _step_programs(
                    problem, config, _eig_fn(problem, config), config.lane_batch
                )
                plan = dataclasses.replace(plan, chunk_fn=chunk_fn, sharp_fn=sharp_fn, curv_fn=curv_fn)
        else:
            plan = cls._new(problem, lanes, config, dtype, devices, groups)
        return dataclasses.replace(plan, width=config.max_lanes, sizing=sizing)

    @classmethod
    def _new(cls, problem, lanes, config, dtype, devices, groups) -> Plan:
        """A plan with freshly built (not yet compiled) programs."""
        n_examples = int(jax.tree_util.tree_leaves(problem.data)[0].shape[0])
        if config.batch_size is not None and config.batch_size > n_examples:
            raise ConfigError(f"batch_size={config.batch_size} exceeds the {n_examples} training examples")
        mesh, data, sharp_data, eval_data = _place_data(problem, config, devices)
        chunk_fn, sharp_fn, curv_fn = _step_programs(problem, config, _eig_fn(problem, config), config.lane_batch)
        return cls(
            problem=problem,
            lanes=lanes,
            config=config,
            dtype=dtype,
            devices=devices,
            groups=groups,
            twins=find_twins(lanes, groups),
            mesh=mesh,
            data=data,
            sharp_data=sharp_data,
            # Lane-sharded like every later state: an initial state placed otherwise (some leaves
            # replicated by XLA's propagation) would compile the chunk and sharpness programs twice.
            init_fn=jax.jit(
                jax.vmap(lambda hp: init_state(problem, hp)),
                out_shardings=None
                if mesh is None
                else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("lanes")),
            ),
            chunk_fn=chunk_fn,
            final_fn=make_final_fn(problem, config.batch_size, _late_from(config)),
            sharp_fn=sharp_fn,
            curv_fn=curv_fn,
            eval_data=eval_data,
            test_fn=make_test_fn(problem) if problem.eval_fn is not None else None,
            width=config.max_lanes,
        )

    @property
    def lane_estimate(self) -> LaneEstimate | None:
        """The memory estimate the groups were sized with (None: ``max_lanes`` was given, or nothing to choose)."""
        return self.sizing.estimate if self.sizing is not None else None

    @property
    def lane_batch_choice(self) -> LaneBatchChoice | None:
        """How ``lane_batch="auto"`` was resolved (None: it was given)."""
        return self.sizing.lane_batch_choice if self.sizing is not None else None

    def memory_estimate(self) -> LaneEstimate:
        """The widest group whose measured programs fit the device's free memory.

        Group 0's chunk (and sharpness) programs are compiled at the current width and XLA's
        memory analysis of them is set against the free memory (:func:`~eos_jax.train.sizing.fit_lanes`);
        with several processes every one takes the width all of them can hold.
        """
        config, devices = self.config, self.devices
        est = fit_lanes(
            self.measure(0),
            len(self.padded(0)),
            len(devices),
            # One of this process's devices: another process's cannot report its memory here.
            available_bytes(next((d for d in devices if d.process_index == jax.process_index()), devices[0])),
            fraction=config.lane_memory_fraction,
            cap=config.auto_lane_cap,
            num_lanes=len(self.lanes),
            multiple=config.lane_multiple,
        )
        if jax.process_count() > 1:  # every process must group alike: the width all of them can hold
            est = dataclasses.replace(est, width=min_over_processes(est.width))
        return est

    def choose_lane_batch(self) -> LaneBatchChoice:
        """Resolves ``lane_batch="auto"`` (:func:`~eos_jax.train.sizing.choose_lane_batch`).

        On one CPU device, group 0's all-at-once chunk and sharpness programs are compiled
        (the executables the automatic width measured, from JAX's cache, and the ones the run
        calls when all lanes stay at once) and their temporaries decide. Elsewhere all lanes
        run at once: an accelerator's memory is not handed back between calls, and with several
        devices (so in every multi-process run) the lane axis is sharded over them, and a
        ``lax.map`` over a sharded axis has not been measured (set ``lane_batch`` by hand there).
        """
        lanes = math.ceil(len(self.padded(0)) / len(self.devices))
        if self.devices[0].platform != "cpu":
            return LaneBatchChoice(None, f"{self.devices[0].platform}: all at once", lanes, {}, 0)
        if len(self.devices) > 1:
            return LaneBatchChoice(None, f"{len(self.devices)} devices: all at once", lanes, {}, 0)
        if lanes <= 1:
            return LaneBatchChoice(None, "one lane: nothing to batch", lanes, {}, 0)
        gi = self.inputs(0)
        state = self.init_fn(gi.hp)
        n = jnp.asarray(1, jnp.int32)
        temps = {"chunk": program_temp_bytes(self.chunk_fn.lower(state, gi.hp, self.data, n, gi.twin).compile())}  # type: ignore[attr-defined]
        if self.config.sharpness_every:
            temps["sharpness"] = program_temp_bytes(
                self.sharp_fn.lower(state, gi.hp, self.sharp_data, *self.twin_args(gi)).compile()
            )  # type: ignore[attr-defined]
        if self.curv_fn is not None:
            temps["curvature"] = program_temp_bytes(self.curv_fn.lower(state, gi.hp, self.sharp_data).compile())  # type: ignore[attr-defined]
        return choose_lane_batch(temps, lanes)

    def twin_args(self, gi: GroupInputs) -> tuple[jax.Array, ...]:
        """The sharpness program's arguments after the data: the group's twin indices with ``sharpness_twin_start``."""
        return (gi.twin,) if self.config.sharpness_twin_start else ()

    def measure(self, g: int = 0) -> dict[str, tuple[int, int]]:
        """Compiles group ``g``'s programs and reads their bytes per device: ``{name: (total, shared)}``.

        ``total`` is XLA's memory analysis of the compiled program (arguments + outputs -
        aliased + temporaries; :func:`~eos_jax.train.sizing.program_bytes`) with the data
        that stays on the device throughout the run (training, sharpness and evaluation
        data) counted whether or not the program reads it; ``shared`` is that data, which
        does not grow with the lanes. Measured: the chunk program, and the sharpness
        program when the run tracks sharpness (and the curvature program with ``config.track``). They are lowered from the group's real
        initial state, so the executables compiled here are the ones the run then calls
        (JAX caches the lowering and compilation of an identical call; tested).
        """
        gi = self.inputs(g)
        # The group's real initial state and a chunk length as run_group passes them: lowered from
        # abstract values (no sharding, uncommitted) the programs would differ from the ones the
        # run calls in their sharding annotations and compile a second time.
        state = self.init_fn(gi.hp)
        n = jnp.asarray(1, jnp.int32)
        data_b, sharp_b = tree_bytes(self.data), tree_bytes(self.sharp_data)
        resident = data_b + (sharp_b if self.sharp_data is not self.data else 0) + tree_bytes(self.eval_data)
        chunk = self.chunk_fn.lower(state, gi.hp, self.data, n, gi.twin).compile()  # type: ignore[attr-defined]
        out = {"chunk": (program_bytes(chunk) - data_b + resident, resident)}
        if self.config.sharpness_every:
            sharp = self.sharp_fn.lower(state, gi.hp, self.sharp_data, *self.twin_args(gi)).compile()  # type: ignore[attr-defined]
            out["sharpness"] = (program_bytes(sharp) - sharp_b + resident, resident)
        if self.curv_fn is not None:
            curv = self.curv_fn.lower(state, gi.hp, self.sharp_data).compile()  # type: ignore[attr-defined]
            out["curvature"] = (program_bytes(curv) - sharp_b + resident, resident)
        return out

    def describe_groups(self) -> str:
        """One line: how the lanes were grouped, and the memory estimate when they were sized to it."""
        n, ng = len(self.lanes), len(self.groups)
        if self.lane_estimate is not None:
            line = self.lane_estimate.describe(n, ng)
        else:
            width = max(len(self.padded(g)) for g in range(ng))
            sized = self.sizing is not None and self.sizing.requested_max_lanes is None
            why = "nothing to size" if sized else f"max_lanes={self.config.max_lanes}"
            line = f"lane groups: {n} lane{'s' if n != 1 else ''} in {ng} group{'s' if ng != 1 else ''} of at most {width} ({why})"
        if self.lane_batch_choice is not None and self.lane_batch_choice.lane_batch is not None:
            line += "; " + self.lane_batch_choice.describe()
        return line

    def lane_record(self) -> dict[str, Any]:
        """What ``results.json`` and ``lane_groups.json`` keep of the grouping.

        ``max_lanes`` is the width asked for (None: sized to memory); ``width`` the one used.
        """
        return {
            "width": self.width,
            "num_devices": len(self.devices),
            "groups": [len(g) for g in self.groups],
            "max_lanes": self.sizing.requested_max_lanes if self.sizing is not None else self.config.max_lanes,
            "lane_batch": self.config.lane_batch,
            "lane_batch_auto": self.lane_batch_choice.to_json() if self.lane_batch_choice is not None else None,
            "estimate": self.lane_estimate.to_json() if self.lane_estimate is not None else None,
            "line": self.describe_groups(),
        }

    def _lane_sharding(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("lanes"))

    def place(self, tree: PyTree) -> PyTree:
        """Puts a lane-stacked pytree on the device, or shards its lane axis over the mesh."""
        if self.mesh is None:
            return jax.device_put(tree, self.devices[0])
        return jax.device_put(tree, self._lane_sharding())

    def padded(self, g: int) -> list[Lane]:
        """The lanes of group ``g``, padded to a multiple of the device count."""
        return pad_lanes([self.lanes[i] for i in self.groups[g]], len(self.devices))

    def template(self, g: int) -> PyTree:
        """The abstract state of group ``g`` (shapes, dtypes, sharding): what a checkpoint restores into."""
        shapes = jax.eval_shape(self.init_fn, stack_hparams(self.padded(g), self.dtype))
        if self.mesh is None:
            return shapes
        sharding = self._lane_sharding()
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

    def inputs(self, g: int) -> GroupInputs:
        """The placed hyperparameters and twin indices of group ``g``."""
        idx = self.groups[g]
        glanes = self.padded(g)
        # Twin of each lane as an index into this group (itself when it has none here).
        twin_local = [idx.index(self.twins[i]["lane"]) if self.twins[i]["in_group"] else li for li, i in enumerate(idx)]
        twin_local += list(range(len(idx), len(glanes)))  # padding lanes
        return GroupInputs(
            idx=idx,
            lanes=glanes,
            hp=self.place(stack_hparams(glanes, self.dtype)),
            twin=self.place(jnp.asarray(np.array(twin_local, np.int32))),
            has_twin=np.array([self.twins[i]["in_group"] for i in idx], bool),
        )


def _eig_fn(problem: Problem, config: EngineConfig) -> Any:
    """The run's eigensolver: the problem's own, or the one ``config`` describes."""
    return problem.eig_fn or make_eig_fn(
        config.sharpness_iters, config.sharpness_method, config.sharpness_tol, stop=config.sharpness_stop
    )


@dataclasses.dataclass(frozen=True)
class LaneSizing:
    """A run's lane grouping as plain numbers, and how it was chosen: what :func:`size_lanes` returns.

    Attributes:
      config: the run's config with ``max_lanes`` an integer and ``lane_batch`` an integer or
        None: what :meth:`Plan.build` takes (and a later run may be given, to skip the measuring).
      requested_max_lanes: ``max_lanes`` as asked (None: sized to memory).
      estimate: the memory estimate that chose the width (None: the width was given, or a
        single group of the smallest width left nothing to choose).
      lane_batch_choice: how ``lane_batch="auto"`` was resolved (None: it was given).
      probe: the plan the programs were measured with (its compiled programs are reused by
        :meth:`Plan.build`); None when nothing was measured.

    Examples:
      A grouping given as numbers is the sizing's result as it is (:func:`size_lanes` measures otherwise):

      >>> sized = LaneSizing(EngineConfig(steps=10, max_lanes=4, lane_batch=None), requested_max_lanes=4)
      >>> sized.config.max_lanes, sized.estimate is None
      (4, True)
    """

    config: EngineConfig
    requested_max_lanes: int | None = None
    estimate: LaneEstimate | None = None
    lane_batch_choice: LaneBatchChoice | None = None
    probe: Plan | None = dataclasses.field(default=None, repr=False, compare=False)


def size_lanes(
    problem: Problem,
    lanes: Sequence[Lane],
    config: EngineConfig,
    *,
    dtype: Any = None,
    devices: Sequence[Any] | None = None,
) -> LaneSizing:
    """Resolves ``max_lanes=None`` and ``lane_batch="auto"`` into numbers, measuring the programs when needed.

    ``max_lanes=None``: group 0's chunk (and sharpness) programs are compiled at the width
    :func:`first_width` gives and XLA's memory analysis of them is set against the device's
    free memory (:mod:`eos_jax.train.sizing`); the width shrinks when they do not fit. A
    single group of the smallest width (lanes no more than the devices, or than
    ``lane_multiple``) has nothing to choose and is not measured. ``lane_batch="auto"``:
    :meth:`Plan.choose_lane_batch`. A config whose grouping is already numbers comes back as it is.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, lambda p, b: jnp.sum(b * p["w"] ** 2),
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), jnp.ones((1, 2), jnp.float32))
      >>> sized = size_lanes(problem, tr.make_lanes([0.1, 0.2, 0.3]), tr.EngineConfig(steps=2))
      >>> sized.config.max_lanes, sized.config.lane_batch, sized.estimate.fit >= 3  # all three fit at once
      (3, None, True)
    """
    requested = config.max_lanes
    if requested is not None and config.lane_batch != AUTO_LANE_BATCH:
        return LaneSizing(config, requested)
    devices = list(devices) if devices is not None else jax.devices()
    auto = requested is None
    width = first_width(len(lanes), config, len(devices)) if auto else requested
    first_batch = None if config.lane_batch == AUTO_LANE_BATCH else config.lane_batch
    probe_config = dataclasses.replace(config, max_lanes=width, lane_batch=first_batch)
    probe = Plan.build(problem, lanes, probe_config, dtype=dtype, devices=devices)
    est = None
    if auto and len(lanes) > math.lcm(len(devices), config.lane_multiple):
        est = probe.memory_estimate()
        groups = group_lanes(len(lanes), est.width, len(devices))
        probe = dataclasses.replace(probe, groups=groups, twins=find_twins(lanes, groups), width=est.width)
        width = est.width
    choice = probe.choose_lane_batch() if config.lane_batch == AUTO_LANE_BATCH else None
    lane_batch = choice.lane_batch if choice is not None else config.lane_batch
    sized = dataclasses.replace(config, max_lanes=width, lane_batch=lane_batch)
    return LaneSizing(sized, requested, est, choice, probe)


def build_plan(
    problem: Problem,
    lanes: Sequence[Lane],
    config: EngineConfig,
    *,
    dtype: Any = None,
    devices: Sequence[Any] | None = None,
) -> Plan:
    """:func:`size_lanes`, then :meth:`Plan.build` with its result: what :func:`~eos_jax.train.fit` and
    :func:`~eos_jax.train.train` do with a config that leaves the grouping to be sized.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, lambda p, b: jnp.sum(b * p["w"] ** 2),
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), jnp.ones((1, 2), jnp.float32))
      >>> plan = build_plan(problem, tr.make_lanes([0.1, 0.2]), tr.EngineConfig(steps=2, auto_lane_cap=1))
      >>> plan.groups, plan.config.max_lanes, plan.lane_record()["max_lanes"]  # sized: one lane per group
      ([[0], [1]], 1, None)
    """
    config.validate()
    sizing = size_lanes(problem, lanes, config, dtype=dtype, devices=devices)
    return Plan.build(problem, lanes, sizing.config, dtype=dtype, devices=devices, sizing=sizing)


class LogBlock(NamedTuple):
    """Host values of steps ``start .. start + n - 1`` of one group (its real and padding lanes).

    ``sharpness`` (per lane) belongs to step ``start`` when not None, as do ``evals`` (the
    problem's ``eval_fn``: per name a ``(lanes,)`` array); ``force`` logs every step of the
    block (the final line). ``aux`` holds the values of the problem's ``step_metrics``, each
    ``(lanes, n, ...)`` (``{}`` without them).

    Examples:
      >>> block = LogBlock(0, None, 10, np.zeros((1, 5)), np.ones((1, 5), bool), None, np.zeros((1, 5)), np.zeros((1, 5)))
      >>> block.loss.shape, block.force, block.aux
      ((1, 5), False, {})
    """

    group: int
    inputs: GroupInputs
    start: int
    loss: np.ndarray  # (lanes, n)
    finite: np.ndarray  # (lanes, n) bool
    sharpness: np.ndarray | None  # (lanes,)
    rel_l1: np.ndarray  # (lanes, n)
    rel_l1_ma: np.ndarray  # (lanes, n)
    force: bool = False
    aux: dict[str, np.ndarray] = {}  # never mutated (a shared NamedTuple default)
    evals: dict[str, np.ndarray] | None = None  # (lanes,) per name, at step ``start``
    curvature: dict[str, np.ndarray] | None = None  # EngineConfig.track's values, (lanes, ...) per name, at ``start``


def logged_columns(block: LogBlock, log_every: int) -> list[int]:
    """The columns of ``block`` that get a metrics line: forced, sharpness or eval, or multiples of ``log_every``.

    Examples:
      >>> block = LogBlock(0, None, 10, np.zeros((1, 5)), np.ones((1, 5), bool), None, np.zeros((1, 5)), np.zeros((1, 5)))
      >>> logged_columns(block, log_every=4)  # steps 10..14: 12 is a multiple of 4
      [2]
      >>> logged_columns(block._replace(sharpness=np.ones(1)), log_every=4)  # and the sharpness step
      [0, 2]
    """
    return [
        j
        for j in range(block.loss.shape[1])
        if block.force
        or (j == 0 and (block.sharpness is not None or block.evals is not None or block.curvature is not None))
        or (block.start + j) % log_every == 0
    ]


def normalized_sharpness(learning_rate: float, sharpness: Any) -> float:
    """``lr * lambda_max`` (Section 6) in float64: the learning rate's float64 value times the eigenvalue's.

    Examples:
      >>> normalized_sharpness(0.1, np.float32(20.0))
      2.0
    """
    return float(np.float64(learning_rate) * np.float64(sharpness))


def metric_records(block: LogBlock, log_every: int, threshold: float | Callable[[Lane], float]) -> list[dict[str, Any]]:
    """The metrics lines of ``block``'s logged steps for its real lanes (step-major, then lane).

    Lanes with a k=1 twin in their group get ``rel_l1_to_k1`` and ``rel_l1_to_k1_ma100``;
    the sharpness step gets ``sharpness``, ``normalized_sharpness = lr * sharpness`` (in
    float64) and its ratio to ``threshold`` (a number, or ``Lane -> number``); the eval step gets ``eval`` (the problem's
    ``eval_fn``, name to value), and with ``EngineConfig.track`` the sharpness step gets ``curvature``
    (``trace``, ``trace_stderr``, ``ritz``, ``weights``: numbers or nested lists); with the problem's ``step_metrics``, ``aux`` maps each name
    to the step's value (a number, or a nested list for an array).

    Examples:
      >>> from eos_jax.train import make_lanes
      >>> gi = GroupInputs([0], make_lanes([0.5]), None, None, np.array([False]))
      >>> block = LogBlock(0, gi, 0, np.array([[2.5, 1.0]]), np.ones((1, 2), bool), np.array([4.0]),
      ...                  np.zeros((1, 2)), np.zeros((1, 2)))
      >>> [(r["step"], r["loss"], r["normalized_sharpness"], r["threshold_ratio"])
      ...  for r in metric_records(block, log_every=2, threshold=2.0)]
      [(0, 2.5, 2.0, 1.0)]
    """
    out = []
    gi = block.inputs
    for j in logged_columns(block, log_every):
        step = block.start + j
        has_sharp = block.sharpness is not None and j == 0
        for li, lane_index in enumerate(gi.idx):
            lane = gi.lanes[li]
            rec: dict[str, Any] = {
                "group": block.group,
                "lane": lane_index,
                "step": step,
                "loss": float(block.loss[li, j]),
                "finite": bool(block.finite[li, j]),
                "learning_rate": lane.learning_rate,
                "k": lane.k,
                "seed": lane.seed,
                "init_seed": lane.used_init_seed,
                "weight_decay": lane.weight_decay,
                **dict(lane.hyper),
            }
            if gi.has_twin[li]:
                rec["rel_l1_to_k1"] = float(block.rel_l1[li, j])
                rec[f"rel_l1_to_k1_ma{REL_L1_WINDOW}"] = float(block.rel_l1_ma[li, j])
            if has_sharp:
                lam = float(block.sharpness[li])
                ns = normalized_sharpness(lane.learning_rate, lam)
                rec.update(sharpness=lam, normalized_sharpness=ns, threshold_ratio=ns / lane_threshold(threshold, lane))
            if block.evals is not None and j == 0:
                rec["eval"] = {name: np.asarray(v[li]).tolist() for name, v in block.evals.items()}
            if block.curvature is not None and j == 0:
                rec["curvature"] = {name: np.asarray(v[li]).tolist() for name, v in block.curvature.items()}
            if block.aux:
                rec["aux"] = {name: np.asarray(v[li, j]).tolist() for name, v in block.aux.items()}
            out.append(rec)
    return out


def new_timing() -> dict[str, Any]:
    """The timing record :func:`run_group` adds to (seconds).

    ``compile_and_first_chunk_s`` and ``compile_and_first_sharpness_s`` hold the first call of each
    program (its compilation with it); ``train_s`` and ``sharpness_s`` the calls after it.

    Examples:
      >>> sorted(new_timing())
      ['checkpoint_s', 'compile_and_first_chunk_s', 'compile_and_first_sharpness_s', 'eval_s', 'sharpness_s', 'train_s']
    """
    return {
        "train_s": 0.0,
        "sharpness_s": 0.0,
        "eval_s": 0.0,
        "checkpoint_s": 0.0,
        "compile_and_first_chunk_s": None,
        "compile_and_first_sharpness_s": None,
    }


def _add_time(timing: dict[str, Any], program: str, dt: float) -> None:
    """Adds a call of ``program`` (``"chunk"`` or ``"sharpness"``): its first call (with the compilation) apart.

    Examples:
      >>> t = new_timing()
      >>> for dt in (5.0, 1.0, 1.0):
      ...     _add_time(t, "chunk", dt)
      >>> t["compile_and_first_chunk_s"], t["train_s"]
      (5.0, 2.0)
    """
    first = f"compile_and_first_{program}_s"
    if timing[first] is None:
        timing[first] = dt
    else:
        timing["train_s" if program == "chunk" else "sharpness_s"] += dt


def _curvature_at(
    plan: Plan, gi: GroupInputs, state: TrainState, timing: dict[str, Any]
) -> tuple[TrainState, np.ndarray, dict[str, np.ndarray] | None]:
    """The sharpness of every lane of a group (warm-started: the state keeps the eigenvector) and, with ``config.track``, its trace / density."""
    t0 = time.perf_counter()
    state, lam = plan.sharp_fn(state, gi.hp, plan.sharp_data, *plan.twin_args(gi))
    sharp = np.asarray(to_host(lam))
    _add_time(timing, "sharpness", time.perf_counter() - t0)
    if plan.curv_fn is None:
        return state, sharp, None
    t0 = time.perf_counter()
    curv = {name: np.asarray(v) for name, v in to_host(plan.curv_fn(state, gi.hp, plan.sharp_data)).items()}
    timing["curvature_s"] = timing.get("curvature_s", 0.0) + time.perf_counter() - t0
    return state, sharp, curv


def _chunk_end(plan: Plan, s: int, total: int) -> int:
    """The boundary that ends the chunk starting at ``s``: the next chunk, checkpoint, eval or sharpness step."""
    cfg = plan.config
    evals_every = cfg.eval_every if plan.test_fn is not None else None
    nxt = next_boundary(s, total, (cfg.chunk_steps, cfg.checkpoint_every, evals_every))
    sharp_next = next_sharpness_step(s, cfg.sharpness_every, cfg.sharpness_alternate)
    return nxt if sharp_next is None else min(nxt, sharp_next)


def _final_block(
    plan: Plan,
    g: int,
    gi: GroupInputs,
    s: int,
    state: TrainState,
    pending_sharp: np.ndarray | None,
    pending_eval: dict[str, np.ndarray] | None,
    emit: Callable[[LogBlock], None],
    pending_curv: dict[str, np.ndarray] | None = None,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Emits the last line of group ``g`` (the loss at the final parameters) and returns its end state and statistics."""
    fl, ff, frel, fma, fstats, faux = to_host(plan.final_fn(state, gi.hp, plan.data, gi.twin))
    emit(
        LogBlock(
            g,
            gi,
            s,
            np.asarray(fl)[:, None],
            np.asarray(ff)[:, None],
            pending_sharp,
            np.asarray(frel)[:, None],
            np.asarray(fma)[:, None],
            force=True,
            aux={name: np.asarray(v)[:, None] for name, v in faux.items()},
            evals=pending_eval,
            curvature=pending_curv,
        )
    )
    return state, {k: np.asarray(v) for k, v in fstats.items()}


def run_group(
    plan: Plan,
    g: int,
    state: TrainState | None,
    start: int,
    *,
    emit: Callable[[LogBlock], None],
    save: Callable[[int, int, TrainState], None] | None = None,
    after_chunk: Callable[[int, int, TrainState, float, float | None], None] | None = None,
    timing: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Runs group ``g`` from ``state`` at step ``start`` (``None``: the initial state) to ``config.steps``.

    At each boundary ``s``: ``save(g, s, state)`` when a checkpoint is due (not at
    ``start``), then the sharpness when due (at ``s`` and at the end), then the problem's
    ``eval_fn`` when it has one and it is due (every ``eval_every`` steps, step 0 and the end), then either the
    final line (``s == steps``) or one chunk up to the next boundary. Every chunk's values
    go to ``emit``; ``after_chunk(g, s, state, loss of lane 0, last sharpness of lane 0)``
    runs after each chunk (progress, interrupts: it may raise).

    Returns:
      The final state and the final running loss statistics (host arrays).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> plan = build_plan(problem, tr.make_lanes([0.25]), tr.EngineConfig(steps=2, sharpness_every=None))
      >>> blocks = []
      >>> state, stats = run_group(plan, 0, None, 0, emit=blocks.append)
      >>> [(b.start, b.loss.tolist(), b.force) for b in blocks]  # w <- (1 - 0.25 h) w: a chunk, then the final line
      [(0, [[2.5, 0.28125]], False), (2, [[0.158203125]], True)]
      >>> state.params["w"].tolist()  # (lanes, 2)
      [[0.5625, 0.0]]
    """
    cfg = plan.config
    total = cfg.steps
    timing = new_timing() if timing is None else timing
    gi = plan.inputs(g)
    if state is None:
        state = plan.init_fn(gi.hp)
    s = start
    last_sharp: float | None = None
    pending_sharp: np.ndarray | None = None
    pending_curv: dict[str, np.ndarray] | None = None
    pending_eval: dict[str, np.ndarray] | None = None
    while True:
        # 0. with a stopping rule, the group ends at the first boundary where every lane has stopped or
        # diverged (read from the state, so a run resumed from a checkpoint there ends there too).
        if cfg.has_goal and s < total:
            done = (np.asarray(to_host(state.stop_step)) >= 0) | ~np.asarray(to_host(state.finite))
            if done.all():
                total = s
        # 1. checkpoint the state at boundary s (before its sharpness step).
        if save is not None and s != start and (s == total or (cfg.checkpoint_every and s % cfg.checkpoint_every == 0)):
            t0 = time.perf_counter()
            save(g, s, state)
            timing["checkpoint_s"] += time.perf_counter() - t0
        # 2. sharpness (and the tracked trace / density) at s.
        if cfg.sharpness_every and (sharpness_due(s, cfg.sharpness_every, cfg.sharpness_alternate) or s == total):
            state, pending_sharp, pending_curv = _curvature_at(plan, gi, state, timing)
            last_sharp = float(pending_sharp[0])
        # 3. evaluation at s.
        if plan.test_fn is not None and (s == total or s % (cfg.eval_every or total) == 0):
            t0 = time.perf_counter()
            pending_eval = {name: np.asarray(v) for name, v in to_host(plan.test_fn(state, plan.eval_data)).items()}
            timing["eval_s"] += time.perf_counter() - t0
        if s == total:
            return _final_block(plan, g, gi, s, state, pending_sharp, pending_eval, emit, pending_curv)
        # 4. one chunk.
        nxt = _chunk_end(plan, s, total)
        t0 = time.perf_counter()
        state, met = plan.chunk_fn(state, gi.hp, plan.data, jnp.asarray(nxt - s, jnp.int32), gi.twin)
        met = jax.tree_util.tree_map(lambda a: np.asarray(a)[:, : nxt - s], to_host(met))
        _add_time(timing, "chunk", time.perf_counter() - t0)
        losses = np.asarray(met["loss"])
        emit(
            LogBlock(
                g,
                gi,
                s,
                losses,
                np.asarray(met["finite"]),
                pending_sharp,
                np.asarray(met["rel_l1"]),
                np.asarray(met["rel_l1_ma"]),
                aux={name: np.asarray(v) for name, v in met.get("aux", {}).items()},
                evals=pending_eval,
                curvature=pending_curv,
            )
        )
        pending_sharp = pending_curv = pending_eval = None
        s = nxt
        if after_chunk is not None:
            after_chunk(g, s, state, float(losses[0, -1]), last_sharp)
