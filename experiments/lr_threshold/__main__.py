"""Entry point of ``python -m experiments.lr_threshold`` (see :mod:`experiments.lr_threshold`)."""

from eos_jax import cli
from experiments.lr_threshold import main

if __name__ == "__main__":
    cli.run(main, prog="python -m experiments.lr_threshold")
