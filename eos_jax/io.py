"""Atomic files and run directories.

Every file an experiment writes goes through a temporary file in the same directory,
``fsync`` and ``os.replace``: a reader (or a run killed half-way) sees the old file or
the new one, never a torn one. A run directory holds ``config.json``; opening one
with another configuration is an error, so nothing already written is overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eos_jax.errors import RunDirError


def to_jsonable(obj: Any) -> Any:
    """Converts numpy / jax scalars and arrays, tuples and dataclass-like dicts to JSON types.

    Non-finite floats become ``None`` (JSON has no NaN or infinity); a reader treats
    ``null`` in a numeric history as "not finite".
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__array__") and not isinstance(obj, str):
        arr = np.asarray(obj)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    return obj


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Opens a temporary sibling of ``path``; on success fsyncs and renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``to_jsonable(obj)`` as indented JSON (strict: no NaN literals)."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Saves a matplotlib figure atomically (format from the suffix of ``path``)."""
    path = Path(path)
    kwargs.setdefault("dpi", 120)
    kwargs.setdefault("bbox_inches", "tight")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)


def open_run_dir(path: str | os.PathLike, config: dict[str, Any], *, resume: bool = False) -> Path:
    """Creates or reopens a run directory for ``config``.

    * New or empty directory: creates it and writes ``config.json``.
    * ``resume=True``: the directory must hold a ``config.json`` equal to ``config``.
    * An existing ``config.json`` that differs from ``config``: error (nothing written).
    * An existing run of the same config without ``resume``: error, so results are
      never overwritten by accident.

    Raises:
      RunDirError: with a one-line message naming the directory and what to do.
    """
    path = Path(path)
    cfg = to_jsonable(config)
    cfg_file = path / "config.json"
    if cfg_file.exists():
        try:
            old = read_json(cfg_file)
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{cfg_file} is unreadable ({e}); choose another run directory") from None
        if old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise RunDirError(
                f"run directory {path} holds a run with another config (differs in: {', '.join(diff)}); "
                "choose another run directory"
            )
        if not resume:
            raise RunDirError(
                f"run directory {path} already holds this run; pass resume=True to continue it or choose another "
                "run directory"
            )
        return path
    if resume:
        raise RunDirError(f"resume=True: nothing to resume in {path} (no config.json)")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()):
        raise RunDirError(
            f"run directory {path} is a non-empty directory without config.json; choose another run directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_file, cfg)
    return path
