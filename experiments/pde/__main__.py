"""Entry point of ``python -m experiments.pde``: configures the runtime, then runs the command line.

The only place on the PDE side that changes process-wide state: :func:`eos_jax.runtime.configure`
turns x64 on, sets the float32 matmul precision to ``highest`` and adds the deterministic-ops flag
to ``XLA_FLAGS`` before the backend starts. Bad flags: one line on stderr, exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from eos_jax import cli, runtime
from experiments.pde.commands import main


def configured_main(argv: Sequence[str] | None = None) -> int:
    """Sets the runtime (:func:`eos_jax.runtime.configure`) and runs :func:`experiments.pde.commands.main`."""
    runtime.configure()
    return main(argv)


if __name__ == "__main__":
    cli.run(configured_main, prog="python -m experiments.pde")
