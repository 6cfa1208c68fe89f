"""What :func:`eos_jax.train.train` writes into a run directory, and nothing else does.

``metrics.jsonl`` (one JSON line per logged step and lane, appended and fsynced after
every chunk), ``checkpoints/group_NNN`` (verified orbax checkpoints,
:class:`eos_jax.checkpoint.CheckpointStore`) and ``results.json`` (written atomically at
the end). On resume, metrics lines past each group's restored step are dropped, so the
file ends identical to an uninterrupted run's. With several processes only process 0
(``primary``) writes files; every process saves and restores its shards of the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eos_jax import io as eio
from eos_jax.checkpoint import CheckpointStore
from eos_jax.train.config import PyTree
from eos_jax.train.core import LogBlock, metric_records
from eos_jax.train.state import TrainState


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parses metrics.jsonl, dropping a torn last line.

    Examples:
      >>> import os, tempfile
      >>> from pathlib import Path
      >>> from eos_jax.train import read_metrics
      >>> path = Path(tempfile.mkdtemp()) / "metrics.jsonl"
      >>> _ = path.write_text('{"lane": 0, "loss": 1.0, "step": 0}\\n{"lane": 0, "loss": 0.5, "st')  # killed mid-write
      >>> read_metrics(path)
      [{'lane': 0, 'loss': 1.0, 'step': 0}]
    """
    out = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write of a killed run
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def json_line(rec: dict[str, Any]) -> str:
    """One metrics line: sorted keys, no NaN (non-finite values are written as null).

    Examples:
      >>> import numpy as np
      >>> from eos_jax.train.writer import json_line
      >>> json_line({"step": 3, "loss": np.float32(0.25), "sharpness": float("nan")})
      '{"loss": 0.25, "sharpness": null, "step": 3}\\n'
    """
    return json.dumps(eio.to_jsonable(rec), sort_keys=True, allow_nan=False) + "\n"


class RunWriter:
    """The files of one run directory: metrics lines, per-group checkpoint stores, results.

    Args:
      run_dir: an opened run directory (:func:`eos_jax.io.open_run_dir`).
      num_groups: lane groups of the run (one checkpoint store each).
      checkpoint_keep: committed checkpoints kept per group.
      log_every, threshold: what :func:`eos_jax.train.core.metric_records` needs.

    Examples:
      :func:`eos_jax.train.train` drives it; a fresh start, a checkpoint and the results:

      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from eos_jax.train.writer import RunWriter
      >>> w = RunWriter(tempfile.mkdtemp(), num_groups=1, checkpoint_keep=2, log_every=1, threshold=2.0)
      >>> w.start(resume=False, template=None)  # every group starts at step 0
      [0]
      >>> w.save(0, 5, {"w": jnp.ones(2)}); w.wait(0)
      >>> w.restore(0, 5, {"w": jnp.zeros(2)})["w"].tolist()
      [1.0, 1.0]
      >>> w.write_results({"summary": {"num_finite": 1}}); w.close()
      >>> sorted(os.listdir(w.run_dir))
      ['checkpoints', 'metrics.jsonl', 'results.json']
    """

    def __init__(
        self,
        run_dir: Path,
        num_groups: int,
        checkpoint_keep: int,
        log_every: int,
        threshold: float,
        primary: bool = True,
    ):
        self.primary = primary  # writes the files; with several processes every process checkpoints its shards
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.log_every = log_every
        self.threshold = threshold
        self.stores = [
            CheckpointStore(self.run_dir / "checkpoints" / f"group_{g:03d}", max_to_keep=checkpoint_keep)
            for g in range(num_groups)
        ]

    def start(self, resume: bool, template: Callable[[int], PyTree]) -> list[int]:
        """The step each group starts from; truncates metrics.jsonl to match.

        Fresh run: every group starts at 0 and the file is emptied. Resume: each group
        starts at its newest checkpoint that verifies (``template(g)`` is its abstract
        state), and lines at or past it are dropped; ``earlier`` keeps the lines before it.
        """
        self.earlier: list[dict[str, Any]] = []
        if not resume:
            if self.primary:
                eio.atomic_write_text(self.metrics_path, "")
            return [0] * len(self.stores)
        starts = []
        for g, store in enumerate(self.stores):
            got = store.restore_latest(template(g))
            starts.append(got[0] if got is not None else 0)
        kept = [
            r
            for r in read_metrics(self.metrics_path)
            if 0 <= r.get("group", -1) < len(starts) and r.get("step", math.inf) < starts[r["group"]]
        ]
        if self.primary:
            eio.atomic_write_text(self.metrics_path, "".join(json_line(r) for r in kept))
        self.earlier = kept
        return starts

    def restore(self, g: int, step: int, template: PyTree) -> TrainState:
        """Group ``g``'s checkpoint of ``step``, restored into ``template``."""
        return self.stores[g].restore(step, template)

    def save(self, g: int, step: int, state: TrainState) -> None:
        """Starts an (asynchronous) checkpoint of group ``g`` at ``step``."""
        self.stores[g].save(step, state)

    def log(self, block: LogBlock) -> None:
        """Appends the lines of ``block``'s logged steps, then fsyncs."""
        if not self.primary:
            return
        out = [json_line(r) for r in metric_records(block, self.log_every, self.threshold)]
        if not out:
            return
        try:
            with open(self.metrics_path, "a") as f:
                f.write("".join(out))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # name the file (a failed flush does not): the run reports it in one line
            raise OSError(e.errno, e.strerror, str(self.metrics_path)) from e

    def wait(self, g: int) -> None:
        """Waits for group ``g``'s checkpoint saves to commit."""
        self.stores[g].wait()

    def close(self) -> None:
        """Waits for every pending save and closes the stores."""
        for st in self.stores:
            st.close()

    def write_results(self, results: dict[str, Any]) -> None:
        """Atomically writes ``results.json`` (process 0 only)."""
        if self.primary:
            eio.atomic_write_json(self.run_dir / "results.json", results)
