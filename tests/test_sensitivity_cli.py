"""python -m experiments.sensitivity and python -m experiments.lr_threshold: bad flags give one line and
exit 2 with nothing written; a tiny sweep writes every promised file, its power-of-two k equal k=1
bitwise, k=3 differs, and the same sweep twice gives the same bits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eos_jax import cli
from experiments import lr_threshold
from experiments.sensitivity import cli as sens_cli

# The bundled Fashion-MNIST 0/1 subset (always there), a few images, the CPU-sized BN network.
TINY = [
    "--model", "vgg_small_bn", "--dataset", "fashion_mnist01_bundled", "--num-train", "32", "--num-test", "16",
    "--batch-size", "16", "--lr", "0.05", "--quiet",
]  # fmt: skip
SENS_FILES = {
    "config.json", "metadata.json", "metrics.jsonl", "results.json", "checkpoints", "table1.md", "table1.csv",
    "rel_l1.json", "rel_l1.png", "determinism.md", "comparison.md", "sensitivity.json",
}  # fmt: skip


def _run(main, prog, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv, prog=prog)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--k", "0"], "'0'"),
        (["--k", "-3"], "'-3'"),
        (["--k", "1.5"], "'1.5'"),
        (["--k", "three"], "'three'"),
        (["--k", "3", "5"], "k = 1"),
        (["--k", "1", "3", "3"], "distinct"),
        (["--model", "resnet18"], "resnet18"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--optimizer", "rmsprop"], "rmsprop"),
        (["--lr", "-0.1"], "'-0.1'"),
        (["--epochs", "0"], "'0'"),
        (["--augment", "maybe"], "'maybe'"),
        (["--preset", "paper-resnet18"], "paper-resnet18"),
        (["--max-lanes", "2"], "--max-lanes 2"),
        (["--lane-batch", "0"], "'0'"),
        (["--num-train", "100000"], "100000"),
    ],
)
def test_sensitivity_bad_flags_one_line_exit_2_nothing_written(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(sens_cli.main, "python -m experiments.sensitivity", [*TINY, *argv, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--n", "0"], "'0'"),
        (["--n", "2", "2"], "distinct"),
        (["--lr0", "nan"], "'nan'"),
        (["--seed", "0", "1"], "one seed"),
        (["--preset", "cnn", "--n", "2", "2"], "distinct"),
        (["--preset", "cnn", "--model", "vgg_small_bn"], "--model"),
        (["--preset", "cnn", "--seed", "-1"], "'-1'"),
    ],
)
def test_lr_threshold_bad_flags_one_line_exit_2_nothing_written(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(lr_threshold.main, "python -m experiments.lr_threshold", [*argv, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def _digests(d: Path) -> dict[int, str]:
    return {l["k"]: l["params_digest"] for l in json.loads((d / "results.json").read_text())["lanes"]}


@pytest.mark.slow
def test_sensitivity_tiny_sweep_writes_everything_and_its_bits_hold(tmp_path, capsys):
    argv = [*TINY, "--epochs", "2", "--k", "1", "2", "3", "4", "6", "--seeds", "5", "--final-epochs", "1"]
    argv += ["--schedule", "step", "--decay-epochs", "1", "--augment", "on"]
    code, _, err = _run(
        sens_cli.main, "python -m experiments.sensitivity", [*argv, "--out", str(tmp_path / "a")], capsys
    )
    assert code == 0, err
    a = tmp_path / "a"
    assert SENS_FILES <= {p.name for p in a.iterdir()}, sorted(p.name for p in a.iterdir())
    d = _digests(a)
    assert d[2] == d[1] and d[4] == d[1] and d[6] == d[3] and d[3] != d[1]
    sens = json.loads((a / "sensitivity.json").read_text())
    rows = {(r["a"], r["b"]): r for r in sens["summary"]["determinism"]}
    assert rows[("seed 5 k=1", "seed 5 k=2")]["equal"] and rows[("seed 5 k=3", "seed 5 k=6")]["equal"]
    assert not rows[("seed 5 k=1", "seed 5 k=3")]["equal"] and rows[("seed 5 k=1", "seed 5 k=3")]["n_diff"] > 0
    # Table 1 holds the last epoch's test accuracy of each lane, as metrics.jsonl has it.
    lines = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    last = {l["k"]: l["eval"]["test_accuracy"] for l in lines if "eval" in l and l["step"] == 4}
    assert sens["summary"]["table1"]["acc"] == [[last[k] for k in (1, 2, 3, 4, 6)]]
    assert "| 3 |" in (a / "table1.md").read_text() and (a / "rel_l1.png").read_bytes()[:4] == b"\x89PNG"
    rel = json.loads((a / "rel_l1.json").read_text())
    k3 = next(l for l in rel["lanes"] if l["k"] == 3)
    assert len(rel["layers"]) == 7 and len(k3["rel_l1_layers"][-1]) == 7 and k3["rel_l1"][-1] > 0
    # (The same sweep run again gives the same bits: tests/test_multiprocess.py reruns one over two
    # processes against one process with two devices, table by table.)
    # --resume of the finished run: restored from its last checkpoint, the same bits and tables.
    table = (a / "table1.csv").read_bytes()
    code, _, err = _run(
        sens_cli.main, "python -m experiments.sensitivity", [*argv, "--out", str(a), "--resume"], capsys
    )
    assert code == 0, err
    assert _digests(a) == d and (a / "table1.csv").read_bytes() == table
    # One lane at a time (the cpu preset's --lane-batch 1): other bits, the same equalities within the sweep.
    code, _, err = _run(
        sens_cli.main,
        "python -m experiments.sensitivity",
        [*argv, "--lane-batch", "1", "--out", str(tmp_path / "c")],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "config.json").read_text())["lane_batch"] == 1
    c = _digests(tmp_path / "c")
    assert c[2] == c[1] and c[4] == c[1] and c[6] == c[3] and c[3] != c[1]


@pytest.mark.slow
def test_lr_threshold_tiny_writes_the_plot_and_a_verdict_per_rate(tmp_path, capsys):
    argv = ["--dataset", "fashion_mnist01_bundled", "--num-train", "32", "--num-test", "16", "--batch-size", "16"]
    argv += ["--lr0", "0.2", "--n", "1", "2", "--iterations", "4", "--out", str(tmp_path / "t")]
    code, out, err = _run(lr_threshold.main, "python -m experiments.lr_threshold", argv, capsys)
    assert code == 0, err
    t = tmp_path / "t"
    assert {"lr_threshold.json", "lr_threshold.png", "n1", "n2", "config.json"} <= {p.name for p in t.iterdir()}
    s = json.loads((t / "lr_threshold.json").read_text())
    assert [r["lr"] for r in s["runs"]] == [0.2, 0.1] and [r["steps"] for r in s["runs"]] == [4, 8]
    for r in s["runs"]:
        assert len(r["rel_l1"]) == r["steps"] + 1 and r["verdict"] == lr_threshold.classify(r["rel_l1"])["verdict"]
    assert s["threshold"] == lr_threshold.threshold(s["runs"]) and "largest attenuating lr" in out


def test_lr_threshold_rule_from_hand_made_series():
    grow = [0.0, 1e-7, 1e-6, 1e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]
    flat = [0.0, 1e-7, 2e-7, 1e-7, 1e-7, 2e-7, 1e-7, 1e-7, 1e-7, 1e-7, 3e-7]
    assert lr_threshold.classify(grow)["verdict"] == "amplified"
    assert lr_threshold.classify(flat)["verdict"] == "attenuated" and lr_threshold.classify(flat)["growth"] == 3.0
    assert lr_threshold.classify([0.0] * 5)["verdict"] == "attenuated"
    runs = [
        {"lr": 0.1, "verdict": "amplified"},
        {"lr": 0.01, "verdict": "attenuated"},
        {"lr": 0.05, "verdict": "amplified"},
    ]
    t = lr_threshold.threshold(runs)
    assert t["largest_attenuating_lr"] == 0.01 and t["smallest_amplifying_lr"] == 0.05 and t["monotone"]
    assert not lr_threshold.threshold([*runs, {"lr": 0.001, "verdict": "amplified"}])["monotone"]


def test_lr_threshold_cnn_preset_counts_verdicts_over_seeds(tmp_path, capsys, monkeypatch):
    """--preset cnn (the paper's 3-layer CNN on the bundled data, tiny): one sweep of rates x seeds x k = 1, 3;
    each k = 3 lane's verdict is the library rule on its own RelL1 series, and 2/lambda_max at init is printed."""
    from eos_jax.stability import perturbation_verdict

    monkeypatch.setenv("EOS_JAX_NO_SYSTEM_DATA", "1")
    out = tmp_path / "cnn"
    argv = ["--preset", "cnn", "--iterations", "6", "--n", "1", "10", "--seed", "0", "1", "--out", str(out), "--quiet"]
    code, _, err = _run(lr_threshold.main, "python -m experiments.lr_threshold", argv, capsys)
    assert code == 0, err
    got = json.loads((out / "lr_threshold.json").read_text())
    assert [r["lr"] for r in got["runs"]] == [1.0, 10.0] and (out / "lr_threshold.png").exists()
    res = json.loads((out / "sweep" / "results.json").read_text())
    assert sorted((l["learning_rate"], l["seed"], l["k"]) for l in res["lanes"]) == [
        (lr, s, k) for lr in (1.0, 10.0) for s in (0, 1) for k in (1, 3)
    ]
    for r in got["runs"]:
        assert [s["seed"] for s in r["seeds"]] == [0, 1]
        for s in r["seeds"]:
            assert s["verdict"] == perturbation_verdict(s["rel_l1"])["verdict"] and len(s["rel_l1"]) == 7
        assert r["amplified_seeds"] == sum(s["verdict"] == "amplified" for s in r["seeds"])
        assert r["macroscopic_seeds"] == sum(s["rel_l1_end"] >= 1e-4 for s in r["seeds"])
    assert [p["seed"] for p in got["initial_sharpness"]["per_seed"]] == [0, 1]


@pytest.mark.parametrize("module", ["eos", "sensitivity", "lr_threshold", "lr_threshold-cnn"])
@pytest.mark.parametrize("bad", ["missing", "file"])
def test_a_named_data_dir_is_honoured_or_refused(module, bad, tmp_path, capsys):
    """--data-dir naming a missing directory or a file: one line, exit 2, nothing written, in every CLI."""
    from experiments import eos as eos_cli

    main = {"eos": eos_cli.main, "sensitivity": sens_cli.main}.get(module, lr_threshold.main)
    path = tmp_path / "no_such_dir"
    if bad == "file":
        path = tmp_path / "a_file"
        path.write_text("not a directory")
    out = tmp_path / "run"
    argv = ["--data-dir", str(path), "--out", str(out)] + (["--preset", "cnn"] if module == "lr_threshold-cnn" else [])
    code, _, err = _run(main, f"python -m experiments.{module}", argv, capsys)
    why = "does not exist" if bad == "missing" else "is not a directory"
    assert code == 2 and err.count("\n") == 1 and f"--data-dir {path} {why}" in err, err
    assert not out.exists()
