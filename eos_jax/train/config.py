"""What to train and how: :class:`Problem` (model, loss, optimizer, data) and :class:`EngineConfig` (schedule).

The lowest layer of the engine: type aliases and the two frozen configuration records,
no computation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import optax

from eos_jax import optim
from eos_jax.eigen import STOPS
from eos_jax.errors import ConfigError
from eos_jax.train.sizing import AUTO_LANE_BATCH

if TYPE_CHECKING:  # annotation only: state.py imports this module (Problem) at run time
    from eos_jax.train.state import HParams, Lane

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], jax.Array]
# eig_fn(objective, params, batch, v0, key) -> (eigenvalue, eigenvector); must be vmappable
# (no host-side convergence test: a fixed number of iterations or a lax.while_loop).
EigFn = Callable[[LossFn, PyTree, Batch, PyTree, jax.Array], tuple[jax.Array, PyTree]]


@dataclasses.dataclass(frozen=True)
class Problem:
    """What to train, apart from the per-lane hyperparameters.

    Four fields make a problem: ``init_params``, ``loss_fn``, ``make_optimizer`` and ``data``
    (``threshold`` when the optimizer is not gradient descent). The others are optional extras
    a study adds when it needs them: per-step metrics, batch statistics, evaluation on held-out
    data, per-layer RelL1 to the k = 1 twin, a stopping rule's accuracy, augmentation.

    Attributes:
      init_params: ``key -> params`` (pure).
      loss_fn: ``(params, batch) -> scalar`` data loss, a mean over the batch.
      make_optimizer: ``HParams -> optax.GradientTransformation`` (or an
        ``eos_jax.optim`` ``rounding="torch"`` optimizer: steps use ``optim.apply_step``) for one lane; called
        inside vmap with traced values, so it must accept traced lr, k, weight decay. An
        ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``, ``optim_cfl.cfl_scale``) gets
        the step's batch as ``update(..., batch=batch)``.
      data: the training set, a pytree of arrays with a leading example axis.
      threshold: stability threshold of the normalized sharpness ``lr * lambda_max``
        for the optimizer (2 for gradient descent), or ``Lane -> threshold`` when it depends
        on a swept hyperparameter (heavy-ball momentum ``beta``: ``2 + 2 beta``;
        :func:`lane_threshold`).
      l2_weight_decay: the optimizer's weight decay is an L2 term ``wd/2 |p|^2`` added to
        the objective (coupled); the sharpness is then that of ``loss + wd/2 |p|^2``.
      eig_fn: how to compute the top eigenpair; default :func:`eos_jax.train.make_eig_fn`.
      name: for the progress bar and plots.
      step_metrics: optional per-step auxiliary metrics of one lane, ``(params, batch) ->
        dict[str, array]`` at the parameters *before* the step's update, on the step's
        batch (e.g. Table 3's regime fractions of the non-linear PDE). Computed inside the
        scan for every step; each value keeps a fixed shape and dtype. They reach
        ``LogBlock.aux``, :attr:`eos_jax.train.History.aux` and the ``aux`` field of the
        ``metrics.jsonl`` lines. A lane that has become non-finite keeps its frozen
        parameters, so its later values are those of the frozen parameters (mask them with
        ``finite``).
      init_model_state: for models with non-parameter state (batch norm's running
        statistics): ``key -> model_state`` (pure; the lane's init key, as ``init_params``).
        With it, ``loss_fn`` is ``(params, batch, model_state) -> (loss, new_model_state)``
        (train mode: batch statistics, running ones updated); the state rides in
        :attr:`eos_jax.train.TrainState.model_state`, is checkpointed with the rest and, like
        the parameters, keeps its last finite value when a step is not finite. The
        sharpness is that of the train-mode loss at the current ``model_state`` (the
        running statistics are not updated by the Hessian-vector products).
      eval_fn: ``(params, model_state, eval_data) -> dict[str, scalar]``, e.g. test loss and
        accuracy (``model_state`` is ``{}`` without ``init_model_state``; use the running
        statistics: eval mode). Run every ``EngineConfig.eval_every`` steps and at the end;
        the values reach the ``eval`` field of ``metrics.jsonl``, :attr:`History.evals
        <eos_jax.train.History>` and each lane's ``final_eval`` in ``results.json``.
      eval_data: the held-out set ``eval_fn`` receives (a pytree of arrays).
      rel_l1_level: also compute, every step inside the program, the RelL1 of each layer of
        a lane's parameters to its k=1 twin's (the layers of
        :func:`eos_jax.metrics.layer_groups` at this path depth; Figure 3, left). The values
        reach ``aux["rel_l1_layers"]`` (one entry per layer, in ``layer_groups`` order); 0 for
        lanes without a twin in their group. ``None``: only the whole network's RelL1.
      accuracy_fn: ``(params, batch) -> scalar`` accuracy in [0, 1] of the parameters on a
        batch; needed by ``EngineConfig.acc_goal`` only.
      augment: ``(batch, key) -> batch``, applied to every step's batch (after the
        minibatch is selected) with :func:`eos_jax.train.state.augment_key` of the lane's data key
        and the step: pure in (key, step), so resumed runs draw the same augmentations.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> hist = tr.fit(problem, tr.make_lanes([0.25, 0.5]), 2, config=tr.EngineConfig(steps=2, sharpness_every=None))
      >>> hist.loss.tolist()
      [[2.5, 0.28125, 0.158203125], [2.5, 2.125, 2.03125]]
    """

    init_params: Callable[[jax.Array], PyTree]
    loss_fn: LossFn
    make_optimizer: Callable[[HParams], optax.GradientTransformation | optim.TorchRoundedOptimizer]
    data: Batch
    threshold: float | Callable[[Lane], float] = 2.0
    l2_weight_decay: bool = True
    eig_fn: EigFn | None = None
    name: str = ""
    step_metrics: Callable[[PyTree, Batch], dict[str, jax.Array]] | None = None
    init_model_state: Callable[[jax.Array], PyTree] | None = None
    eval_fn: Callable[[PyTree, PyTree, Batch], dict[str, jax.Array]] | None = None
    eval_data: Batch | None = None
    augment: Callable[[Batch, jax.Array], Batch] | None = None
    rel_l1_level: int | None = None
    accuracy_fn: Callable[[PyTree, Batch], jax.Array] | None = None

    def __post_init__(self) -> None:
        if (self.eval_fn is None) != (self.eval_data is None):
            raise ConfigError("Problem: eval_fn and eval_data go together (both or neither)")


def lane_threshold(threshold: float | Callable[[Lane], float], lane: Lane) -> float:
    """The stability threshold of ``lane``: ``threshold`` itself, or its value at the lane.

    Examples:
      >>> from eos_jax.train import Lane
      >>> lane_threshold(2.0, Lane(0.1)), lane_threshold(lambda l: 2 + 2 * dict(l.hyper)["momentum"], Lane(0.1, hyper={"momentum": 0.5}))
      (2.0, 3.0)
    """
    return float(threshold(lane)) if callable(threshold) else float(threshold)


def uniform_threshold(threshold: float | Callable[[Lane], float], lanes: Sequence[Lane]) -> float | None:
    """The threshold shared by every lane, or None when the lanes have different ones.

    Examples:
      >>> from eos_jax.train import make_lanes
      >>> uniform_threshold(2.0, make_lanes([1, 2])), uniform_threshold(lambda l: 2 + 2 * l.hyper[0][1], make_lanes(1, momentum=[0, 0.5]))
      (2.0, None)
    """
    values = {lane_threshold(threshold, l) for l in lanes}
    return values.pop() if len(values) == 1 else None


TRACKED = ("trace", "density")  # what EngineConfig.track may name


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How to run: steps, chunking, logging, sharpness and checkpoint schedule.

    Attributes:
      steps: total optimizer steps (>= 1); None only in a config given to
        :func:`eos_jax.train.fit` together with its ``steps``.
      batch_size: ``None`` for full-batch gradient descent, else minibatch size
        (epochs of a per-epoch permutation from the lane key; the remainder is dropped).
      chunk_steps: steps per ``lax.scan`` (at most; boundaries also fall on the
        other schedules).
      log_every: a metrics line every this many steps (and at every sharpness step).
      sharpness_every: track sharpness every this many steps (``None``: never).
      sharpness_alternate: with an even ``sharpness_every``, every other sample is taken one
        step later (steps 0, 21, 40, 61, ... for 20: :func:`eos_jax.train.core.sharpness_due`),
        so the samples alternate the parity of the step and the high phase of a period-2
        orbit cannot be missed; ``False``: every multiple of ``sharpness_every``, which sees
        only one phase of a period-2 orbit.
      sharpness_iters: eigensolver iterations (Hessian-vector products): exactly this many
        with ``sharpness_tol=None``, at most this many otherwise.
      sharpness_tol: stop the warm-started solver once the quantity ``sharpness_stop`` names
        is at most ``tol * |lambda|``; ``None``: always ``sharpness_iters``. Under vmap the
        lanes' loop runs until every lane has converged, each lane keeping its own converged
        state.
      sharpness_stop: ``"residual"`` (default): the relative residual ``||H v - lambda v||``
        (eigenvalue error at most ``tol * |lambda|``, typically ``(tol * lambda)**2 / gap``);
        warm-started from the previous eigenvector, 1e-3 takes 4.2 products per estimate on the
        main job instead of 20. ``"eigenvalue"`` (Lanczos only): the estimated error of the
        eigenvalue itself (:func:`eos_jax.eigen.ritz_errors`: ``min(r, 4 r**2 / gap)`` with the gap from
        the Ritz values, never below ``r / 5``): 3.6 products per estimate on the main job, with
        every estimate within 0.04 tol of the dense Hessian's top eigenvalue (and within 0.72 tol
        over 785 estimates of three small Edge-of-Stability runs); the eigenvector is less
        accurate (residual up to ``5 * tol * |lambda|``).
      sharpness_twin_start: a lane with a k=1 twin in its group starts its estimate from the
        twin's new eigenvector rather than its own previous one (needs ``lane_batch=1``;
        :func:`eos_jax.train.step.make_sharpness_fn`). ``False`` (default): every lane from its own.
      sharpness_method: ``"lanczos"`` or ``"power"`` (see :func:`eos_jax.train.make_eig_fn`).
      sharpness_examples: sharpness on the first n examples (``None``: full batch;
        for minibatch SGD a fixed subset keeps the cost bounded).
      checkpoint_every: checkpoint every this many steps (``None``: only at the end and
        on SIGINT/SIGTERM).
      max_lanes: lanes per vmapped program; ``None`` (default): sized to memory
        (:mod:`eos_jax.train.sizing`: the compiled programs' bytes per lane against the
        device's free memory), at most ``auto_lane_cap``.
      auto_lane_cap: the automatic width's upper bound (lanes per group).
      lane_multiple: automatic widths are multiples of this (and of the device count):
        e.g. the number of k that must share a group with their k=1 twin.
      lane_memory_fraction: the share of the free memory automatic groups may use.
      checkpoint_keep: committed checkpoints kept per group (>= 2).
      eval_every: run the problem's ``eval_fn`` every this many steps and at the end
        (``None``: at step 0 and at the end only, when the problem has one).
      loss_goal: Cohen et al.'s stopping rule (``src/gd.py``): a lane whose training loss (at
        the parameters before a step) falls below this stops: it takes no more updates and
        records ``stop_step``; a group ends when all its lanes have stopped or diverged, at
        that step (``None``: train every lane for ``steps``).
      acc_goal: likewise, when the training accuracy (``Problem.accuracy_fn``) exceeds this.
      lane_batch: inside a group's program, the training step and the sharpness solver run
        on this many lanes at a time, one batch of lanes after another
        (:func:`eos_jax.train.step.lane_map`); ``None``: all the group's lanes at once;
        ``"auto"`` (default): all at once unless, on one CPU device, that needs more
        temporaries per call than the process keeps between calls (2 GiB), then as many
        as fit (:func:`eos_jax.train.sizing.choose_lane_batch`; the run records the choice
        and a resumed run keeps it). A lane's bits depend on it (compare like with like).
        ``docs/scaling.md`` says when each is faster; ``benchmarks/bench_main.py`` measures them.
      track: curvature beyond the top eigenvalue, measured at every sharpness step of every
        lane (of the same objective): ``"trace"`` (Hutchinson's estimate of ``tr H`` and its
        standard error, :func:`eos_jax.hessian.trace`) and ``"density"`` (stochastic Lanczos
        quadrature, :func:`eos_jax.hessian.density`: Ritz values and Gauss weights per probe,
        from which the eigenvalue density is drawn). Probes come from
        :func:`~eos_jax.train.state.curvature_key` of the lane's data key and step. ``()``: neither.
      trace_probes: Rademacher probes of the trace (one Hessian-vector product each; at least 2).
      density_probes: random starts of the density (``density_steps`` products each).
      density_steps: Lanczos steps per density probe (the Ritz values per probe).

    Examples:
      >>> EngineConfig(steps=100, sharpness_every=None, chunk_steps=25).validate()
      >>> EngineConfig(steps=0).validate()
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: steps=0 is not allowed; expected an integer >= 1
    """

    steps: int | None = None
    batch_size: int | None = None
    chunk_steps: int = 50
    log_every: int = 1
    sharpness_every: int | None = 10
    sharpness_iters: int = 20
    sharpness_alternate: bool = False
    sharpness_method: str = "lanczos"
    sharpness_examples: int | None = None
    sharpness_tol: float | None = 1e-3
    sharpness_stop: str = "residual"
    sharpness_twin_start: bool = False
    checkpoint_every: int | None = 100
    max_lanes: int | None = None
    checkpoint_keep: int = 3
    eval_every: int | None = None
    auto_lane_cap: int = 64
    lane_multiple: int = 1
    lane_memory_fraction: float = 0.75
    lane_batch: int | str | None = AUTO_LANE_BATCH
    loss_goal: float | None = None
    acc_goal: float | None = None
    track: tuple[str, ...] = ()
    trace_probes: int = 8
    density_probes: int = 1
    density_steps: int = 20

    @property
    def has_goal(self) -> bool:
        """Whether a stopping rule is set (``loss_goal`` or ``acc_goal``)."""
        return self.loss_goal is not None or self.acc_goal is not None

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        for name in (
            "steps",
            "chunk_steps",
            "log_every",
            "sharpness_iters",
            "auto_lane_cap",
            "lane_multiple",
            "trace_probes",
            "density_probes",
            "density_steps",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is not allowed; expected an integer >= 1")
        for name in (
            "batch_size",
            "sharpness_every",
            "sharpness_examples",
            "checkpoint_every",
            "eval_every",
            "max_lanes",
            "lane_batch",
        ):
            v = getattr(self, name)
            if name == "lane_batch" and v == AUTO_LANE_BATCH:
                continue
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                also = ", None or 'auto'" if name == "lane_batch" else " or None"
                raise ConfigError(f"{name}={v!r} is not allowed; expected an integer >= 1{also}")
        for name in ("loss_goal", "acc_goal"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"{name}={v!r} is not allowed; expected a finite number or None")
        if self.acc_goal is not None and not 0 <= self.acc_goal < 1:
            raise ConfigError(f"acc_goal={self.acc_goal!r} is not allowed; expected a float in [0, 1)")
        if not isinstance(self.sharpness_alternate, bool):
            raise ConfigError(
                f"sharpness_alternate={self.sharpness_alternate!r} is not allowed; expected True or False"
            )
        tol = self.sharpness_tol
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
            raise ConfigError(f"sharpness_tol={tol!r} is not allowed; expected a float in (0, 1) or None")
        if self.sharpness_method not in ("lanczos", "power"):
            raise ConfigError(f"sharpness_method={self.sharpness_method!r}; allowed: lanczos, power")
        if self.sharpness_stop not in STOPS:
            raise ConfigError(f"sharpness_stop={self.sharpness_stop!r}; allowed: {', '.join(STOPS)}")
        if self.sharpness_stop == "eigenvalue" and self.sharpness_method != "lanczos":
            raise ConfigError(
                "sharpness_stop='eigenvalue' needs sharpness_method='lanczos' (its gap is the Ritz values')"
            )
        if not isinstance(self.sharpness_twin_start, bool):
            raise ConfigError(
                f"sharpness_twin_start={self.sharpness_twin_start!r} is not allowed; expected True or False"
            )
        if self.sharpness_twin_start and self.lane_batch != 1:
            raise ConfigError(
                f"sharpness_twin_start=True needs lane_batch=1 (one lane after another); got lane_batch={self.lane_batch!r}"
            )
        f = self.lane_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"lane_memory_fraction={f!r} is not allowed; expected a float in (0, 1]")
        bad = [t for t in self.track if t not in TRACKED] if isinstance(self.track, tuple) else [self.track]
        if bad:
            raise ConfigError(
                f"track={self.track!r} is not allowed; expected a tuple of names from {', '.join(TRACKED)}"
            )
        if "trace" in self.track and self.trace_probes < 2:
            raise ConfigError(
                f"trace_probes={self.trace_probes} is not allowed; expected >= 2 (a standard error needs two)"
            )
        if self.track and not self.sharpness_every:
            raise ConfigError(
                f"track={self.track!r} needs sharpness_every: trace and density are measured at its steps"
            )
        if self.checkpoint_keep < 2:
            raise ConfigError(f"checkpoint_keep={self.checkpoint_keep}; expected >= 2")
