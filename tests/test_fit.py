"""eos_jax.train.fit: the engine in memory gives train()'s bits, writes nothing, installs no signal handler."""

from __future__ import annotations

import doctest
import json
import os
import signal

import numpy as np
import pytest

from eos_jax import train as tr
from eos_jax.errors import ConfigError
from eos_jax.metrics import tree_digest
from train_fixtures import toy_problem

# Two learning rates x k in {1, 3}; max_lanes=3 splits them into groups [0, 1, 2] and [3], so lane 1 has
# its k=1 twin in its group and lane 3 does not (its twin, lane 2, ran in the other program).
LANES = tr.make_lanes([0.05, 0.3], ks=[1, 3])
CONFIG = tr.EngineConfig(steps=24, chunk_steps=7, log_every=2, sharpness_every=6, sharpness_iters=6,
                         checkpoint_every=10, max_lanes=3)


def _from_lines(lines, key, hist):
    """``(lanes, logged steps)`` float64 array of ``key`` from metrics lines, NaN where absent."""
    pos = {int(s): t for t, s in enumerate(hist.step)}
    out = np.full(hist.loss.shape, np.nan)
    for r in lines:
        if r.get(key) is not None:
            out[r["lane"], pos[r["step"]]] = r[key]
    return out


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_fit_equals_train_bitwise_and_touches_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = tr.train(toy_problem(), LANES, CONFIG, run_dir, quiet=True)
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    installed = []
    monkeypatch.setattr(signal, "signal", lambda *a: installed.append(a))
    hist = tr.fit(toy_problem(), LANES, CONFIG.steps, config=CONFIG)
    monkeypatch.undo()
    assert installed == [] and {s: signal.getsignal(s) for s in before} == before
    assert os.listdir(cwd) == []

    assert hist.groups == ((0, 1, 2), (3,))
    np.testing.assert_array_equal(hist.step, sorted({r["step"] for r in lines}))
    assert hist.loss.shape == (4, 13) and hist.loss.dtype == np.float32  # steps 0, 2, .., 24
    # Every metrics value of train() is exactly representable in the engine's dtype (float32 widened
    # to float64 in JSON), so casting the lines back gives train's bits.
    for key, arr in [("loss", hist.loss), ("sharpness", hist.sharpness), ("rel_l1_to_k1", hist.rel_l1),
                     (f"rel_l1_to_k1_ma{tr.REL_L1_WINDOW}", hist.rel_l1_ma)]:
        ref = _from_lines(lines, key, hist)
        assert _same_bits(arr, ref.astype(arr.dtype)), key
    assert _same_bits(hist.normalized_sharpness, _from_lines(lines, "normalized_sharpness", hist))
    assert hist.finite.all() and np.isfinite(hist.sharpness).sum() == 4 * 5  # steps 0, 6, 12, 18, 24
    # RelL1 only where the k=1 twin ran in the same program: lane 1 (twin 0), not lane 3 (twin in group 0).
    assert np.isnan(hist.rel_l1[[0, 2, 3]]).all() and (hist.rel_l1[1, 1:] > 0).all() and hist.rel_l1[1, 0] == 0
    for i in range(len(LANES)):
        assert tree_digest({k: v[i] for k, v in hist.params.items()}) == res["lanes"][i]["params_digest"]
    assert list(hist.lane_summaries) == res["lanes"] and hist.summary == res["summary"]
    assert "rel_l1_to_k1_missing" in hist.lane_summaries[3] and hist.lane_summaries[1]["n_diff_to_k1"] > 0


def test_fit_docstring_example_runs():
    tests = doctest.DocTestFinder().find(tr.fit, "fit", globs={"np": np})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False) == doctest.TestResults(0, sum(len(t.examples) for t in tests))
    assert sum(len(t.examples) for t in tests) >= 8


def test_fit_refuses_bad_steps():
    with pytest.raises(ConfigError, match="steps=0"):
        tr.fit(toy_problem(), LANES, 0)
