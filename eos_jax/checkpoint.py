"""Orbax checkpoints of a training state, verified on restore.

A state pytree is saved as its flat list of leaves (``StandardSave``) next to a small
JSON record (``JsonSave``) holding the step, the number of leaves and the SHA-256
digest (:func:`eos_jax.metrics.tree_digest`) of the saved leaves. Restoring goes
through a template made with :func:`jax.eval_shape` and checks the digest, so a
checkpoint whose files were truncated or garbled after it was committed is detected
even when the storage layer decodes it without complaint. :meth:`CheckpointStore.restore_latest`
then falls back, with a warning, to the newest earlier checkpoint that verifies.

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

from eos_jax.metrics import tree_digest


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be restored or failed its digest check and was skipped."""


def _to_record(leaves: list[Any]) -> dict[str, Any]:
    """Flat leaves -> ``{"00000": leaf0, ...}`` (key order is leaf order)."""
    return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}


class CheckpointStore:
    """Saves and restores one state pytree (fixed structure) under ``directory``.

    Args:
      directory: where the orbax ``CheckpointManager`` keeps its step directories.
      max_to_keep: how many committed checkpoints are kept (at least 2, so a corrupted
        latest one can fall back to the previous).
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
        meta = {"step": int(step), "num_leaves": len(leaves), "digest": tree_digest(_to_record(leaves))}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_to_record(leaves)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def restore(self, step: int, template: Any) -> Any:
        """Restores the checkpoint at ``step`` into the structure of ``template``.

        Args:
          step: a committed step.
          template: a pytree of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``)
            or of arrays, with the structure of the saved state.

        Raises:
          ValueError: the checkpoint does not match the template or fails its digest.
          Exception: whatever orbax raises for unreadable files.
        """
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
        """
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, template)
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                warnings.warn(
                    f"checkpoint at step {step} in {self.directory} is unusable ({type(e).__name__}: {reason}); "
                    "falling back to the previous one",
                    CorruptCheckpointWarning,
                    stacklevel=2,
                )
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        """Moves a bad step directory out of orbax's view."""
        src = self.directory / str(step)
        dst = self.directory / f"corrupt-{step}"
        n = 0
        while dst.exists():
            n += 1
            dst = self.directory / f"corrupt-{step}.{n}"
        if src.exists():
            shutil.move(str(src), str(dst))
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
