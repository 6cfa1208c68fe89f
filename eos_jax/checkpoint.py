"""Orbax checkpoints of a training state, verified on restore.

A state pytree is saved as its flat list of leaves (``StandardSave``) next to a small
JSON record (``JsonSave``) holding the step, the number of leaves and the SHA-256
digest (:func:`eos_jax.metrics.tree_digest`) of the saved leaves, and each leaf's shape
and dtype. Restoring goes through a template made with :func:`jax.eval_shape`.

Two failures are told apart:

* **Mismatch**: the record is readable but the saved leaves differ in number, shape or
  dtype from the template (the run was resumed with another lane grouping, device count
  or model). This is the caller's configuration, not damage: :class:`CheckpointMismatchError`
  (an :class:`~eos_jax.errors.EosJaxError`, exit 2 from a CLI) is raised and nothing is
  moved, so the checkpoints stay usable by the run that wrote them.
* **Corruption**: unreadable or truncated files, or arrays whose digest differs from the
  one saved (a checkpoint garbled after it was committed is detected even when the storage
  layer decodes it without complaint). :meth:`CheckpointStore.restore_latest` then falls
  back, with a warning, to the newest earlier checkpoint that verifies.

Half-written checkpoints (a run killed during an asynchronous save) never become
visible: orbax writes into a temporary directory and renames it on commit.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from eos_jax.distributed import barrier, is_primary
from eos_jax.errors import CheckpointMismatchError
from eos_jax.metrics import tree_digest


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be restored or failed its digest check and was skipped.

    Examples:
      >>> import warnings
      >>> from eos_jax.checkpoint import CorruptCheckpointWarning
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     warnings.warn("checkpoint at step 4 is unusable", CorruptCheckpointWarning)
      >>> [w.category.__name__ for w in caught]
      ['CorruptCheckpointWarning']
    """


def _to_record(leaves: list[Any]) -> dict[str, Any]:
    """Flat leaves -> ``{"00000": leaf0, ...}`` (key order is leaf order)."""
    return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}


def leaf_specs(tree: Any) -> list[list[Any]]:
    """``[[shape, dtype name], ...]`` of the leaves of ``tree`` (arrays or ShapeDtypeStructs), JSON-ready.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.checkpoint import leaf_specs
      >>> leaf_specs({"b": jnp.zeros(3), "w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
      [[[3], 'float32'], [[2, 3], 'float32']]
    """
    return [[[int(d) for d in x.shape], str(x.dtype)] for x in jax.tree_util.tree_leaves(tree)]


def describe_mismatch(saved: list[list[Any]], wanted: list[list[Any]]) -> str | None:
    """One phrase naming the first difference between two :func:`leaf_specs`; None when equal.

    Examples:
      >>> from eos_jax.checkpoint import describe_mismatch
      >>> saved = [[[4, 10], "float32"], [[4], "int32"]]  # 4 lanes
      >>> describe_mismatch(saved, [[[2, 10], "float32"], [[2], "int32"]])  # 2 lanes
      "array 0 of shape (4, 10) float32, this run's is (2, 10) float32"
      >>> describe_mismatch(saved, saved) is None
      True
    """
    if len(saved) != len(wanted):
        return f"a state of {len(saved)} arrays, this run's has {len(wanted)}"
    for i, (a, b) in enumerate(zip(saved, wanted)):
        if [list(a[0]), a[1]] != [list(b[0]), b[1]]:
            return f"array {i} of shape {tuple(a[0])} {a[1]}, this run's is {tuple(b[0])} {b[1]}"
    return None


class CheckpointStore:
    """Saves and restores one state pytree (fixed structure) under ``directory``.

    Args:
      directory: where the orbax ``CheckpointManager`` keeps its step directories.
      max_to_keep: how many committed checkpoints are kept (at least 2, so a corrupted
        latest one can fall back to the previous).

    Examples:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> from eos_jax.checkpoint import CheckpointStore
      >>> store = CheckpointStore(tempfile.mkdtemp())
      >>> state = {"step": jnp.int32(3), "w": jnp.arange(4.0)}
      >>> store.save(3, state)
      >>> store.wait()
      >>> store.all_steps()
      [3]
      >>> step, restored = store.restore_latest(state)  # the template: arrays or ShapeDtypeStructs
      >>> step, restored["w"].tolist()
      (3, [0.0, 1.0, 2.0, 3.0])
      >>> store.restore(3, {"step": jnp.int32(3), "w": jnp.arange(5.0)})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.CheckpointMismatchError: checkpoint 3 in ... holds array 1 of shape (4,) float32, this run's is (5,) float32
      >>> store.close()
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        if max_to_keep < 2:
            raise ValueError(f"max_to_keep={max_to_keep}; need >= 2 to fall back past a corrupted checkpoint")
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (re-read from disk)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Starts an asynchronous save of ``state`` at ``step`` (waits for the previous one first)."""
        self._manager.wait_until_finished()
        leaves = jax.tree_util.tree_leaves(state)
        meta = {
            "step": int(step),
            "num_leaves": len(leaves),
            "digest": tree_digest(_to_record(leaves)),
            "leaves": leaf_specs(leaves),
        }
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_to_record(leaves)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of the checkpoint at ``step`` (reads no array).

        Raises:
          Exception: whatever orbax raises for an unreadable record (corruption).
        """
        return dict(self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def check(self, step: int, template: Any) -> None:
        """Raises :class:`CheckpointMismatchError` when the checkpoint at ``step`` holds a state
        of another number, shape or dtype of arrays than ``template``.

        Reads only the JSON record; an unreadable one raises orbax's error (corruption, not a
        mismatch). Records written before shapes were saved are compared by their leaf count.
        """
        meta = self.read_meta(step)
        wanted = leaf_specs(template)
        saved = meta.get("leaves")
        if saved is None:  # an older record: only the number of arrays is known
            why = (
                None
                if meta.get("num_leaves") == len(wanted)
                else (f"a state of {meta.get('num_leaves')} arrays, this run's has {len(wanted)}")
            )
        else:
            why = describe_mismatch(saved, wanted)
        if why is not None:
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} holds {why}", saved=saved, wanted=wanted, difference=why
            )

    def restore(self, step: int, template: Any) -> Any:
        """Restores the checkpoint at ``step`` into the structure of ``template``.

        Args:
          step: a committed step.
          template: a pytree of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``)
            or of arrays, with the structure of the saved state.

        Raises:
          CheckpointMismatchError: the checkpoint holds arrays of another number, shape or dtype.
          ValueError: the restored arrays fail their digest (corruption).
          Exception: whatever orbax raises for unreadable files.
        """
        self.check(step, template)
        leaves, treedef = jax.tree_util.tree_flatten(template)
        abstract = _to_record(
            [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)) for x in leaves]
        )
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        meta, record = out["meta"], out["state"]
        if meta.get("num_leaves") != len(leaves) or int(meta.get("step", -1)) != int(step):
            raise ValueError(f"checkpoint {step}: metadata {meta} does not match a state of {len(leaves)} leaves")
        if tree_digest(record) != meta.get("digest"):
            raise ValueError(f"checkpoint {step}: SHA-256 of the restored arrays differs from the one saved")
        return jax.tree_util.tree_unflatten(treedef, [record[k] for k in sorted(record)])

    def restore_latest(self, template: Any) -> tuple[int, Any] | None:
        """Restores the newest checkpoint that verifies; ``None`` when there is none.

        A checkpoint that cannot be read or fails its digest is skipped with a
        :class:`CorruptCheckpointWarning` and moved aside (renamed ``corrupt-<step>``
        inside :attr:`directory`) so that later saves can reuse its step number.

        Raises:
          CheckpointMismatchError: a checkpoint whose record is readable holds a state of
            another structure or shape than ``template``; raised before anything is moved.
        """
        steps = self.all_steps()
        self.check_all(template, steps)
        for step in reversed(steps):
            try:
                return step, self.restore(step, template)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any other failure means "not usable"
                reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                warnings.warn(
                    f"checkpoint at step {step} in {self.directory} is unusable ({type(e).__name__}: {reason}); "
                    "falling back to the previous one",
                    CorruptCheckpointWarning,
                    stacklevel=2,
                )
                self._quarantine(step)
        return None

    def check_all(self, template: Any, steps: list[int] | None = None) -> None:
        """:meth:`check` on every committed step whose record is readable (unreadable ones are
        left to :meth:`restore_latest`'s fallback); raises on the first mismatch."""
        for step in reversed(self.all_steps() if steps is None else steps):
            try:
                self.read_meta(step)
            except Exception:  # noqa: BLE001 - corruption: not a mismatch
                continue
            self.check(step, template)

    def _quarantine(self, step: int) -> None:
        """Moves a bad step directory out of orbax's view (process 0 moves it; every process waits)."""
        if not is_primary():
            barrier(f"eos_jax.checkpoint.quarantine.{self.directory}.{step}")
            self._manager.reload()
            return
        src = self.directory / str(step)
        dst = self.directory / f"corrupt-{step}"
        n = 0
        while dst.exists():
            n += 1
            dst = self.directory / f"corrupt-{step}.{n}"
        if src.exists():
            shutil.move(str(src), str(dst))
        barrier(f"eos_jax.checkpoint.quarantine.{self.directory}.{step}")
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
