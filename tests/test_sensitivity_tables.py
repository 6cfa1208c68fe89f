"""Tables and measures of Section 4 / Appendix B (experiments.sensitivity), against independent references.

Table 1 against the standard library's ``statistics`` (population and sample STD); RelL1 per
layer against a hand computation in exact fractions; the determinism table against floats
built ``np.nextafter`` steps apart; footnote 5's fluctuation against a NumPy float64 recomputation.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from fractions import Fraction

import numpy as np
import pytest

from eos_jax.errors import ConfigError
from eos_jax.metrics import layer_groups, tree_digest
from experiments.sensitivity import determinism as det
from experiments.sensitivity import measures as ms
from experiments.sensitivity import tables as tb

# acc[seed, k]: 3 seeds x 4 k, hand-made, every row and column with a non-zero spread.
ACC = [[92.31, 92.87, 93.05, 92.44], [93.12, 92.58, 92.96, 93.40], [92.77, 93.21, 92.49, 92.90]]


# ------------------------------------------------------------------------------------------
# Table 1


@pytest.mark.parametrize("ddof, stdev", [(0, statistics.pstdev), (1, statistics.stdev)], ids=["population", "sample"])
def test_table1_against_statistics(ddof, stdev):
    t = tb.table1(ACC, seeds=[7, 8, 9], ks=[1, 3, 5, 7], ddof=ddof)
    cols = [list(c) for c in zip(*ACC)]
    assert t.std_over_k.tolist() == pytest.approx([stdev(r) for r in ACC], rel=1e-12)
    assert t.std_over_seeds.tolist() == pytest.approx([stdev(c) for c in cols], rel=1e-12)
    assert t.mean_over_k.tolist() == pytest.approx([statistics.fmean(r) for r in ACC], rel=1e-15)
    assert t.mean_over_seeds.tolist() == pytest.approx([statistics.fmean(c) for c in cols], rel=1e-15)
    assert t.mean_std_over_k == pytest.approx(statistics.fmean(stdev(r) for r in ACC), rel=1e-12)
    assert t.mean_std_over_seeds == pytest.approx(statistics.fmean(stdev(c) for c in cols), rel=1e-12)
    assert t.mean == pytest.approx(statistics.fmean(v for r in ACC for v in r), rel=1e-15)
    assert t.std_name == ("population" if ddof == 0 else "sample")


def test_table1_default_is_population_not_sample():
    """Fails if ddof=0 and ddof=1 are swapped: two values 90, 92 have population STD 1 and sample STD sqrt(2)."""
    t = tb.table1([[90.0, 92.0], [90.0, 90.0]])
    assert t.ddof == 0
    assert t.std_over_k.tolist() == [1.0, 0.0]
    assert t.std_over_seeds.tolist() == [0.0, 1.0]
    s = tb.table1([[90.0, 92.0], [90.0, 90.0]], ddof=1)
    assert s.std_over_k.tolist() == pytest.approx([2**0.5, 0.0], rel=1e-15)
    for r in ACC:  # and on the hand-made table, where the two differ in every row
        assert statistics.pstdev(r) != pytest.approx(statistics.stdev(r), rel=1e-6)
    assert tb.table1(ACC).std_over_k.tolist() != pytest.approx([statistics.stdev(r) for r in ACC], rel=1e-6)
    assert "STD: population (ddof=0)" in tb.table1_markdown(tb.table1(ACC))
    assert "STD: sample (ddof=1)" in tb.table1_markdown(tb.table1(ACC, ddof=1))


def test_table1_grid_csv_and_markdown():
    t = tb.table1(ACC, seeds=[7, 8, 9], ks=[1, 3, 5, 7])
    rows = list(csv.reader(io.StringIO(tb.table1_csv(t))))
    assert rows[0] == ["k", "seed 7", "seed 8", "seed 9", "mean over seeds", "STD over seeds"]
    assert [r[0] for r in rows[1:]] == ["1", "3", "5", "7", "mean over k", "STD over k"]
    # k as rows, seeds as columns (the paper's layout); the CSV holds floats at full precision
    for j in range(4):
        assert [float(v) for v in rows[1 + j][1:4]] == [ACC[s][j] for s in range(3)]
        assert float(rows[1 + j][5]) == t.std_over_seeds[j]
    assert [float(v) for v in rows[5][1:4]] == t.mean_over_k.tolist()
    assert float(rows[5][4]) == t.mean and float(rows[5][5]) == t.mean_std_over_seeds
    assert [float(v) for v in rows[6][1:4]] == t.std_over_k.tolist()
    assert float(rows[6][4]) == t.mean_std_over_k and rows[6][5] == ""
    md = tb.table1_markdown(t).splitlines()
    assert md[0] == "| k | seed 7 | seed 8 | seed 9 | mean over seeds | STD over seeds |"
    assert md[2].startswith("| 1 | 92.31 | 93.12 | 92.77 | ")
    assert f"{t.mean_std_over_k:.2f}" in md[-1] and f"{t.mean_std_over_seeds:.2f}" in md[-1]


def test_write_table1_replaces_atomically(tmp_path):
    (tmp_path / "table1.md").write_text("old")
    paths = tb.write_table1(tb.table1(ACC), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["table1.csv", "table1.md"]  # no temporary left
    assert open(paths[0]).read() == tb.table1_markdown(tb.table1(ACC)) + "\n"
    assert open(paths[1]).read() == tb.table1_csv(tb.table1(ACC))


@pytest.mark.parametrize(
    "acc, kwargs, match",
    [
        ([90.0, 91.0], {}, "2-D"),
        ([[90.0, float("nan")]], {}, r"non-finite values at \(seed, k\) indices \[\[0, 1\]\]"),
        ([[90.0, 91.0]], {"ddof": 2}, "ddof=2"),
        ([[90.0, 91.0]], {"ddof": True}, "ddof=True"),
        ([[90.0, 91.0]], {"ddof": 1}, "needs at least 2 seeds"),
        ([[90.0, 91.0]], {"ks": [1, 3, 5]}, "3 k for acc of shape"),
    ],
)
def test_table1_rejects_bad_input(acc, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tb.table1(acc, **kwargs)


def test_final_accuracy_is_the_mean_of_the_last_epochs():
    hist = np.arange(2 * 3 * 12, dtype=np.float32).reshape(2, 3, 12) / 7
    got = tb.final_accuracy(hist)
    assert got.shape == (2, 3) and got.dtype == np.float64
    want = [[statistics.fmean(float(v) for v in hist[s, j, -10:]) for j in range(3)] for s in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert tb.final_accuracy(hist, last=1).tolist() == hist[..., -1].astype(np.float64).tolist()
    for bad in (0, 13, 2.0):
        with pytest.raises(ValueError, match=f"last={bad!r}"):
            tb.final_accuracy(hist, last=bad)


# ------------------------------------------------------------------------------------------
# RelL1, whole network and per layer (Figure 3, left)

_A = {
    "conv1": {"kernel": [1.0, -2.0, 0.0, 4.0], "bias": [0.5, 0.0]},
    "conv2": {"kernel": [3.0, 3.0, -1.0]},
    "dense": {"kernel": [2.0, 1.0], "bias": [0.0]},
}
_B = {
    "conv1": {"kernel": [1.0, 2.0, 0.0, 3.0], "bias": [1.5, 0.0]},
    "conv2": {"kernel": [3.0, 1.0, -2.0]},
    "dense": {"kernel": [2.0, 0.5], "bias": [0.25]},
}


def _frac_rel_l1(pairs):
    """(2/N) sum |a-b|/(|a|+|b|) in exact fractions, 0/0 = 0."""
    terms = [
        Fraction(abs(Fraction(a) - Fraction(b))) / (abs(Fraction(a)) + abs(Fraction(b))) if a or b else Fraction(0)
        for a, b in pairs
    ]
    return 2 * sum(terms) / len(terms)


def _as(tree, dtype):
    return {m: {n: np.array(v, dtype) for n, v in d.items()} for m, d in tree.items()}


def test_rel_l1_layers_against_hand_computation():
    r = ms.rel_l1_layers(_as(_A, np.float64), _as(_B, np.float64))
    leaf_pairs = {
        f"['{m}']['{n}']": list(zip(_A[m][n], _B[m][n])) for m in sorted(_A) for n in sorted(_A[m])
    }  # tree order: sorted keys
    assert list(r["leaves"]) == list(leaf_pairs)
    for name, pairs in leaf_pairs.items():
        assert r["leaves"][name] == pytest.approx(float(_frac_rel_l1(pairs)), rel=1e-15, abs=0)
    assert list(r["layers"]) == ["['conv1']", "['conv2']", "['dense']"]
    for m in _A:
        pairs = [p for n in sorted(_A[m]) for p in zip(_A[m][n], _B[m][n])]
        assert r["layers"][f"['{m}']"] == pytest.approx(float(_frac_rel_l1(pairs)), rel=1e-15, abs=0)
    everything = [p for ps in leaf_pairs.values() for p in ps]
    assert r["network"] == pytest.approx(float(_frac_rel_l1(everything)), rel=1e-15, abs=0)
    # a layer is rel_l1 of its elements, not the mean of its leaves' values (23/42 vs (4/7 + 1/2) / 2)
    assert r["layers"]["['conv1']"] == pytest.approx(23 / 42, rel=1e-15)
    assert r["layers"]["['conv1']"] != pytest.approx(
        (r["leaves"]["['conv1']['bias']"] + r["leaves"]["['conv1']['kernel']"]) / 2, rel=1e-3
    )
    # float32 (the models' dtype), level 2: one layer per leaf
    r2 = ms.rel_l1_layers(_as(_A, np.float32), _as(_B, np.float32), level=2)
    assert r2["layers"] == r2["leaves"]
    assert r2["leaves"] == pytest.approx(r["leaves"], rel=1e-6)
    assert r2["network"] == pytest.approx(r["network"], rel=1e-6)


def test_rel_l1_layers_order_groups_and_errors():
    a = [np.float32([1.0 + i]) for i in range(12)]  # list params: "[10]" sorts before "[2]"
    b = [np.float32([1.0 + i + (i == 2)]) for i in range(12)]
    r = ms.rel_l1_layers(a, b)
    assert list(r["layers"]) == [f"[{i}]" for i in range(12)] == list(layer_groups(a))
    assert r["layers"]["[2]"] == pytest.approx(2 * 1 / 7, rel=1e-6) and r["layers"]["[10]"] == 0.0
    one = {"net": _as(_A, np.float32)}
    r1 = ms.rel_l1_layers(one, {"net": _as(_B, np.float32)})
    assert r1["layers"]["['net']"] == r1["network"]  # the same computation, bit for bit
    with pytest.raises(ValueError, match="differ in structure"):
        ms.rel_l1_layers({"w": np.float32([1.0])}, {"v": np.float32([1.0])})
    with pytest.raises(ConfigError, match="level must be an integer >= 1"):
        ms.rel_l1_layers(a, b, level=0)


def test_rel_l1_to_k1():
    p1 = _as(_A, np.float64)
    r = ms.rel_l1_to_k1({1: p1, 2: _as(_A, np.float64), 3: _as(_B, np.float64)})
    assert list(r) == [2, 3]
    assert r[2]["network"] == 0.0 and set(r[2]["layers"].values()) == {0.0}
    assert r[3] == ms.rel_l1_layers(p1, _as(_B, np.float64))
    with pytest.raises(ValueError, match="no k=1"):
        ms.rel_l1_to_k1({3: p1})


# ------------------------------------------------------------------------------------------
# Appendix B, Tables 4-5


def _steps(x, n, toward):
    for _ in range(n):
        x = np.nextafter(x, toward)
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_determinism_table_known_ulps(dtype):
    base = {"a": np.array([1.0, -2.5, 3.0], dtype), "b": {"w": np.array([[0.1, 7.0]], dtype)}}
    same = {"a": base["a"].copy(), "b": {"w": base["b"]["w"].copy()}}
    k3 = {"a": base["a"].copy(), "b": {"w": base["b"]["w"].copy()}}
    k3["a"][1] = _steps(k3["a"][1], 3, dtype(-3))  # 3 ulps down (away from zero)
    k3["b"]["w"][0, 0] = _steps(k3["b"]["w"][0, 0], 1, dtype(1))  # 1 ulp up
    zero = {"a": np.array([0.0, -2.5, 3.0], dtype), "b": {"w": base["b"]["w"].copy()}}
    negzero = {"a": np.array([-0.0, -2.5, 3.0], dtype), "b": {"w": base["b"]["w"].copy()}}
    runs = {"k=1": base, "k=1 again": same, "k=2": same, "k=3": k3, "z": zero, "-z": negzero}
    pairs = [("k=1", "k=1 again"), ("k=1", "k=2"), ("k=1", "k=3"), ("z", "-z")]
    rows = det.determinism_table(runs, pairs, accuracy={"k=1": 91.25, "k=3": 90.5})
    assert [(r.equal, r.n_diff, r.n_total, r.max_ulp) for r in rows] == [
        (True, 0, 5, 0),
        (True, 0, 5, 0),
        (False, 2, 5, 3),
        (False, 1, 5, 0),  # -0.0 vs +0.0: bits differ, 0 ulps
    ]
    assert rows[2].verdict == "differs in 2 of 5 elements, max 3 ulps"
    assert rows[0].digest_a == rows[0].digest_b == tree_digest(base) != rows[2].digest_b == tree_digest(k3)
    assert (rows[2].accuracy_a, rows[2].accuracy_b, rows[0].accuracy_b) == (91.25, 90.5, None)
    md = det.determinism_markdown(rows).splitlines()
    assert md[4] == (
        f"| k=1 | k=3 | differ | 2 of 5 | 3 | 91.25 | 90.50 | `{tree_digest(base)[:16]}` | `{tree_digest(k3)[:16]}` |"
    )


def test_determinism_writer_pairs_and_errors(tmp_path):
    runs = {"a": np.float32([1.0]), "b": np.float32([1.0]), "c": np.float64([1.0])}
    path = det.write_determinism(det.determinism_table(runs, [("a", "b")]), tmp_path / "det.md")
    assert f"`{tree_digest(runs['a'])}`" in open(path).read()  # full 64-digit digests in the file
    assert os.listdir(tmp_path) == ["det.md"]
    with pytest.raises(ValueError, match=r"runs \['x'\] that are not among"):
        det.determinism_table(runs, [("a", "x")])
    with pytest.raises(ValueError, match="leaves differ"):  # float32 vs float64
        det.determinism_table(runs, [("a", "c")])
    assert det.power_of_two_pairs([1, 2, 3, 4, 5, 6, 8, 24, 7]) == [(1, 2), (1, 4), (1, 8), (3, 6), (3, 24)]
    with pytest.raises(ValueError, match="k=0"):
        det.power_of_two_pairs([0, 1])


# ------------------------------------------------------------------------------------------
# Footnote 5: relative gradient fluctuation


def _grads(rng, dtype):
    return {"conv": {"w": rng.normal(size=(3, 3, 2)).astype(dtype)}, "fc": rng.normal(size=5).astype(dtype)}


def _flat(tree):
    return np.concatenate([np.asarray(tree["conv"]["w"], np.float64).ravel(), np.asarray(tree["fc"], np.float64)])


def test_gradient_fluctuation_against_numpy():
    rng = np.random.default_rng(0)
    x, y = _grads(rng, np.float32), _grads(rng, np.float32)
    x["fc"][1] = 0.0  # left out of the mean (footnote 5 divides by |x_i|), counted
    f = ms.gradient_fluctuation(x, y)
    fx, fy = _flat(x), _flat(y)
    keep = fx != 0
    assert (f.n_used, f.n_total, f.n_zero) == (22, 23, 1)
    assert f.mean_rel == pytest.approx(np.sum(np.abs(fx - fy)[keep] / np.abs(fx[keep])) / 22, rel=1e-13)
    assert f.norm_rel == pytest.approx(np.sqrt(np.sum((fx - fy) ** 2) / np.sum(fx**2)), rel=1e-13)
    # float64 accumulation: float32 leaves give exactly what their float64 casts give
    x64 = {"conv": {"w": x["conv"]["w"].astype(np.float64)}, "fc": x["fc"].astype(np.float64)}
    assert ms.gradient_fluctuation(x64, y) == f
    with pytest.raises(ValueError, match="differ in structure"):
        ms.gradient_fluctuation(x, {"fc": y["fc"]})


def test_batch_selection_fluctuation_and_median():
    rng = np.random.default_rng(1)
    batches = [_grads(rng, np.float32) for _ in range(4)]
    sample = _grads(rng, np.float32)
    f = ms.batch_selection_fluctuation(batches, sample)
    fx = np.mean([_flat(g) for g in batches], axis=0)
    fy = _flat(sample)
    assert f.mean_rel == pytest.approx(np.mean(np.abs(fx - fy) / np.abs(fx)), rel=1e-12)
    assert f.norm_rel == pytest.approx(np.linalg.norm(fx - fy) / np.linalg.norm(fx), rel=1e-12)
    per_epoch = [ms.batch_selection_fluctuation(batches[:b], sample) for b in (1, 2, 3, 4)]
    med = ms.median_over_epochs(per_epoch)
    assert med.mean_rel == statistics.median(p.mean_rel for p in per_epoch)
    assert med.norm_rel == statistics.median(p.norm_rel for p in per_epoch)
    with pytest.raises(ValueError, match="B must be >= 1"):
        ms.batch_selection_fluctuation([], sample)
    with pytest.raises(ValueError, match="no epochs"):
        ms.median_over_epochs([])


def test_float_fluctuation_is_last_bit_and_zero_for_powers_of_two():
    """Section 4.1: fl(lr/k) * fl(k g) vs fl(lr g) differs by at most a few ulps; k = 2 not at all."""
    rng = np.random.default_rng(2)
    g = rng.normal(size=1000).astype(np.float32)
    lr = np.float32(0.1)
    plain = lr * g
    f3 = ms.float_fluctuation(plain, (lr / np.float32(3)) * (np.float32(3) * g))
    f2 = ms.float_fluctuation(plain, (lr / np.float32(2)) * (np.float32(2) * g))
    assert f2.mean_rel == 0.0 and f2.norm_rel == 0.0
    # three roundings of relative size <= 2^-24 each in y, one in x: per component < 2^-22
    assert 0.0 < f3.mean_rel < 2.0**-22 and 0.0 < f3.norm_rel < 2.0**-22
    fb = ms.batch_selection_fluctuation([{"g": g}], {"g": rng.normal(size=1000).astype(np.float32)})
    assert fb.norm_rel > 1e6 * f3.norm_rel  # batch selection: orders of magnitude larger (Table 1, right)
    md = tb.comparison_markdown(tb.table1(ACC), f3.mean_rel, fb.mean_rel)
    assert f"| {f3.mean_rel:.2g} | {tb.table1(ACC).mean_std_over_k:.2f} |" in md
