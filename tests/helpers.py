"""Small comparison helpers for tests (bitwise and tolerance), instead of a test framework."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from eos_jax.metrics import ulp_diff


def _leaves(a: Any, b: Any):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"tree structures differ: {ta} vs {tb}"
    return [(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)]


def tree_equal_bits(a: Any, b: Any) -> bool:
    """True iff every leaf has the same dtype, shape and raw bytes."""
    for x, y in _leaves(a, b):
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8)):
            return False
    return True


def assert_tree_equal_bits(a: Any, b: Any, msg: str = "") -> None:
    """Asserts bitwise equality; on failure says how many elements differ and by how many ulps."""
    if tree_equal_bits(a, b):
        return
    try:
        d = ulp_diff(a, b)
        detail = f"{d.n_diff}/{d.n_total} elements differ, max {d.max_ulp} ulp"
    except ValueError as e:
        detail = str(e)
    raise AssertionError(f"not bitwise equal: {detail}. {msg}")


def tree_allclose(a: Any, b: Any, *, rtol: float = 1e-7, atol: float = 0.0) -> bool:
    return all(np.allclose(x, y, rtol=rtol, atol=atol) for x, y in _leaves(a, b))


def assert_tree_allclose(a: Any, b: Any, *, rtol: float = 1e-7, atol: float = 0.0, msg: str = "") -> None:
    for i, (x, y) in enumerate(_leaves(a, b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"leaf {i}: {msg}")
