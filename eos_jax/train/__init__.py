"""The training engine: one state pytree, a pure step, scan-chunked loops, vmapped sweeps.

A run trains one or more *lanes*, each a point of the product of lists of learning
rate, perturbation factor k, seed (batch order), initialization seed (defaults to the seed)
and weight decay (:func:`make_lanes`). All lanes of
a group run as one vmapped program; the optimizer is built *inside* the vmapped step
from the lane's traced hyperparameters (:class:`HParams`), so one compilation serves
every learning rate. Groups hold at most ``max_lanes`` lanes, by default as many as fit in
memory (:mod:`~eos_jax.train.sizing`: XLA's memory analysis of the compiled programs
against the device's free memory); with several devices the lane axis is sharded over them.

Steps run in chunks inside :func:`jax.lax.scan`. Between chunks the host tracks the
sharpness (largest algebraic Hessian eigenvalue, warm-started from the eigenvector kept
in the state) and hands the chunk's values to the caller:

* :func:`fit` keeps them in memory and returns a :class:`History` of NumPy arrays; it
  writes no file and installs no signal handler (what a notebook calls).
* :func:`train` writes ``metrics.jsonl``, orbax checkpoints and ``results.json`` into a
  run directory, redraws a progress bar and reacts to SIGINT/SIGTERM (checkpoint, then
  stop); it resumes bit for bit.

Both run the same compiled programs in the same order, so the same problem, lanes and
config give the same bits. Divergence is a result: a lane that goes non-finite records
the step and keeps its last finite state.

Modules, top-down (each imports only those below it):

* :mod:`~eos_jax.train.memory`: :func:`fit` and :class:`History` (in memory; not named ``fit.py``,
  which the function ``eos_jax.train.fit`` would shadow as a package attribute).
* :mod:`~eos_jax.train.loop`: :func:`train`, :func:`check_resume`, the signal catcher.
* :mod:`~eos_jax.train.writer`: :class:`~eos_jax.train.writer.RunWriter` (metrics lines,
  checkpoints, results).
* :mod:`~eos_jax.train.core`: lane groups, k=1 twins, the compiled :class:`~eos_jax.train.core.Plan`
  and the chunk loop of one group, shared by ``fit`` and ``train``.
* :mod:`~eos_jax.train.step`: the pure step, the scanned chunk, the sharpness function.
* :mod:`~eos_jax.train.sizing`: lane groups sized to memory (:class:`~eos_jax.train.sizing.LaneEstimate`).
* :mod:`~eos_jax.train.state`: lanes, hyperparameters, :class:`TrainState`, the key tree.
* :mod:`~eos_jax.train.stats`: running loss statistics, RelL1 to the k=1 twin, lane summaries.
* :mod:`~eos_jax.train.config`: :class:`Problem`, :class:`EngineConfig`.
"""

from eos_jax.train.config import Batch, EigFn, EngineConfig, LossFn, Problem, PyTree
from eos_jax.train.core import Plan, find_twins, group_lanes, run_group
from eos_jax.train.loop import TrainingInterrupted, check_resume, resumed_grouping, train
from eos_jax.train.memory import History, fit
from eos_jax.train.state import (
    STREAM_AUGMENT,
    STREAM_BATCH_ORDER,
    STREAM_SHARPNESS,
    HParams,
    Lane,
    TrainState,
    augment_key,
    batch_order_key,
    hparam_dtype,
    init_state,
    lane_init_key,
    make_lanes,
    sharpness_key,
    stack_hparams,
)
from eos_jax.train.stats import (
    REL_L1_WINDOW,
    SPIKE_REL_INCREASE,
    init_loss_stats,
    loss_stats_reference,
    rel_l1_to_twin,
    summarize_loss_stats,
    update_loss_stats,
)
from eos_jax.train.step import (
    lane_map,
    make_chunk_fn,
    make_eig_fn,
    make_eval_fn,
    make_final_fn,
    make_sharpness_fn,
    make_test_fn,
    make_train_step,
    objective_fn,
    problem_loss,
    select_batch,
    step_batch,
)
from eos_jax.train.writer import read_metrics

__all__ = [
    "Batch",
    "EigFn",
    "EngineConfig",
    "HParams",
    "History",
    "Lane",
    "LossFn",
    "Plan",
    "Problem",
    "PyTree",
    "REL_L1_WINDOW",
    "SPIKE_REL_INCREASE",
    "STREAM_BATCH_ORDER",
    "STREAM_SHARPNESS",
    "STREAM_AUGMENT",
    "TrainState",
    "TrainingInterrupted",
    "batch_order_key",
    "check_resume",
    "resumed_grouping",
    "find_twins",
    "fit",
    "group_lanes",
    "hparam_dtype",
    "init_loss_stats",
    "init_state",
    "lane_init_key",
    "loss_stats_reference",
    "make_chunk_fn",
    "make_eig_fn",
    "make_eval_fn",
    "make_final_fn",
    "make_lanes",
    "lane_map",
    "make_sharpness_fn",
    "make_train_step",
    "make_test_fn",
    "problem_loss",
    "step_batch",
    "objective_fn",
    "read_metrics",
    "rel_l1_to_twin",
    "run_group",
    "select_batch",
    "sharpness_key",
    "augment_key",
    "stack_hparams",
    "summarize_loss_stats",
    "train",
    "update_loss_stats",
]
