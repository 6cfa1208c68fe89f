"""The paper's experiments on top of the ``eos_jax`` library: presets, run directories, findings, plots.

* :mod:`experiments.eos`: the Edge-of-Stability experiments of Section 6 (Figures 7, 8, 9),
  ``python -m experiments.eos``;
* :mod:`experiments.pde`: the PDE experiments of Sections 3, 5 and 6.1, ``python -m experiments.pde``;
* :mod:`experiments.sensitivity`: the floating-point sensitivity experiments of Section 4 and
  Appendices B-C (Tables 1, 4-8, Figure 3 left, footnote 5), ``python -m experiments.sensitivity``;
* :mod:`experiments.lr_threshold`: the learning-rate threshold below which the perturbation is
  attenuated (Figure 3 right, Figure 10), ``python -m experiments.lr_threshold``.

Nothing in ``eos_jax`` imports this package (tests/test_import_graph.py).
"""
