"""Floating-point sensitivity experiments of Section 4 and Appendices B-C.

``python -m experiments.sensitivity`` (:mod:`~experiments.sensitivity.cli`, presets ``paper-*`` and
``cpu``) trains every (batch-order seed, k) of one configuration as lanes of the training engine
(:mod:`~experiments.sensitivity.run`: batch-norm models with running statistics in the state, test
evaluation every epoch, main6.py's step schedule, SGD / momentum / Nesterov / Adam, CIFAR
augmentation) and writes the tables below from that run's numbers.

The tables and measures, pure functions of the runs' results:

* :mod:`~experiments.sensitivity.tables`: Table 1 (and Tables 6-8), final test accuracy over
  seeds x k with the STD over k per seed and over seeds per k (population STD, as the authors'
  scripts/mean_variance.py computes it), Markdown and CSV; Table 1 (right).
* :mod:`~experiments.sensitivity.measures`: RelL1 between the k=1 weights and each other k's,
  for the whole network, per layer and per leaf (Figure 3, left); the relative gradient
  fluctuation of batch selection (footnote 5) beside the floating-point one.
* :mod:`~experiments.sensitivity.determinism`: Appendix B (Tables 4-5), bitwise comparison of
  runs that must be equal (the same configuration twice, k vs 2k and 4k), with ulps and digests.

Nothing in ``eos_jax`` imports this package (tests/test_import_graph.py).
"""

from experiments.sensitivity.determinism import (
    PairRow,
    determinism_markdown,
    determinism_table,
    power_of_two_pairs,
    write_determinism,
)
from experiments.sensitivity.measures import (
    Fluctuation,
    batch_selection_fluctuation,
    float_fluctuation,
    gradient_fluctuation,
    median_over_epochs,
    rel_l1_layers,
    rel_l1_to_k1,
)
from experiments.sensitivity.run import SensitivityConfig, build_problem, load_data, run
from experiments.sensitivity.tables import (
    Table1,
    comparison_markdown,
    final_accuracy,
    markdown_table,
    table1,
    table1_csv,
    table1_grid,
    table1_markdown,
    write_table1,
)

__all__ = [
    "Fluctuation",
    "PairRow",
    "SensitivityConfig",
    "Table1",
    "batch_selection_fluctuation",
    "build_problem",
    "comparison_markdown",
    "determinism_markdown",
    "determinism_table",
    "final_accuracy",
    "float_fluctuation",
    "load_data",
    "gradient_fluctuation",
    "markdown_table",
    "median_over_epochs",
    "power_of_two_pairs",
    "rel_l1_layers",
    "rel_l1_to_k1",
    "run",
    "table1",
    "table1_csv",
    "table1_grid",
    "table1_markdown",
    "write_determinism",
    "write_table1",
]
