"""Entry point of ``python -m experiments.eos`` (see :mod:`experiments.eos`): bad flags give one line, exit 2.

:func:`experiments.eos.cli.main` configures the runtime (x64, matmul precision, deterministic
GPU ops) before any array exists, then runs the command.
"""

from eos_jax import cli
from experiments.eos.cli import main

if __name__ == "__main__":
    cli.run(main, prog="python -m experiments.eos")
