"""``python -m experiments.pde``: --help, one-line errors with exit code 2, and tiny end-to-end runs."""

import json
import subprocess
import sys

import pytest

from eos_jax import cli
from experiments import pde


def _run(argv):
    with pytest.raises(SystemExit) as e:
        cli.run(pde.main, argv, prog="python -m experiments.pde")
    return e.value.code


@pytest.mark.parametrize("sub", [[], ["heat"], ["beltrami"], ["linear"]])
def test_help(sub, capsys):
    assert _run(sub + ["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["linear", "--dt", "0", "--out", "x"], "--dt"),
        (["linear", "--dt", "-1e-8", "--out", "x"], "--dt"),
        (["linear", "--dt", "1e-8", "--kernel", "0", "--out", "x"], "--kernel"),
        (["linear", "--dt", "1e-8", "--scheme", "adam", "--out", "x"], "--scheme"),
        (["linear", "--dt", "1e-8", "--kernel", "300", "--out", "x"], "kernel size 300"),
        (["linear", "--dt", "1e-4", "--scheme", "nesterov", "--momentum", "1.5", "--out", "x"], "momentum"),
        (["linear", "--dt", "1e-8", "--pool", "max", "--out", "x"], "--pool"),
        (["linear", "--dt", "1e-8", "--ibar", "median", "--out", "x"], "--ibar"),
        (["heat", "--ratio", "-0.4", "--out", "x"], "--ratio"),
        (["beltrami", "--steps", "0", "--out", "x"], "--steps"),
        (["nosuch"], "invalid choice"),
    ],
)
def test_bad_flags_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_linear_tiny_run_and_no_overwrite(tmp_path, capsys):
    out = tmp_path / "lin"
    argv = [
        "linear",
        "--kernel",
        "3",
        "4",
        "--size",
        "12",
        "--dt",
        "1e-3",
        "--bisect-steps",
        "64",
        "--rel-tol",
        "1e-3",
        "--plot-steps",
        "20",
        "--out",
        str(out),
    ]
    assert _run(argv) == 0
    res = json.loads((out / "results.json").read_text())
    for w in ("3", "4"):
        e = res["kernels"][w]
        for key in ("alpha_min_theory", "alpha_max_theory", "alpha_min_empirical", "alpha_max_empirical"):
            assert isinstance(e[key], float), key
        assert abs(e["alpha_min_empirical"] - e["alpha_min_spectral"]) <= 0.02 * e["alpha_min_spectral"]
        assert abs(e["alpha_max_empirical"] - e["alpha_max_spectral"]) <= 0.02 * e["alpha_max_spectral"]
    assert res["pool"] == "sum" and res["ibar"] == "mean"  # the authors' single_layer/linear.py
    assert json.loads((out / "config.json").read_text())["pool"] == "sum"
    assert (out / "figure4.png").is_file() and (out / "metadata.json").is_file()
    assert "a_min theory" in capsys.readouterr().out
    assert _run(argv) == 2  # the run directory already holds this run
    assert "already holds" in capsys.readouterr().err


@pytest.mark.subprocess
def test_module_entry_point_subprocess(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "experiments.pde", "linear", "--dt", "0", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
