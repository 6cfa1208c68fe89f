"""Edge-of-Stability experiments of Section 6 (Figures 7, 8, 9): loss and sharpness under GD.

Main job (the paper's Figure 7, 3-layer single-channel 3x3 Swish(beta=1) CNN, kernels N(0, 1),
full-batch GD, no weight decay, MNIST digits 0/1, falling back with a warning to Fashion-MNIST 0/1,
then to the Fashion-MNIST 0/1 subset shipped with the package (2000 training images: a fresh
machine needs nothing installed), then scikit-learn's digits 0/1)::

    python -m experiments.eos --layers 3 --lr 5

Defaults: seeds 0-4 with k = 1 and k = 3 as ten lanes of one sweep, 200 full-batch GD steps on
the first 2000 training examples (or all of a smaller dataset, with a warning; an explicit
``--num-examples`` larger than the dataset is an error), the sharpness (warm-started Lanczos to
1e-3) every 20 steps with every other sample one step later, a checkpoint every 100 steps. The
summary gives each seed's regime (:func:`eos_jax.stability.regime`), the counts per regime and
RelL1(k=1, k=3) per seed, and says which seeds amplified the last-bit perturbation. Sweeps:
``--lr 1 2 5 --seed 0 1`` runs the product of the lists as one vmapped program. ``--loss-goal`` /
``--acc-goal`` stop each lane at Cohen et al.'s goal. Presets reproduce the figures, printing
what they found::

    python -m experiments.eos --preset fig7     # 1 vs 3 layers, lr 1 2 5 and above, seeds 0-4
    python -m experiments.eos --preset fig8     # fc-tanh 2 vs 4 layers, 2000 steps; lr 2/150 on CIFAR-5k, 2/30 on fallbacks
    python -m experiments.eos --preset fig9     # wd 5e-4, 1 vs 2 layers, lr sweep -> stability boundary per seed
    python -m experiments.eos --preset fig7-readings  # Figure 7 under init x loss readings, seeds 0-4

Figures 7 and 9 take their learning rates from 2/lambda_max at initialization, measured on the
data found (recorded with the rule in preset.json); ``--lr`` overrides that.

Interrupt with Ctrl-C (or SIGTERM): a checkpoint is written; ``--resume`` (with the same flags,
and ``--out`` or the latest matching run under runs/eos/) continues it, ending bitwise equal to
an uninterrupted run.

Modules: :mod:`~experiments.eos.config` (EosConfig, data, problem), :mod:`~experiments.eos.runner`
(one run), :mod:`~experiments.eos.presets` (Figures 7, 8, 9), :mod:`~experiments.eos.readings`
(``fig7-readings``), :mod:`~experiments.eos.rundir` (run directories), :mod:`~experiments.eos.cli`
(the flags). The stability criterion and the regimes are library code: :mod:`eos_jax.stability`.
The names below are re-exported so that ``from experiments import eos; eos.run(...)`` works.
"""

from eos_jax.stability import (
    CRITERION,
    EDGE_FRACTION,
    REGIMES,
    STABLE_MAX_REL_INCREASE,
    is_stable,
    regime,
    stability_boundary,
)
from experiments.eos.cli import build_parser, main, overrides_from_args
from experiments.eos.config import (
    BINARY_HEADS,
    DEFAULT_DATASETS,
    FIG7_PAPER_LRS,
    INITS,
    LOSSES,
    MODELS,
    POOLS,
    EosConfig,
    build_problem,
    default_config,
    load_data,
)
from experiments.eos.presets import (
    FIG8_DEFAULT_LR,
    FIG8_LR_REASON,
    FIG8_LRS,
    PRESET_SEEDS,
    PRESETS,
    Preset,
    ceil_125,
    format_findings,
    initial_sharpness,
    run_preset,
    series_125,
)
from experiments.eos.readings import (
    PRESET_READINGS,
    READINGS,
    READINGS_SEEDS,
    READINGS_SHARPNESS_EVERY,
    READINGS_STEPS,
    choose_reading,
    format_readings,
    matches_paper_fig7,
    reading_name,
    run_readings,
)
from experiments.eos.rundir import checked_out, find_run, resolve_out
from experiments.eos.runner import format_summary, run

__all__ = [
    "CRITERION",
    "EDGE_FRACTION",
    "STABLE_MAX_REL_INCREASE",
    "is_stable",
    "regime",
    "REGIMES",
    "stability_boundary",
    "build_parser",
    "main",
    "overrides_from_args",
    "BINARY_HEADS",
    "DEFAULT_DATASETS",
    "FIG7_PAPER_LRS",
    "INITS",
    "LOSSES",
    "MODELS",
    "POOLS",
    "EosConfig",
    "build_problem",
    "default_config",
    "load_data",
    "FIG8_DEFAULT_LR",
    "FIG8_LR_REASON",
    "FIG8_LRS",
    "PRESET_SEEDS",
    "PRESETS",
    "Preset",
    "ceil_125",
    "format_findings",
    "initial_sharpness",
    "run_preset",
    "series_125",
    "PRESET_READINGS",
    "READINGS",
    "READINGS_SEEDS",
    "READINGS_SHARPNESS_EVERY",
    "READINGS_STEPS",
    "choose_reading",
    "format_readings",
    "matches_paper_fig7",
    "reading_name",
    "run_readings",
    "checked_out",
    "find_run",
    "resolve_out",
    "format_summary",
    "run",
]
