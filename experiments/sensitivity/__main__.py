"""Entry point of ``python -m experiments.sensitivity`` (see :mod:`experiments.sensitivity.cli`): bad flags give
one line, exit 2."""

from eos_jax import cli
from experiments.sensitivity.cli import main

if __name__ == "__main__":
    cli.run(main, prog="python -m experiments.sensitivity")
