"""Appendix B (Tables 4-5): the only source of variance is the floating-point perturbation.

The paper verifies that "all random seeds ... have been fixed" two ways: the same configuration
run twice with k = 1 gives the same test accuracy at every epoch (Table 4), and k' = k x 2^n
gives the same final test accuracy as k (Table 5), since "multiplying or dividing by the power
of 2 will not introduce floating point arithmetic perturbation". Equal accuracies are a weak
check; here the final parameters are compared bit for bit: :func:`determinism_table` reports for
chosen pairs of runs whether they are bitwise equal, how many elements differ and by how many
units in the last place (:func:`eos_jax.metrics.ulp_diff`), and each run's SHA-256 digest
(:func:`eos_jax.metrics.tree_digest`), so that a run elsewhere can be compared through its log.
:func:`power_of_two_pairs` lists the pairs of Table 5.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from eos_jax.io import atomic_write_text
from eos_jax.metrics import tree_digest, ulp_diff
from experiments.sensitivity.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class PairRow:
    """One compared pair of :func:`determinism_table`.

    Attributes:
      a, b: the run labels.
      equal: bitwise equality of every leaf (``n_diff == 0``; -0.0 vs +0.0 is a difference).
      n_diff: elements whose bits differ.
      n_total: elements compared.
      max_ulp: largest distance in units in the last place (0 when equal).
      digest_a, digest_b: SHA-256 of each run's parameters (:func:`eos_jax.metrics.tree_digest`).
      accuracy_a, accuracy_b: final test accuracies when given (Tables 4-5 report them), else None.

    Examples:
      >>> from experiments.sensitivity.determinism import PairRow
      >>> PairRow("k=1", "k=2", True, 0, 4, 0, "ab", "ab").verdict
      'bitwise equal'
    """

    a: str
    b: str
    equal: bool
    n_diff: int
    n_total: int
    max_ulp: int
    digest_a: str
    digest_b: str
    accuracy_a: float | None = None
    accuracy_b: float | None = None

    @property
    def verdict(self) -> str:
        """``"bitwise equal"`` or ``"differs in N of M elements, max U ulps"``."""
        if self.equal:
            return "bitwise equal"
        return f"differs in {self.n_diff} of {self.n_total} elements, max {self.max_ulp} ulps"


def determinism_table(
    runs: Mapping[str, Any],
    pairs: Sequence[tuple[str, str]],
    accuracy: Mapping[str, float] | None = None,
) -> list[PairRow]:
    """Appendix B, Tables 4-5: bitwise comparison of the final parameters of pairs of runs.

    Args:
      runs: ``{label: final parameter pytree}``, e.g. ``{"k=1": p, "k=1 again": p2, "k=2": p3}``.
      pairs: the ``(label, label)`` pairs to compare, in the order of the table.
      accuracy: optional ``{label: final test accuracy}``, shown beside (Tables 4-5 report them).

    Returns:
      One :class:`PairRow` per pair.

    Raises:
      ValueError: a label not in ``runs``, or two runs of different structure, dtypes or shapes.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.determinism import determinism_table
      >>> w = np.float32([1.0, 2.0, 3.0])
      >>> w3 = w.copy(); w3[2] = np.nextafter(w[2], np.float32(4))  # one ulp up
      >>> runs = {"k=1": {"w": w}, "k=1 again": {"w": w.copy()}, "k=3": {"w": w3}}
      >>> rows = determinism_table(runs, [("k=1", "k=1 again"), ("k=1", "k=3")])
      >>> [(r.a, r.b, r.verdict) for r in rows]
      [('k=1', 'k=1 again', 'bitwise equal'), ('k=1', 'k=3', 'differs in 1 of 3 elements, max 1 ulps')]
      >>> rows[0].digest_a == rows[0].digest_b != rows[1].digest_b
      True
    """
    missing = sorted({x for pair in pairs for x in pair} - set(runs))
    if missing:
        raise ValueError(f"determinism_table: pairs name runs {missing} that are not among {sorted(runs)}")
    accuracy = dict(accuracy or {})
    digests: dict[str, str] = {}
    rows = []
    for a, b in pairs:
        sa, sb = jax.tree_util.tree_structure(runs[a]), jax.tree_util.tree_structure(runs[b])
        if sa != sb:
            raise ValueError(f"determinism_table: runs {a!r} and {b!r} differ in structure: {sa} vs {sb}")
        d = ulp_diff(runs[a], runs[b])
        for label in (a, b):
            if label not in digests:
                digests[label] = tree_digest(runs[label])
        rows.append(
            PairRow(
                a=a,
                b=b,
                equal=d.n_diff == 0,
                n_diff=d.n_diff,
                n_total=d.n_total,
                max_ulp=d.max_ulp,
                digest_a=digests[a],
                digest_b=digests[b],
                accuracy_a=accuracy.get(a),
                accuracy_b=accuracy.get(b),
            )
        )
    return rows


def power_of_two_pairs(ks: Sequence[int]) -> list[tuple[int, int]]:
    """The pairs of Table 5: each k' = m x 2^n (n >= 1) with its odd part m, when m is among ``ks``.

    "for any integer k, results on k' and k will have the same trajectories" (Appendix B).

    Examples:
      >>> from experiments.sensitivity.determinism import power_of_two_pairs
      >>> power_of_two_pairs([1, 3, 2, 4, 6, 12, 10])
      [(1, 2), (1, 4), (3, 6), (3, 12)]
    """
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"power_of_two_pairs: k={k!r}; allowed: integers >= 1")
    present = set(ks)
    out = []
    for k in sorted(present):
        m = k
        while m % 2 == 0:
            m //= 2
        if m != k and m in present:
            out.append((m, k))
    return sorted(out)


def determinism_markdown(rows: Sequence[PairRow], digits: int = 2, digest_chars: int = 16) -> str:
    """Tables 4-5 as Markdown: one line per pair, digests cut to ``digest_chars`` hex digits.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.determinism import determinism_markdown, determinism_table
      >>> w = {"w": np.float32([1.0])}
      >>> rows = determinism_table({"k=1": w, "k=2": w}, [("k=1", "k=2")], accuracy={"k=1": 91.5, "k=2": 91.5})
      >>> print(determinism_markdown(rows, digest_chars=8))  # doctest: +ELLIPSIS
      | run | run | bitwise | differing elements | max ulps | accuracy | accuracy | SHA-256 | SHA-256 |
      |---|---|---|---|---|---|---|---|---|
      | k=1 | k=2 | equal | 0 of 1 | 0 | 91.50 | 91.50 | ... | ... |
    """
    header = ["run", "run", "bitwise", "differing elements", "max ulps", "accuracy", "accuracy", "SHA-256", "SHA-256"]
    body = [
        [
            r.a,
            r.b,
            "equal" if r.equal else "differ",
            f"{r.n_diff} of {r.n_total}",
            r.max_ulp,
            r.accuracy_a,
            r.accuracy_b,
            f"`{r.digest_a[:digest_chars]}`",
            f"`{r.digest_b[:digest_chars]}`",
        ]
        for r in rows
    ]
    return markdown_table(header, body, digits)


def write_determinism(rows: Sequence[PairRow], path: str | os.PathLike, digits: int = 2) -> str:
    """Writes :func:`determinism_markdown` (full digests) to ``path`` atomically; returns the path.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from experiments.sensitivity.determinism import determinism_table, write_determinism
      >>> rows = determinism_table({"a": np.float32([1.0]), "b": np.float32([1.0])}, [("a", "b")])
      >>> path = write_determinism(rows, os.path.join(tempfile.mkdtemp(), "determinism.md"))
      >>> "| a | b | equal | 0 of 1 |" in open(path).read()
      True
    """
    atomic_write_text(path, determinism_markdown(rows, digits, digest_chars=64) + "\n")
    return str(path)
