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

    Examples:
      >>> import numpy as np
      >>> from eos_jax.io import to_jsonable
      >>> to_jsonable({"lr": np.float32(0.5), "steps": np.int64(3), "loss": [1.0, float("nan")]})
      {'lr': 0.5, 'steps': 3, 'loss': [1.0, None]}
      >>> to_jsonable(np.array([[1, 2], [3, 4]]))
      [[1, 2], [3, 4]]
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
    """Opens a temporary sibling of ``path``; on success fsyncs and renames it over ``path``.

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.io import atomic_open
      >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
      >>> with atomic_open(path) as f:
      ...     _ = f.write("first")
      >>> try:
      ...     with atomic_open(path) as f:
      ...         _ = f.write("second, torn")
      ...         raise RuntimeError("killed half-way")
      ... except RuntimeError:
      ...     pass
      >>> open(path).read(), os.listdir(os.path.dirname(path))  # the old file, no temporary left
      ('first', ['notes.txt'])
    """
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
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_open`); creates parent directories.

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.io import atomic_write_bytes
      >>> path = os.path.join(tempfile.mkdtemp(), "sub", "blob.bin")
      >>> atomic_write_bytes(path, bytes([0, 255]))
      >>> list(open(path, "rb").read())
      [0, 255]
    """
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_open`); creates parent directories.

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.io import atomic_write_text
      >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
      >>> atomic_write_text(path, "lr = 0.1")
      >>> open(path).read()
      'lr = 0.1'
    """
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``to_jsonable(obj)`` as indented JSON (strict: no NaN literals).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.io import atomic_write_json, read_json
      >>> path = os.path.join(tempfile.mkdtemp(), "results.json")
      >>> atomic_write_json(path, {"loss": np.float32(0.25), "sharpness": float("inf")})
      >>> read_json(path)
      {'loss': 0.25, 'sharpness': None}
    """
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Reads one JSON document from ``path``.

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.io import atomic_write_json, read_json
      >>> path = os.path.join(tempfile.mkdtemp(), "config.json")
      >>> atomic_write_json(path, {"steps": 3})
      >>> read_json(path)["steps"]
      3
    """
    with open(path) as f:
        return json.load(f)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Saves a matplotlib figure atomically (format from the suffix of ``path``).

    Examples:
      >>> import os, tempfile
      >>> from matplotlib.figure import Figure
      >>> from eos_jax.io import save_figure
      >>> fig = Figure(figsize=(1, 1))
      >>> _ = fig.add_subplot().plot([0, 1], [1, 0])
      >>> path = os.path.join(tempfile.mkdtemp(), "loss.svg")
      >>> save_figure(fig, path)
      >>> open(path).read().count("<svg") >= 1
      True
    """
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

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.io import open_run_dir
      >>> run = os.path.join(tempfile.mkdtemp(), "run")
      >>> sorted(os.listdir(open_run_dir(run, {"lr": 0.1})))
      ['config.json']
      >>> str(open_run_dir(run, {"lr": 0.1}, resume=True)) == run  # the same config resumes
      True
      >>> open_run_dir(run, {"lr": 0.2})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.RunDirError: run directory .../run holds a run with another config (differs in: lr); choose another run directory
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
