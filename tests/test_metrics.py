"""Tests of eos_jax.metrics against hand-computed values and constructed float neighbours."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eos_jax.metrics import UlpDiff, rel_l1, rel_l1_per_leaf, tree_digest, ulp_diff


def _hand_example(dtype):
    a = {"w": np.array([1.0, 0.0, -2.0, 3.0], dtype), "b": np.array([0.0, 4.0], dtype)}
    b = {"w": np.array([1.0, 0.0, 2.0, 1.0], dtype), "b": np.array([1.0, 4.0], dtype)}
    # terms |a-b|/(|a|+|b|): w: 0, 0/0 -> 0, 4/4 = 1, 2/4 = 0.5;  b: 1/1 = 1, 0
    # RelL1 = (2/6) * 2.5 = 5/6;  per leaf: w (2/4) * 1.5 = 0.75, b (2/2) * 1 = 1
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rel_l1_hand_computed_with_zeros(dtype):
    a, b = _hand_example(dtype)
    # Every partial sum is exact; only the division by N rounds. XLA turns x / N (a
    # compile-time constant) into x * fl(1/N), so the result is fl(5/6) or a neighbour:
    # measured: eager exactly fl(5/6); under jit 1 ulp off (float32 above, float64 below).
    want = np.array([dtype(5.0) / dtype(6.0)])
    for got in (rel_l1(a, b), jax.jit(rel_l1)(a, b)):
        assert got.dtype == dtype
        assert ulp_diff(np.asarray(got).reshape(1), want).max_ulp <= 1
    per_leaf = rel_l1_per_leaf(a, b)
    assert float(per_leaf["w"]) == 0.75 and float(per_leaf["b"]) == 1.0


def test_rel_l1_bounds_symmetry_and_vmap():
    x = {"p": np.array([1.0, -2.0, 0.5, 0.0], np.float32)}
    assert float(rel_l1(x, x)) == 0.0
    neg = jax.tree_util.tree_map(lambda v: -v, x)
    assert float(rel_l1(x, neg)) == pytest.approx(2.0 * 3 / 4)  # the 0/0 element counts 0
    y = {"p": np.array([3.0, 1.0, 0.25, 0.0], np.float32)}
    assert float(rel_l1(x, y)) == float(rel_l1(y, x))
    batch = jax.vmap(rel_l1, in_axes=(None, 0))(x, {"p": np.stack([x["p"], y["p"]])})
    assert float(batch[0]) == 0.0 and float(batch[1]) == float(rel_l1(x, y))


def test_rel_l1_rejects_mismatched_trees():
    with pytest.raises(ValueError, match="structure"):
        rel_l1({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(ValueError, match="empty"):
        rel_l1({}, {})


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_ulp_diff_on_constructed_neighbours(dtype):
    base = np.array([1.0, -1.0, 3.5, -1e-3, 0.0, 1.0], dtype)
    up = base.copy()
    for _ in range(3):  # three representable steps towards +inf: 3 ulps
        up[0] = np.nextafter(up[0], dtype(np.inf))
    up[1] = np.nextafter(up[1], dtype(-np.inf))  # negative number, 1 ulp away from zero
    up[2] = np.nextafter(np.nextafter(up[2], dtype(0)), dtype(0))  # 2 ulps down
    d = ulp_diff(base, up)
    assert d == UlpDiff(n_diff=3, n_total=6, max_ulp=3)
    assert d.fraction == 0.5
    assert ulp_diff({"x": base}, {"x": base}) == UlpDiff(0, 6, 0)

    # Across zero: the smallest positive and negative subnormals are 2 ulps apart.
    tiny = np.nextafter(dtype(0), dtype(1))
    assert ulp_diff(np.array([tiny]), np.array([-tiny])).max_ulp == 2
    # +0.0 and -0.0: different bits, distance 0.
    assert ulp_diff(np.array([0.0], dtype), np.array([-0.0], dtype)) == UlpDiff(1, 1, 0)
    # Across a binade: 1.0 and its predecessor are one step apart.
    assert ulp_diff(np.array([1.0], dtype), np.array([np.nextafter(dtype(1), dtype(0))])).max_ulp == 1
    # -1 and +1: twice the number of floats in (0, 1].
    n_bits = np.finfo(dtype).bits
    one_bits = int(np.array(1.0, dtype).view(f"u{n_bits // 8}"))
    assert ulp_diff(np.array([-1.0], dtype), np.array([1.0], dtype)).max_ulp == 2 * one_bits


def test_ulp_diff_float64_large_distances_are_exact():
    a = np.array([1.0, 1e300], np.float64)
    b = np.array([2.0, -1e300], np.float64)
    d = ulp_diff(a, b)
    # 1 -> 2 spans one binade: 2**52 floats. +-1e300 spans twice its bit pattern.
    assert d.max_ulp == 2 * int(np.array(1e300).view(np.uint64))
    assert ulp_diff(a[:1], b[:1]).max_ulp == 2**52


def test_ulp_diff_rejects_mismatches():
    with pytest.raises(ValueError, match="float32"):
        ulp_diff(np.zeros(2, np.float32), np.zeros(2, np.float64))
    with pytest.raises(ValueError, match="float type"):
        ulp_diff(np.zeros(2, np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="structure"):
        ulp_diff({"a": np.zeros(1)}, [np.zeros(1)])


def test_tree_digest_sees_one_bit_dtype_shape_and_path():
    tree = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(4, np.float32)}
    ref = tree_digest(tree)
    assert tree_digest(jax.tree_util.tree_map(np.copy, tree)) == ref
    assert tree_digest(jax.tree_util.tree_map(jnp.asarray, tree)) == ref  # device arrays: same bytes

    flipped = {k: v.copy() for k, v in tree.items()}
    bits = flipped["w"].view(np.uint32)
    bits[1, 2] ^= np.uint32(1)  # last mantissa bit of one element
    assert tree_digest(flipped) != ref

    signed = {k: v.copy() for k, v in tree.items()}
    signed["b"][0] = -0.0  # only the sign bit of a zero
    assert tree_digest(signed) != ref

    assert tree_digest({"w": tree["w"].view(np.int32), "b": tree["b"]}) != ref  # same bytes, other dtype
    assert tree_digest({"w": tree["w"].reshape(4, 3), "b": tree["b"]}) != ref  # same bytes, other shape
    assert tree_digest({"v": tree["w"], "b": tree["b"]}) != ref  # same leaves, other key
    assert len(ref) == 64 and int(ref, 16) >= 0
