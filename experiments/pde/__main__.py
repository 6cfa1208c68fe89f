"""Entry point of ``python -m experiments.pde``: parses the command line, joins the other processes, configures the runtime, runs.

The only place on the PDE side that changes process-wide state: :func:`eos_jax.runtime.configure`
turns x64 on, sets the float32 matmul precision to ``highest`` and adds the deterministic-ops flag
to ``XLA_FLAGS`` before the backend starts. With the coordinator flags (``--coordinator HOST:PORT
--num-processes N --process-id I``) the process first joins the others through ``jax.distributed``,
which must precede the backend too: :func:`experiments.pde.commands.main` parses the flags, joins,
then calls ``configure``. Bad flags: one line on stderr, exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from eos_jax import cli, runtime
from experiments.pde.commands import main


def configured_main(argv: Sequence[str] | None = None) -> int:
    """Runs :func:`experiments.pde.commands.main` with the runtime set (:func:`eos_jax.runtime.configure`) after the join."""
    return main(argv, configure=runtime.configure)


if __name__ == "__main__":
    cli.run(configured_main, prog="python -m experiments.pde")
