"""Predicting the regime before training: ``python -m experiments.predict {cnn,pde,cfl,agreement}``.

``pde``: Table 3's bounds against the simulated non-linear one-layer PDE (9)
(:mod:`experiments.predict.pde`). ``cnn``: the classical bound along a short probe, the
per-layer bounds and the verdict of :mod:`eos_jax.predict` against one vmapped sweep of the
training engine on the paper's CNN (:mod:`experiments.predict.cnn`). Each writes
``results.json`` and ``predict.png`` into a new run directory. ``cfl``: the adaptive step
:func:`eos_jax.optim.cfl_scale` against plain GD and a global cap (:mod:`experiments.predict.cfl`).
``agreement``: several ``cnn`` runs on disjoint seeds, measurement against measurement and the
best per-configuration prediction (:mod:`experiments.predict.agreement`).
"""

from experiments.predict.commands import main

__all__ = ["main"]
