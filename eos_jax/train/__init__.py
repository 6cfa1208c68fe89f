"""The training engine: one state pytree, a pure step, scan-chunked loops, vmapped sweeps.

A run trains one or more *lanes*, each a point of the product of lists of learning
rate, any named hyperparameter (momentum, Adam's ``b2``, ...), perturbation factor k, seed
(batch order), initialization seed (defaults to the seed) and weight decay
(:func:`make_lanes`). All lanes of
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
* :func:`train` is ``fit`` with callbacks: it writes ``metrics.jsonl``, orbax checkpoints and
  (from the ``History``) ``results.json`` into a run directory, redraws a progress bar and reacts to
  SIGINT/SIGTERM (checkpoint, then stop); it resumes bit for bit.

Both run the same compiled programs in the same order, so the same problem, lanes and
config give the same bits. Divergence is a result: a lane that goes non-finite records
the step and keeps its last finite state.

A notebook needs four names: :class:`Problem` (model, loss, optimizer factory, data),
:func:`make_lanes` (the grid), :func:`fit` (schedule keywords such as ``sharpness_every``)
and the :class:`History` it returns::

    problem = train.Problem(init_params, loss_fn, lambda hp: optim.sgd(hp.learning_rate, k=hp.k), data)
    hist = train.fit(problem, train.make_lanes([0.5, 2.0], ks=[1, 3]), 100, sharpness_every=10)

Modules, top-down (each imports only those below it):

* :mod:`~eos_jax.train.loop`: :func:`train` (``fit`` with the run directory, progress and signal
  :class:`Callback` s), :func:`check_resume`.
* :mod:`~eos_jax.train.memory`: :func:`fit`, its :class:`Callback` hooks and the :class:`History`
  (not named ``fit.py``, which the function ``eos_jax.train.fit`` would shadow as a package attribute).
* :mod:`~eos_jax.train.writer`: :class:`~eos_jax.train.writer.RunWriter` (metrics lines,
  checkpoints, results).
* :mod:`~eos_jax.train.core`: lane groups sized to memory as a step of their own
  (:func:`~eos_jax.train.core.size_lanes`), k=1 twins, the compiled :class:`~eos_jax.train.core.Plan`
  and the chunk loop of one group.
* :mod:`~eos_jax.train.step`: the pure step, the scanned chunk, the sharpness function.
* :mod:`~eos_jax.train.sizing`: the memory arithmetic of lane groups (:class:`~eos_jax.train.sizing.LaneEstimate`).
* :mod:`~eos_jax.train.state`: lanes, hyperparameters, :class:`TrainState`, the key tree.
* :mod:`~eos_jax.train.stats`: running loss statistics, RelL1 to the k=1 twin, lane summaries.
* :mod:`~eos_jax.train.config`: :class:`Problem`, :class:`EngineConfig`.
"""

from eos_jax.train.config import EngineConfig, Problem
from eos_jax.train.loop import TrainingInterrupted, check_resume, train
from eos_jax.train.memory import Callback, History, fit
from eos_jax.train.state import HParams, Lane, TrainState, init_state, lane_init_key, make_lanes, stack_hparams
from eos_jax.train.step import make_chunk_fn, make_eig_fn, make_sharpness_fn, make_train_step
from eos_jax.train.writer import read_metrics

# The public surface: what a notebook or an experiment needs. The rest lives in the submodules
# (``eos_jax.train.core.Plan``, ``eos_jax.train.stats.REL_L1_WINDOW``, ``eos_jax.train.step.select_batch``, ...),
# which importing this package loads, so ``train.core.Plan`` reads as well as an import.
__all__ = [
    "Callback",
    "EngineConfig",
    "HParams",
    "History",
    "Lane",
    "Problem",
    "TrainState",
    "TrainingInterrupted",
    "check_resume",
    "fit",
    "init_state",
    "lane_init_key",
    "make_chunk_fn",
    "make_eig_fn",
    "make_lanes",
    "make_sharpness_fn",
    "make_train_step",
    "read_metrics",
    "stack_hparams",
    "train",
]
