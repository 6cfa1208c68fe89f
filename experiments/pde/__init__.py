"""PDE stability toolkit: heat, Beltrami, linearized and non-linear CNN gradient-descent PDEs.

The experiments of the paper's PDE side. The maths (operators, schemes, bounds, closed forms,
regime classifiers, simulations) lives in :mod:`eos_jax.pde`; each experiment here holds its
presets, run directory, findings (``note:`` lines) and plots: :mod:`experiments.pde.heat`,
:mod:`~experiments.pde.beltrami`, :mod:`~experiments.pde.linear`,
:mod:`~experiments.pde.nonlinear` (with ``nonlinear_notes`` and ``nonlinear_plots``). Each
subcommand (:mod:`experiments.pde.commands`) parses its flags into a frozen dataclass config
and calls the experiment's ``run_*(config, out_dir)``, which writes the run directory
(``config.json``, ``metadata.json``, ``results.json``, plots) atomically, then prints a short
summary. Only the entry point :mod:`experiments.pde.__main__` configures the runtime (x64,
matmul precision, deterministic GPU ops). Every subcommand also runs over several processes
joined by ``jax.distributed`` (``--coordinator HOST:PORT --num-processes N --process-id I``):
``nonlinear``'s lanes are sharded over all their devices, the rest runs in each, process 0
writes (:mod:`experiments.pde.commands`).

Commands (their run times are in ``docs/claims.md``):

  python -m experiments.pde heat --out runs/heat                      # Eq. (2), Figure 1
  python -m experiments.pde beltrami --out runs/beltrami              # Eq. (4), Figure 2
  python -m experiments.pde linear --kernel 16 32 64 --scheme gd --dt 1e-8 --a -0.5 --beta 1 \
      --out runs/linear_gd                                            # Eqs. (10)-(14), Table 2, Figure 4
  python -m experiments.pde linear --kernel 16 32 64 --scheme nesterov --dt 1e-4 --a -0.5 --beta 1 \
      --out runs/linear_nesterov                                      # Eqs. (16)-(18), Table 9 (momentum 0.9)
  python -m experiments.pde nonlinear --dt 0.01 0.03 0.05 0.07 0.09 0.11 --steps 2000 \
      --out runs/nonlinear                                            # Eq. (9), Figures 5-6

Findings are printed as ``note:`` lines and stored in ``results.json`` (``notes``); each is
computed from that run's numbers and shows the comparison it rests on (e.g. closed form vs
power iteration, bisection vs spectrum, the classification vs the closed-form threshold).

Pooling: ``nonlinear --pool mean`` (default) averages over the output positions as the
authors' ``single_layer/PySun.py`` does (``sum`` is the alternative); ``linear`` defaults to
the authors' ``single_layer/linear.py``: ``--pool sum`` (data term summed over positions) and
``--ibar mean`` (see :mod:`eos_jax.pde.linear`).

Bad flags (a non-positive dt or kernel size, an unknown scheme) give one line on
stderr and exit code 2.
"""

from experiments.pde.commands import main

__all__ = ["main"]
