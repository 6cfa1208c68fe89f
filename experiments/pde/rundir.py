"""The run directory of a PDE experiment: validate the config, then write ``config.json`` and ``metadata.json``.

With several processes (``jax.distributed``) every process checks the directory and only
process 0 (:func:`eos_jax.distributed.is_primary`) writes: :func:`start_run` opens it, and each
experiment writes its results and plots under ``if distributed.is_primary()``; the other
processes compute the same results and return them without writing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from eos_jax import distributed, io, runtime


def start_run(command: str, config: Any, out_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Validates ``config`` and opens a fresh run directory; changes no process-wide setting.

    Calls ``config.validate()`` (a ConfigError before anything is written), then writes
    ``config.json`` (the dataclass fields plus ``command``) and ``metadata.json`` (versions,
    devices and the numerical settings in force, :func:`eos_jax.runtime.metadata`) atomically.
    The runtime itself is set by the entry point (:mod:`experiments.pde.__main__`).

    Several processes: every process checks the directory first, so a used one (not empty)
    is refused by all of them with the same one-line error before anything is written; then
    process 0 writes, and the others go on without waiting (none of them reads the directory).

    Args:
      command: the subcommand name (``"heat"``, ``"linear"``, ...), stored in the config.
      config: a dataclass with a ``validate()`` method.
      out_dir: the run directory (new or empty).

    Returns:
      The run directory and the metadata dict written to it.

    Raises:
      ConfigError: ``config.validate()``.
      RunDirError: the directory is used (:func:`eos_jax.io.open_run_dir`'s message).
    """
    config.validate()
    cfg = {"command": command, **dataclasses.asdict(config)}
    path = Path(out_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        io.open_run_dir(path, cfg)  # a used directory: raises its one-line error, writes nothing
    distributed.barrier("experiments.pde.checked")  # every process checked before process 0 writes
    metadata = runtime.metadata()
    if distributed.is_primary():
        path = io.open_run_dir(path, cfg)
        io.atomic_write_json(path / "metadata.json", metadata)
    return path, metadata
