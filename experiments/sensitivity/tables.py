"""Table 1 of Section 4.2 (and Tables 6-8 of Appendix C): final test accuracy over seeds x k.

The paper trains one network per seed (batch order) and per perturbation ``k`` of (PERTURBED SGD)
and reports, in Table 1 (left), the final test accuracy of each, the standard deviation (STD)
over ``k`` for each seed ("The standard deviation for each seed over k is on average ...") and
the STD over seeds for each ``k`` (the batch-selection variability it is compared with, Table 1
right). :func:`table1` computes them from an array ``acc[seed, k]``; :func:`table1_markdown` and
:func:`write_table1` lay them out with the ``k`` as rows, as the paper does ("different floating
point perturbations (rows)"); :func:`comparison_markdown` is Table 1 (right).

Which STD: the paper's text says only "STD is the standard deviation" (Table 1 caption). The
authors' script that "Computes result for Table 1 in section 4.2" (scripts/mean_variance.py of
sunyx523/surprising-instabilities) prints ``np.std(l)``, NumPy's default ``ddof=0``: the
population STD. That is the default here; ``ddof=1`` gives the sample STD. The same script
takes as "final" accuracy the mean over the last ten epochs (``np.mean(loss1[-10:])``, commented
"Compute the average accuracy for last ten epochs"): :func:`final_accuracy`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from eos_jax.io import atomic_write_text

# The authors' scripts/mean_variance.py averages the test accuracy of the last ten epochs.
FINAL_EPOCHS = 10


def final_accuracy(history: Any, last: int = FINAL_EPOCHS) -> np.ndarray:
    """The "final test accuracy" of Table 1: the mean over the last ``last`` epochs.

    Follows the authors' scripts/mean_variance.py (sunyx523/surprising-instabilities), which
    computes Table 1 from ``np.mean(acc[-10:])`` of each run's per-epoch test accuracies; the
    paper's text says "final test accuracies". ``last=1`` gives the last epoch's accuracy.
    Computed in float64.

    Args:
      history: per-epoch accuracies, epochs on the LAST axis (e.g. ``(seeds, k, epochs)``).
      last: how many trailing epochs to average (>= 1, at most the number of epochs).

    Returns:
      ``history`` without its last axis, float64.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.tables import final_accuracy
      >>> final_accuracy(np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 4.0]]), last=2)
      array([25., 3.])
    """
    h = np.asarray(history, dtype=np.float64)
    if h.ndim < 1 or h.shape[-1] == 0:
        raise ValueError(f"final_accuracy: history needs an epoch axis with at least one epoch, got shape {h.shape}")
    if isinstance(last, bool) or not isinstance(last, (int, np.integer)) or not 1 <= last <= h.shape[-1]:
        raise ValueError(f"final_accuracy: last={last!r}; allowed: an integer from 1 to {h.shape[-1]} (the epochs)")
    return h[..., -last:].mean(axis=-1)


@dataclasses.dataclass(frozen=True)
class Table1:
    """Table 1 (left) of Section 4.2, computed by :func:`table1`.

    Attributes:
      acc: ``acc[seed, k]``, final test accuracy in %, float64.
      seeds: seed labels (columns of the laid-out table).
      ks: the k of (PERTURBED SGD) (rows of the laid-out table).
      ddof: 0 (population STD, the paper's) or 1 (sample STD).
      std_over_k: per seed, STD over k (floating-point variability), shape ``(seeds,)``.
      std_over_seeds: per k, STD over seeds (batch-selection variability), shape ``(k,)``.
      mean_over_k: per seed, mean accuracy over k.
      mean_over_seeds: per k, mean accuracy over seeds.
      mean_std_over_k: mean over seeds of ``std_over_k`` (the paper's "on average").
      mean_std_over_seeds: mean over k of ``std_over_seeds``.
      mean: mean of all accuracies.

    Examples:
      >>> from experiments.sensitivity.tables import table1
      >>> t = table1([[90.0, 92.0]], seeds=[0], ks=[1, 3])
      >>> t.std_over_k.tolist(), t.mean
      ([1.0], 91.0)
    """

    acc: np.ndarray
    seeds: tuple[Any, ...]
    ks: tuple[Any, ...]
    ddof: int
    std_over_k: np.ndarray
    std_over_seeds: np.ndarray
    mean_over_k: np.ndarray
    mean_over_seeds: np.ndarray
    mean_std_over_k: float
    mean_std_over_seeds: float
    mean: float

    @property
    def std_name(self) -> str:
        """``"population"`` (ddof=0) or ``"sample"`` (ddof=1)."""
        return "population" if self.ddof == 0 else "sample"


def table1(acc: Any, seeds: Sequence[Any] | None = None, ks: Sequence[Any] | None = None, *, ddof: int = 0) -> Table1:
    """Table 1 (left), Section 4.2: accuracy STD over k per seed and over seeds per k.

    Args:
      acc: ``acc[seed, k]``, final test accuracy in % (seeds x k), finite.
      seeds: labels of the seeds (default ``0 .. seeds-1``).
      ks: the k of each column (default ``1, 3, 5, ...``, the paper's odd k).
      ddof: 0 for the population STD (the default: the authors' scripts/mean_variance.py uses
        ``np.std``, ddof=0; the paper's text only says "STD is the standard deviation"),
        1 for the sample STD.

    Returns:
      A :class:`Table1`, computed in float64.

    Raises:
      ValueError: ``acc`` is not a finite 2-D array, the labels do not match its shape, ``ddof``
        is not 0 or 1, or ``ddof=1`` with a single seed or a single k.

    Examples:
      Two seeds x three k (population STD):

      >>> from experiments.sensitivity.tables import table1
      >>> t = table1([[93.0, 93.5, 92.5], [93.0, 93.0, 93.0]], ks=[1, 3, 5])
      >>> [round(s, 4) for s in t.std_over_k.tolist()], t.std_over_seeds.tolist()
      ([0.4082, 0.0], [0.0, 0.25, 0.25])
      >>> round(t.mean_std_over_k, 4), round(t.mean_std_over_seeds, 4), t.mean
      (0.2041, 0.1667, 93.0)
      >>> table1([[93.0, 93.5, 92.5], [93.0, 93.0, 93.0]], ddof=1).std_over_seeds.tolist()
      [0.0, 0.3535533905932738, 0.3535533905932738]
    """
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"table1: acc must be a non-empty 2-D array acc[seed, k], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(
            f"table1: acc holds non-finite values at (seed, k) indices {np.argwhere(~np.isfinite(a)).tolist()}"
        )
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"table1: ddof={ddof!r}; allowed: 0 (population STD, the paper's) or 1 (sample STD)")
    n_seeds, n_k = a.shape
    seeds = tuple(range(n_seeds)) if seeds is None else tuple(seeds)
    ks = tuple(range(1, 2 * n_k, 2)) if ks is None else tuple(ks)
    if len(seeds) != n_seeds or len(ks) != n_k:
        raise ValueError(f"table1: {len(seeds)} seed labels and {len(ks)} k for acc of shape {a.shape} (seeds x k)")
    if ddof == 1 and min(n_seeds, n_k) < 2:
        raise ValueError(f"table1: ddof=1 (sample STD) needs at least 2 seeds and 2 k, got acc of shape {a.shape}")
    # NumPy's std: sqrt(sum((x - mean)^2) / (n - ddof)), float64 (ddof=1 with n=1 would be 0/0, refused above).
    std_k, std_s = a.std(axis=1, ddof=ddof), a.std(axis=0, ddof=ddof)
    return Table1(
        acc=a,
        seeds=seeds,
        ks=ks,
        ddof=ddof,
        std_over_k=std_k,
        std_over_seeds=std_s,
        mean_over_k=a.mean(axis=1),
        mean_over_seeds=a.mean(axis=0),
        mean_std_over_k=float(std_k.mean()),
        mean_std_over_seeds=float(std_s.mean()),
        mean=float(a.mean()),
    )


def table1_grid(t: Table1) -> tuple[list[str], list[list[Any]]]:
    """Table 1 (left) laid out as the paper's: one row per k, one column per seed.

    Each cell is its row's statistic applied to its column's: the row ``mean over k`` holds the
    mean over k of each column (per seed, and, under ``STD over seeds``, ``mean_std_over_seeds``);
    the row ``STD over k`` holds the STD over k per seed and, under ``mean over seeds``,
    ``mean_std_over_k``. The cell of ``STD over k`` x ``STD over seeds`` is empty (None).

    Returns:
      ``(header, rows)``; numbers are Python floats.

    Examples:
      >>> from experiments.sensitivity.tables import table1, table1_grid
      >>> header, rows = table1_grid(table1([[90.0, 92.0], [91.0, 91.0]], seeds=["a", "b"]))
      >>> header
      ['k', 'seed a', 'seed b', 'mean over seeds', 'STD over seeds']
      >>> rows[0], rows[-1]
      ([1, 90.0, 91.0, 90.5, 0.5], ['STD over k', 1.0, 0.0, 0.5, None])
    """
    header = ["k"] + [f"seed {s}" for s in t.seeds] + ["mean over seeds", "STD over seeds"]
    rows: list[list[Any]] = [
        [k, *t.acc[:, j].tolist(), float(t.mean_over_seeds[j]), float(t.std_over_seeds[j])] for j, k in enumerate(t.ks)
    ]
    rows.append(["mean over k", *t.mean_over_k.tolist(), t.mean, t.mean_std_over_seeds])
    rows.append(["STD over k", *t.std_over_k.tolist(), t.mean_std_over_k, None])
    return header, rows


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub Markdown table; floats with ``digits`` decimals, None as an empty cell.

    Examples:
      >>> from experiments.sensitivity.tables import markdown_table
      >>> print(markdown_table(["k", "acc"], [[1, 93.456], [3, None]]))
      | k | acc |
      |---|---|
      | 1 | 93.46 |
      | 3 |  |
    """

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table1_markdown(t: Table1, digits: int = 2) -> str:
    """Table 1 (left) as Markdown, with a line saying which STD and the two averages.

    Examples:
      >>> from experiments.sensitivity.tables import table1, table1_markdown
      >>> print(table1_markdown(table1([[90.0, 92.0]], ks=[1, 3])))
      | k | seed 0 | mean over seeds | STD over seeds |
      |---|---|---|---|
      | 1 | 90.00 | 90.00 | 0.00 |
      | 3 | 92.00 | 92.00 | 0.00 |
      | mean over k | 91.00 | 91.00 | 0.00 |
      | STD over k | 1.00 | 1.00 |  |
      <BLANKLINE>
      Final test accuracy (%), 1 seeds x 2 k. STD: population (ddof=0). Mean STD over k (floating-point perturbation): 1.00; mean STD over seeds (batch selection): 0.00.
    """
    header, rows = table1_grid(t)
    note = (
        f"Final test accuracy (%), {len(t.seeds)} seeds x {len(t.ks)} k. STD: {t.std_name} (ddof={t.ddof}). "
        f"Mean STD over k (floating-point perturbation): {t.mean_std_over_k:.{digits}f}; "
        f"mean STD over seeds (batch selection): {t.mean_std_over_seeds:.{digits}f}."
    )
    return markdown_table(header, rows, digits) + "\n\n" + note


def table1_csv(t: Table1) -> str:
    """Table 1 (left) as CSV, the grid of :func:`table1_grid` at full precision (``repr`` floats).

    Examples:
      >>> from experiments.sensitivity.tables import table1, table1_csv
      >>> print(table1_csv(table1([[90.0, 92.0]], ks=[1, 3])), end="")
      k,seed 0,mean over seeds,STD over seeds
      1,90.0,90.0,0.0
      3,92.0,92.0,0.0
      mean over k,91.0,91.0,0.0
      STD over k,1.0,1.0,
    """
    header, rows = table1_grid(t)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    # repr of a Python float round-trips exactly (np.float64's repr would read "np.float64(...)").
    w.writerows([["" if v is None else repr(float(v)) if isinstance(v, float) else v for v in row] for row in rows])
    return buf.getvalue()


def write_table1(t: Table1, directory: str | os.PathLike, stem: str = "table1", digits: int = 2) -> list[str]:
    """Writes ``<stem>.md`` and ``<stem>.csv`` atomically (:func:`eos_jax.io.atomic_write_text`).

    Returns:
      The two paths written.

    Examples:
      >>> import os, tempfile
      >>> from experiments.sensitivity.tables import table1, write_table1
      >>> d = tempfile.mkdtemp()
      >>> [os.path.basename(p) for p in write_table1(table1([[90.0, 92.0]]), d)]
      ['table1.md', 'table1.csv']
    """
    md, cs = os.path.join(directory, f"{stem}.md"), os.path.join(directory, f"{stem}.csv")
    atomic_write_text(md, table1_markdown(t, digits) + "\n")
    atomic_write_text(cs, table1_csv(t))
    return [md, cs]


def comparison_markdown(t: Table1, float_fluctuation: float, batch_fluctuation: float, digits: int = 2) -> str:
    """Table 1 (right): gradient error and test-accuracy STD, floating point vs batch selection.

    Args:
      t: the :class:`Table1` of the same runs.
      float_fluctuation: relative gradient error of the floating-point perturbation
        (:func:`experiments.sensitivity.measures.float_fluctuation`, median over epochs).
      batch_fluctuation: relative gradient fluctuation of batch selection (footnote 5,
        :func:`experiments.sensitivity.measures.batch_selection_fluctuation`, median over epochs).

    Examples:
      >>> from experiments.sensitivity.tables import comparison_markdown, table1
      >>> print(comparison_markdown(table1([[90.0, 92.0], [90.0, 91.0]]), 3.1e-8, 0.42))
      | source | relative gradient error | test accuracy STD |
      |---|---|---|
      | floating-point perturbation (STD over k) | 3.1e-08 | 0.75 |
      | batch selection (STD over seeds) | 0.42 | 0.25 |
      <BLANKLINE>
      STD: population (ddof=0), averaged over seeds and over k respectively.
    """
    rows = [
        ["floating-point perturbation (STD over k)", f"{float_fluctuation:.2g}", t.mean_std_over_k],
        ["batch selection (STD over seeds)", f"{batch_fluctuation:.2g}", t.mean_std_over_seeds],
    ]
    table = markdown_table(["source", "relative gradient error", "test accuracy STD"], rows, digits)
    return table + f"\n\nSTD: {t.std_name} (ddof={t.ddof}), averaged over seeds and over k respectively."
