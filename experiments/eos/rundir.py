"""Run directories of ``experiments.eos``: ``--out``, or a fresh ``runs/eos/<UTC time>-<hash>``, or the
latest matching run to ``--resume``, refused before anything is written when unusable."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from eos_jax import io as eio
from eos_jax.errors import RunDirError


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def find_run(runs_root: str | Path, config: dict[str, Any]) -> Path:
    """The latest run directory under ``runs_root`` whose config.json equals ``config``.

    Raises:
      RunDirError: there is none (``--resume`` with nothing to resume).
    """
    root = Path(runs_root)
    cfg = eio.to_jsonable(config)
    found = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            f = d / "config.json"
            if f.is_file():
                try:
                    if eio.read_json(f) == cfg:
                        found.append(d)
                except (OSError, json.JSONDecodeError):
                    continue
    if not found:
        raise RunDirError(f"--resume: no run under {root} has this config; start it without --resume or pass --out")
    return found[-1]


def checked_out(out: str | Path | None, runs_root: str | Path, config: dict[str, Any], tag: str, resume: bool) -> Path:
    """:func:`resolve_out`, refusing (before anything is written) a ``--resume`` with nothing to resume and a
    fresh start over an existing run directory (the one-line error of :func:`eos_jax.io.open_run_dir`)."""
    run_dir = resolve_out(out, runs_root, config, tag, resume)
    if resume and not (run_dir / "config.json").exists():
        raise RunDirError(f"--resume: nothing to resume in {run_dir} (no config.json)")
    if not resume and (run_dir / "config.json").exists():
        eio.open_run_dir(run_dir, config, resume=False)  # raises the right one-line error
    return run_dir


def resolve_out(out: str | Path | None, runs_root: str | Path, config: dict[str, Any], tag: str, resume: bool) -> Path:
    """``--out`` as given; else the latest matching run (resume) or ``runs_root/<UTC>-<tag>``."""
    if out is not None:
        return Path(out)
    if resume:
        return find_run(runs_root, config)
    return Path(runs_root) / f"{_utc_stamp()}-{tag}"
