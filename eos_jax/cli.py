"""Helpers shared by the command-line entry points in ``experiments/``.

Bad input gets one line on stderr naming the bad value and what is allowed, and exit
code 2, never a traceback: :class:`ArgumentParser` does this for argparse errors and
:func:`run` for every :class:`~eos_jax.errors.EosJaxError` raised while validating a
config or opening data and run directories.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from eos_jax.errors import EosJaxError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a positive float") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected a positive, finite float")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a float >= 0") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected a finite float >= 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected an integer >= 1")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected an integer >= 0")
    return value


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, prog: str | None = None) -> NoReturn:
    """Calls ``main(argv)`` and exits; an EosJaxError becomes one line and exit code 2."""
    try:
        code = main(argv)
    except EosJaxError as e:
        name = prog or (sys.argv[0] if sys.argv and sys.argv[0] else "eos_jax")
        msg = str(e).replace("\n", " ")
        print(f"{name}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
