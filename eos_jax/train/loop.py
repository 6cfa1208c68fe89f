"""``train()``: every lane of a run to ``config.steps``, into a run directory, interruptible and resumable.

The host loop of :mod:`eos_jax.train.core` with a :class:`~eos_jax.train.writer.RunWriter`
(``metrics.jsonl``, orbax checkpoints, ``results.json``), a progress bar, and SIGINT/SIGTERM
caught while it runs (checkpoint, then :class:`TrainingInterrupted`). For an in-memory run
that writes nothing and touches no signal handler, see :func:`eos_jax.train.fit`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from eos_jax import io as eio
from eos_jax.checkpoint import CheckpointStore
from eos_jax.distributed import any_process, barrier, is_primary
from eos_jax.errors import CheckpointMismatchError, RunWriteError
from eos_jax.progress import ProgressBar
from eos_jax.train.config import EngineConfig, Problem
from eos_jax.train.core import first_width, group_lanes, pad_lanes
from eos_jax.train.memory import Callback, RunStart, _OnChunk, fit
from eos_jax.train.sizing import AUTO_LANE_BATCH
from eos_jax.train.state import Lane, TrainState, hparam_dtype, init_state, stack_hparams
from eos_jax.train.writer import RunWriter


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of ``step`` was saved before stopping.

    Examples:
      >>> import signal
      >>> from pathlib import Path
      >>> from eos_jax.train import TrainingInterrupted
      >>> e = TrainingInterrupted(signal.SIGTERM, 40, Path("runs/toy"))
      >>> print(e)
      SIGTERM at step 40: checkpoint saved in runs/toy; continue with resume=True
      >>> e.step
      40
    """

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum = signum
        self.step = step
        self.run_dir = run_dir
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {run_dir}; continue with resume=True"
        )


class _SignalCatcher:
    """Records SIGINT/SIGTERM instead of raising, while active (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalCatcher:
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


def _saved_lane_count(saved: list | None, wanted: list | None) -> int | None:
    """The lane count of a checkpoint that differs from this run's state ONLY in its lane axis.

    Every saved array must match the wanted one in dtype and in every axis but the first
    (the lanes), and all saved arrays must share one lane count; anything else is another
    model's state (None), whatever the first array's leading axis happens to be.
    """
    if not saved or not wanted or len(saved) != len(wanted):
        return None
    counts = set()
    for (s_shape, s_dtype), (w_shape, w_dtype) in zip(saved, wanted):
        if s_dtype != w_dtype or len(s_shape) != len(w_shape) or not s_shape or list(s_shape[1:]) != list(w_shape[1:]):
            return None
        counts.add(s_shape[0])
    return counts.pop() if len(counts) == 1 else None


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
    them. With ``max_lanes=None`` (groups sized to memory) the width is the one the run
    recorded in ``checkpoints/lane_groups.json`` (:func:`resumed_grouping`).
    Checkpoints whose record cannot be read are left to the corruption fallback of
    :meth:`eos_jax.checkpoint.CheckpointStore.restore_latest`.

    Args:
      problem, lanes, config, dtype, devices: as for :func:`train`.
      run_dir: the run directory to resume.

    Raises:
      CheckpointMismatchError: one line naming the group and what differs (nothing is moved).

    Examples:
      A run whose one group of two lanes was checkpointed, resumed with ``max_lanes=1``:

      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([[1.0], [0.0]])}
      >>> def loss(p, b):  # least squares; the Hessian is 2/N x^T x = diag(1, 4)
      ...     return jnp.mean(jnp.square(b["x"] @ p["w"] - b["y"]))
      >>> problem = tr.Problem(lambda key: {"w": jnp.zeros((2, 1), jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), batch)
      >>> import os, tempfile
      >>> import jax
      >>> from eos_jax.checkpoint import CheckpointStore
      >>> lanes, run_dir = tr.make_lanes([0.1, 0.5]), tempfile.mkdtemp()
      >>> state = jax.jit(jax.vmap(lambda hp: tr.init_state(problem, hp)))(tr.stack_hparams(lanes, jnp.float32))
      >>> store = CheckpointStore(os.path.join(run_dir, "checkpoints", "group_000"))
      >>> store.save(2, state); store.close()
      >>> one = jax.devices()[:1]
      >>> tr.check_resume(problem, lanes, tr.EngineConfig(steps=4), run_dir, devices=one) is None  # fine
      True
      >>> tr.check_resume(problem, lanes, tr.EngineConfig(steps=4, max_lanes=1), run_dir, devices=one)
      ... # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.CheckpointMismatchError: checkpoints/group_000 of ... holds 2 lanes, this run would put 1 there (lanes 0..0 of 2; max_lanes=1, 1 device): resume with the same max_lanes and number of devices as the run that wrote it, or start a new run directory
    """
    devices = list(devices) if devices is not None else jax.devices()
    config = resumed_grouping(config, run_dir, len(devices))  # an automatic grouping: the width the run recorded
    if config.max_lanes is None:
        config = dataclasses.replace(config, max_lanes=first_width(len(lanes), config, len(devices)))
    groups = group_lanes(len(lanes), config.max_lanes, len(devices))
    dtype = hparam_dtype(problem, dtype)
    vinit = jax.vmap(lambda hp: init_state(problem, hp))
    root = Path(run_dir) / "checkpoints"
    how = "resume with the same max_lanes and number of devices as the run that wrote it, or start a new run directory"
    for g, idx in enumerate(groups):
        d = root / f"group_{g:03d}"
        if not d.is_dir():
            continue
        glanes = pad_lanes([lanes[i] for i in idx], len(devices))
        template = jax.eval_shape(vinit, stack_hparams(glanes, dtype))
        store = CheckpointStore(d, max_to_keep=config.checkpoint_keep)
        try:
            store.check_all(template)
        except CheckpointMismatchError as e:
            n_saved = _saved_lane_count(e.saved, e.wanted)
            n_wanted = len(glanes)
            ndev = f"{len(devices)} device{'s' if len(devices) > 1 else ''}"
            padding = f", padded to a multiple of {ndev}" if n_wanted != len(idx) else ""
            if n_saved is not None and n_saved != n_wanted:
                msg = (
                    f"checkpoints/group_{g:03d} of {run_dir} holds {n_saved} lanes, this run would put "
                    f"{n_wanted} there (lanes {idx[0]}..{idx[-1]} of {len(lanes)}{padding}; "
                    f"max_lanes={config.max_lanes}, {ndev}): {how}"
                )
            else:
                msg = (
                    f"checkpoints/group_{g:03d} of {run_dir} holds another model's state ({e.difference}): "
                    "resume with the model that wrote it, or start a new run directory"
                )
            raise CheckpointMismatchError(msg) from None
        finally:
            store.close()
    groups_file = root / LANE_GROUPS_FILE
    if groups_file.is_file():
        # The lanes' bits depend on how many trained at a time (lane_map): a record without the
        # key was written before lane_batch existed, when all lanes of a group trained at once.
        try:
            recorded = json.loads(groups_file.read_text()).get("lane_batch")
        except (ValueError, AttributeError) as e:
            raise CheckpointMismatchError(f"{groups_file} is unreadable ({e}): start a new run directory") from None
        if recorded != config.lane_batch:
            raise CheckpointMismatchError(
                f"{run_dir} was trained with lane_batch={recorded}, this run has lane_batch={config.lane_batch}: "
                "resume with the lane_batch that started it, or start a new run directory"
            )
    extra = sorted(
        p.name
        for p in root.glob("group_*")
        if p.is_dir()
        and p.name[6:].isdigit()
        and int(p.name[6:]) >= len(groups)
        and any(c.name.isdigit() for c in p.iterdir())
    )
    if extra:
        raise CheckpointMismatchError(
            f"checkpoints/{extra[0]} of {run_dir} belongs to a lane group this run does not have ({len(groups)} "
            f"group{'s' if len(groups) > 1 else ''} of at most {config.max_lanes} lanes on {len(devices)} "
            f"device{'s' if len(devices) > 1 else ''}): {how}"
        )


LANE_GROUPS_FILE = "lane_groups.json"


def resumed_grouping(config: EngineConfig, run_dir: str | os.PathLike, num_devices: int | None = None) -> EngineConfig:
    """``config`` with the group width of the run being resumed, when it sized its groups to memory.

    An automatic grouping (``max_lanes=None``) depends on the memory free when the run
    started; a resumed run must regroup its lanes exactly as the checkpoints were written,
    so it takes the width recorded in ``checkpoints/lane_groups.json`` instead of measuring again. An
    explicit ``max_lanes``, a run directory without that file, or a record made on another
    number of devices than ``num_devices`` (when given) is left as it is (:func:`check_resume`
    then says what differs). Likewise ``lane_batch="auto"`` takes the lane batch the run chose.

    Examples:
      >>> import json, tempfile
      >>> from pathlib import Path
      >>> from eos_jax.train import EngineConfig
      >>> run_dir = Path(tempfile.mkdtemp()); (run_dir / "checkpoints").mkdir()
      >>> _ = (run_dir / "checkpoints" / "lane_groups.json").write_text(json.dumps({"width": 4, "num_devices": 1}))
      >>> resumed_grouping(EngineConfig(steps=10), run_dir, 1).max_lanes  # the recorded width
      4
      >>> resumed_grouping(EngineConfig(steps=10, max_lanes=2), run_dir, 1).max_lanes  # set by hand: kept
      2
      >>> resumed_grouping(EngineConfig(steps=10), run_dir, 2).max_lanes is None  # another device count
      True
      >>> resumed_grouping(EngineConfig(steps=10), run_dir, 1).lane_batch is None  # no record: all at once
      True
    """
    path = Path(run_dir) / "checkpoints" / LANE_GROUPS_FILE
    if not path.is_file() or (config.max_lanes is not None and config.lane_batch != AUTO_LANE_BATCH):
        return config
    try:
        rec = json.loads(path.read_text())
        width, devices = int(rec["width"]), int(rec["num_devices"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointMismatchError(f"{path} is unreadable ({e}): start a new run directory") from None
    if config.lane_batch == AUTO_LANE_BATCH:
        # The batch the run chose (a record without the key predates lane_batch: all at once).
        config = dataclasses.replace(config, lane_batch=rec.get("lane_batch"))
    if config.max_lanes is not None or (num_devices is not None and devices != num_devices):
        return config
    return dataclasses.replace(config, max_lanes=width)


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
      lanes: the hyperparameter points (:func:`eos_jax.train.make_lanes`).
      config: the schedule.
      run_dir: an opened run directory (see :func:`eos_jax.io.open_run_dir`).
      resume: continue from the newest valid checkpoint of each group; metrics lines
        past it are dropped so the file ends identical to an uninterrupted run's.
      quiet: no progress bar.
      dtype: None (default): learning rate and weight decay take the parameters' dtype
        (:func:`eos_jax.train.state.hparam_dtype`); a dtype given must be that one (ConfigError otherwise).
      devices: devices to spread the lane axis over (default: all).
      progress_stream: where the progress bar goes (default stderr).
      on_chunk: called with the step reached after each chunk (e.g. to report elsewhere).

    Returns:
      The results dict also written to ``results.json``: per lane its hyperparameters,
      ``finite``/``first_nonfinite_step``, loss and sharpness statistics and the SHA-256
      of its final parameters; a summary over lanes; timings.

    Raises:
      ConfigError: bad config.
      CheckpointMismatchError: ``resume`` with checkpoints of another lane grouping or model.
      TrainingInterrupted: SIGINT/SIGTERM (after saving a checkpoint).

    Examples:
      Two steps of gradient descent into a fresh run directory:

      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([[1.0], [0.0]])}
      >>> def loss(p, b):  # least squares; the Hessian is 2/N x^T x = diag(1, 4)
      ...     return jnp.mean(jnp.square(b["x"] @ p["w"] - b["y"]))
      >>> problem = tr.Problem(lambda key: {"w": jnp.zeros((2, 1), jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), batch)
      >>> import os, tempfile
      >>> from eos_jax.io import open_run_dir
      >>> run_dir = open_run_dir(os.path.join(tempfile.mkdtemp(), "run"), {"lrs": [0.5]})
      >>> config = tr.EngineConfig(steps=2, sharpness_every=None)
      >>> res = tr.train(problem, tr.make_lanes([0.5]), config, run_dir, quiet=True)
      >>> res["lanes"][0]["final_loss"], res["summary"]["num_finite"]
      (0.03125, 1)
      >>> sorted(os.listdir(run_dir)), len(tr.read_metrics(run_dir / "metrics.jsonl"))  # steps 0, 1, 2
      (['checkpoints', 'config.json', 'metrics.jsonl', 'results.json'], 3)
    """
    run_dir = Path(run_dir)
    n_dev = len(devices) if devices is not None else jax.device_count()
    config = resumed_grouping(config, run_dir, n_dev) if resume else config
    primary = is_primary()  # with several processes, process 0 writes the files and the progress
    quiet = quiet or not primary
    rundir = RunDirectory(problem, lanes, run_dir, resume=resume, primary=primary)
    callbacks = [
        Progress(problem.name, enabled=not quiet, stream=progress_stream),
        *([_OnChunk(on_chunk)] if on_chunk is not None else []),
        rundir,
        StopOnSignal(rundir),
    ]
    try:
        history = fit(problem, lanes, config=config, dtype=dtype, devices=devices, callbacks=callbacks)
    except Exception as e:  # a write that failed: one error naming it, the last checkpoint and the remedy
        reason = write_failure(e)
        if reason is None or rundir.writer is None:
            raise
        raise _write_error(e, reason, rundir.writer, run_dir) from e
    rundir.writer.close()
    barrier("eos_jax.train.metrics")  # process 0 has written every metrics line
    timing = {**history.timing, "num_devices": len(rundir.devices), "num_processes": jax.process_count()}
    results = {
        "lanes": list(history.lane_summaries),
        "summary": history.summary,
        "timing": timing,
        "lane_groups": history.lane_groups,
    }
    try:
        rundir.writer.write_results(results)
    except OSError as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise _write_error(e, reason, rundir.writer, run_dir) from e
    return results


class Progress(Callback):
    """:func:`train`'s progress: the lane grouping's line, then a bar over every group's steps.

    Examples:
      >>> import io
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> from eos_jax.train.loop import Progress
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, lambda p, b: jnp.sum(b * p["w"] ** 2),
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), jnp.ones((1, 2), jnp.float32))
      >>> out = io.StringIO()
      >>> _ = tr.fit(problem, tr.make_lanes([0.1]), 4, sharpness_every=None, callbacks=[Progress("toy", enabled=True, stream=out)])
      >>> print(out.getvalue().splitlines()[0])
      lane groups: 1 lane in 1 group of at most 1 (nothing to size)
    """

    def __init__(self, label: str | None, *, enabled: bool, stream: Any = None):
        self.label, self.enabled, self.stream = label, enabled, stream
        self.bar: ProgressBar | None = None
        self.plan: Any = None

    def start(self, plan: Any) -> None:
        self.plan = plan
        if self.enabled:
            print(plan.describe_groups(), file=self.stream if self.stream is not None else sys.stderr, flush=True)
        total = plan.config.steps * len(plan.groups)
        self.bar = ProgressBar(
            total, enabled=self.enabled, stream=self.stream, label=f"{self.label} " if self.label else ""
        )
        return None

    def after_chunk(self, g: int, step: int, state: TrainState, loss: float, sharpness: float | None) -> None:
        n_real = len(self.plan.groups[g])
        self.bar.update(
            g * self.plan.config.steps + step, loss, sharpness, extra=f"lanes {n_real}" if n_real > 1 else ""
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunDirectory(Callback):
    """:func:`train`'s files: ``metrics.jsonl`` lines, orbax checkpoints, the resume point and ``lane_groups.json``.

    On ``start`` a resumed run is checked (:func:`check_resume`: another grouping or model is
    an error, nothing moved) and each group starts from its newest valid checkpoint, the
    metrics lines past it dropped; those before it are the :class:`~eos_jax.train.History`'s
    first part. ``writer`` (a :class:`~eos_jax.train.writer.RunWriter`) exists from then on.

    Examples:
      ``fit`` with it writes what :func:`train` writes but ``results.json``:

      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> from eos_jax.train.loop import RunDirectory
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, lambda p, b: jnp.sum(b * p["w"] ** 2),
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), jnp.ones((1, 2), jnp.float32))
      >>> lanes, run_dir = tr.make_lanes([0.1]), tempfile.mkdtemp()
      >>> rundir = RunDirectory(problem, lanes, run_dir, resume=False, primary=True)
      >>> hist = tr.fit(problem, lanes, 3, sharpness_every=None, callbacks=[rundir]); rundir.writer.close()
      >>> sorted(os.listdir(run_dir)), len(tr.read_metrics(rundir.writer.metrics_path))  # steps 0..3
      (['checkpoints', 'metrics.jsonl'], 4)
    """

    def __init__(self, problem: Problem, lanes: Sequence[Lane], run_dir: Path, *, resume: bool, primary: bool):
        self.problem, self.lanes, self.run_dir = problem, lanes, Path(run_dir)
        self.resume, self.primary = resume, primary
        self.writer: RunWriter | None = None
        self.devices: list[Any] = []

    def start(self, plan: Any) -> RunStart:
        self.devices = plan.devices
        if self.resume:
            # Another lane grouping, device count or model is an error (nothing moved), never a restart.
            config = dataclasses.replace(plan.config, max_lanes=plan.width)
            check_resume(self.problem, self.lanes, config, self.run_dir, dtype=plan.dtype, devices=plan.devices)
        cfg = plan.config
        self.writer = RunWriter(
            self.run_dir,
            len(plan.groups),
            cfg.checkpoint_keep,
            cfg.log_every,
            self.problem.threshold,
            primary=self.primary,
        )
        steps = self.writer.start(self.resume, plan.template)
        groups_file = self.run_dir / "checkpoints" / LANE_GROUPS_FILE
        if self.primary and (not self.resume or not groups_file.is_file()):
            groups_file.parent.mkdir(parents=True, exist_ok=True)
            eio.atomic_write_text(groups_file, json.dumps(plan.lane_record(), indent=1) + "\n")
        return RunStart(steps, self.writer.restore, self.writer.earlier)

    def on_block(self, block: Any) -> None:
        self.writer.log(block)

    def save(self, g: int, step: int, state: TrainState) -> None:
        self.writer.save(g, step, state)

    def group_done(self, g: int) -> None:
        self.writer.wait(g)


class StopOnSignal(Callback):
    """:func:`train`'s SIGINT/SIGTERM handling: after the chunk it arrived in, checkpoint, then :class:`TrainingInterrupted`.

    With several processes, a signal seen by any of them stops them all at the same chunk.
    A second Ctrl-C stops at once (``KeyboardInterrupt``).

    Examples:
      A SIGTERM during the first chunk of a run into a run directory:

      >>> import os, signal, tempfile
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim, train as tr
      >>> from eos_jax.train.loop import RunDirectory, StopOnSignal
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, lambda p, b: jnp.sum(b * p["w"] ** 2),
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), jnp.ones((1, 2), jnp.float32))
      >>> lanes, run_dir = tr.make_lanes([0.1]), tempfile.mkdtemp()
      >>> rundir = RunDirectory(problem, lanes, run_dir, resume=False, primary=True)
      >>> try:
      ...     tr.fit(problem, lanes, 6, sharpness_every=None, chunk_steps=2, callbacks=[rundir, StopOnSignal(rundir)],
      ...            on_chunk=lambda step: os.kill(os.getpid(), signal.SIGTERM))
      ... except tr.TrainingInterrupted as e:
      ...     print(e.step, sorted(os.listdir(os.path.join(run_dir, "checkpoints", "group_000"))))
      2 ['2']
    """

    def __init__(self, rundir: RunDirectory):
        self.rundir = rundir
        self.catcher = _SignalCatcher()
        self.active = False

    def start(self, plan: Any) -> None:
        self.catcher.__enter__()
        self.active = True
        return None

    def after_chunk(self, g: int, step: int, state: TrainState, loss: float, sharpness: float | None) -> None:
        signum = self.catcher.signum
        if any_process(signum is not None):
            self.rundir.writer.save(g, step, state)
            self.rundir.writer.close()  # waits for the save to commit
            raise TrainingInterrupted(signum or signal.SIGTERM, step, self.rundir.run_dir)

    def close(self) -> None:
        if self.active:
            self.catcher.__exit__(None, None, None)
            self.active = False


# What the operating system says when a run's files cannot be written (errno, or the words orbax's
# tensorstore puts in its messages).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
_WRITE_WORDS = ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system")


def write_failure(e: BaseException) -> str | None:
    """The reason a run's write failed (``"No space left on device"``, ...), or None if ``e`` is something else.

    Looks through ``e``'s causes and contexts: orbax re-raises a background thread's failure as
    a ``ValueError`` whose text carries the operating system's words.

    Examples:
      >>> import errno, os
      >>> from eos_jax.train.loop import write_failure
      >>> write_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
      'No space left on device'
      >>> write_failure(ValueError("RESOURCE_EXHAUSTED: ... Failed to write 236 bytes to file 12: No space left on device"))
      'No space left on device'
      >>> write_failure(ValueError("lr must be positive")) is None
      True
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e.strerror or os.strerror(e.errno)
        for words in _WRITE_WORDS:
            if words in str(e):
                return words
        e = e.__cause__ or e.__context__
    return None


def _write_error(e: BaseException, reason: str, writer: RunWriter, run_dir: Path) -> RunWriteError:
    """Waits for the background writes to end (they fail too), then the one error to raise."""
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - the failure being reported, raised again by the pending save
        pass
    what = None
    seen: BaseException | None = e
    while seen is not None and what is None:  # the first named file along the chain
        what = getattr(seen, "filename", None) or _path_in(str(seen))
        seen = seen.__cause__ or seen.__context__
    what = what or str(run_dir)
    last = []
    for store in writer.stores:
        try:
            steps = store.all_steps()
        except Exception:  # noqa: BLE001 - an unreadable directory: no checkpoint to name
            steps = []
        last.append(steps[-1] if steps else None)
    return RunWriteError(str(what), reason, str(run_dir), last)


def _path_in(text: str) -> str | None:
    """The first quoted absolute path in an error message (orbax names the file it failed on)."""
    m = re.search(r'"(/[^"]+)"', text)
    if m is None:
        return None
    path = m.group(1)
    # Name the checkpoint being written, not orbax's temporary file inside it.
    cut = path.find(".orbax-checkpoint-tmp")
    return path[:cut] if cut >= 0 else path
