"""python -m experiments.predict agreement: measurement against measurement, and the per-configuration bounds."""

import itertools
import json
from collections import Counter

import pytest

from eos_jax import cli
from eos_jax.errors import ConfigError
from experiments import predict as predict_cli
from experiments.predict.agreement import agreement, load_runs, majority_distribution
from experiments.predict.cnn import majority


def _run(argv):
    with pytest.raises(SystemExit) as e:
        cli.run(predict_cli.main, argv, prog="python -m experiments.predict")
    return e.value.code


@pytest.mark.parametrize(
    "counts,n",
    [
        ({"restrained": 3, "stable": 3}, 3),
        ({"restrained": 6, "stable": 4, "transient": 2, "collapsed": 2, "spikes-off-edge": 1}, 5),
        ({"collapsed": 2, "transient": 2, "stable": 1, "stalled": 0}, 4),
        ({"stable": 4}, 1),
    ],
)
def test_majority_distribution_is_every_draw_counted(counts, n):
    """The hypergeometric sum equals enumerating every draw of ``n`` seeds of the pool (ties by severity)."""
    pool = [r for r, k in counts.items() for _ in range(k)]
    draws = list(itertools.combinations(range(len(pool)), n))
    seen = Counter(majority([pool[i] for i in d]) for d in draws)
    got = majority_distribution(counts, n)
    assert set(got) == set(seen)
    for r, k in seen.items():
        assert abs(got[r] - k / len(draws)) < 1e-12, (r, got[r], k / len(draws))
    assert abs(sum(got.values()) - 1.0) < 1e-12


def test_majority_distribution_refuses_a_draw_larger_than_the_pool():
    with pytest.raises(ConfigError, match="n=4; expected 1 <= n <= 3"):
        majority_distribution({"stable": 2, "restrained": 1}, 4)


def _write_run(path, seeds, cells, **config):
    """A ``predict cnn`` run directory holding ``cells``: (lr, seed, predicted, measured) of one depth."""
    path.mkdir()
    grid = {"layers": [1], "lr": [1.0, 2.0], "weight_decay": [0.0], "steps": 300, "num_examples": 2000}
    (path / "config.json").write_text(json.dumps({"command": "predict-cnn", "seeds": seeds, **grid, **config}))
    rows = [
        {"layers": 1, "lr": lr, "weight_decay": 0.0, "seed": s, "predicted": p, "baseline": "stable", "measured": m}
        for lr, s, p, m in cells
    ]
    (path / "results.json").write_text(json.dumps({"cells": rows, "seeds": seeds, "dataset": "d"}))
    return path


def _two_runs(tmp_path):
    """lr 1: A measures stable, stable, restrained; B restrained, restrained, stable; both predicted stable.
    lr 2: A collapsed x 3, predicted collapsed; B collapsed, collapsed, transient, predicted transient."""
    a = _write_run(
        tmp_path / "a",
        [0, 1, 2],
        [
            (1.0, 0, "stable", "stable"),
            (1.0, 1, "stable", "stable"),
            (1.0, 2, "stable", "restrained"),
            (2.0, 0, "collapsed", "collapsed"),
            (2.0, 1, "collapsed", "collapsed"),
            (2.0, 2, "collapsed", "collapsed"),
        ],
    )
    b = _write_run(
        tmp_path / "b",
        [3, 4, 5],
        [
            (1.0, 3, "stable", "restrained"),
            (1.0, 4, "stable", "restrained"),
            (1.0, 5, "stable", "stable"),
            (2.0, 3, "transient", "collapsed"),
            (2.0, 4, "transient", "collapsed"),
            (2.0, 5, "transient", "transient"),
        ],
    )
    return a, b


def test_agreement_of_two_hand_made_runs(tmp_path):
    """Every number worked out by hand (see ``_two_runs``)."""
    report = agreement(load_runs(_two_runs(tmp_path)))
    d = report["depths"]["all"]
    assert report["depths"]["1"] == d and report["seeds_per_run"] == 3
    # majorities: lr 1 A stable, B restrained (differ); lr 2 collapsed in both (agree)
    assert d["measured_vs_measured"] == {"mean": 0.5, "min": 0.5, "max": 0.5, "count": 1}
    # the predictor: A both majorities right, B neither (stable vs restrained, transient vs collapsed)
    assert d["predictor_majority"] == {"mean": 0.5, "min": 0.0, "max": 1.0, "count": 2}
    assert [r["predictor_majority"] for r in report["per_run"]] == [1.0, 0.0]
    assert d["predictor_seed"] == 7 / 12  # A: 2 + 3, B: 1 + 1
    # pooled lr 1: 3 stable, 3 restrained, a tie: restrained; lr 2: 5 collapsed, 1 transient
    pooled = {p["lr"]: p for p in report["pooled"]}
    assert pooled[1.0]["counts"] == {"stable": 3, "restrained": 3} and pooled[1.0]["majority"] == "restrained"
    assert pooled[2.0]["majority"] == "collapsed" and pooled[2.0]["majority_of_n"] == {"collapsed": 1.0}
    assert d["per_config_seed_ceiling"] == 8 / 12  # 3 of 6, 5 of 6
    # 3 of the 6 pooled lr-1 seeds: 2 or 3 stable in (9 + 1) of C(6, 3) = 20 draws
    assert pooled[1.0]["majority_of_n"] == {"stable": 0.5, "restrained": 0.5}
    assert d["per_config_majority_ceiling"] == (0.5 + 1.0) / 2
    # predictions pooled: lr 1 stable (the measurement's restrained), lr 2 a 3 : 3 tie, collapsed (right)
    assert pooled[2.0]["predicted_majority"] == "collapsed" and d["predictor_pooled_majority"] == 0.5


def test_agreement_cli_writes_the_report_and_refuses_bad_runs_in_one_line(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    out = tmp_path / "out"
    assert _run(["agreement", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured vs measured 50 %" in printed and "best per-configuration prediction 75 % expected" in printed
    report = json.loads((out / "agreement.json").read_text())
    assert report["depths"]["all"]["predictor_seed"] == 7 / 12
    assert json.loads((out / "config.json").read_text())["runs"] == [str(a), str(b)]

    other = _write_run(tmp_path / "other", [6], [], steps=200)
    overlap = _write_run(tmp_path / "overlap", [2, 7], [])
    refused = [
        ([str(a)], "1 run(s) given"),
        ([str(a), str(overlap)], f"seed 2 is in {a} and in {overlap}"),
        ([str(a), str(other)], f"{other} has steps=200; {a} has steps=300"),
        ([str(a), str(tmp_path / "none")], "no readable config.json and results.json"),
    ]
    for runs, needle in refused:
        assert _run(["agreement", *runs, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    assert _run(["agreement", str(a), str(b), "--out", str(out)]) == 2  # a used directory is not overwritten
    assert "already holds" in capsys.readouterr().err
