"""The run directory of a PDE experiment: validate the config, then write ``config.json`` and ``metadata.json``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from eos_jax import io, runtime


def start_run(command: str, config: Any, out_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Validates ``config`` and opens a fresh run directory; changes no process-wide setting.

    Calls ``config.validate()`` (a ConfigError before anything is written), then writes
    ``config.json`` (the dataclass fields plus ``command``) and ``metadata.json`` (versions,
    devices and the numerical settings in force, :func:`eos_jax.runtime.metadata`) atomically.
    The runtime itself is set by the entry point (:mod:`experiments.pde.__main__`).

    Args:
      command: the subcommand name (``"heat"``, ``"linear"``, ...), stored in the config.
      config: a dataclass with a ``validate()`` method.
      out_dir: the run directory (new or empty).

    Returns:
      The run directory and the metadata dict written to it.
    """
    config.validate()
    path = io.open_run_dir(out_dir, {"command": command, **dataclasses.asdict(config)})
    metadata = runtime.metadata()
    io.atomic_write_json(path / "metadata.json", metadata)
    return path, metadata
