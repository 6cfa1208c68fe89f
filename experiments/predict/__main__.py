"""Entry point of ``python -m experiments.predict``: configures the runtime after parsing, then runs."""

from __future__ import annotations

from collections.abc import Sequence

from eos_jax import cli, runtime
from experiments.predict.commands import main


def configured_main(argv: Sequence[str] | None = None) -> int:
    """Runs :func:`experiments.predict.commands.main` with :func:`eos_jax.runtime.configure` as its setup."""
    return main(argv, configure=runtime.configure)


if __name__ == "__main__":
    cli.run(configured_main, prog="python -m experiments.predict")
