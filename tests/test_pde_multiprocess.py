"""``python -m experiments.pde`` over two processes joined by jax.distributed on 127.0.0.1 (gloo).

The ``nonlinear`` sweep (lanes sharded over the devices of every process) over 2 processes x 1
device writes the same files, bit for bit, as 1 process x 2 devices (the same lanes per device,
the same programs); ``heat`` (computed whole in every process, written by process 0) the same as
one process; a used run directory is refused by both processes alike; bad coordinator settings
are one line, exit 2, nothing written. Every run is tiny: the children's start-up and compilation
are most of the time, so the reference and the two processes of a comparison run at once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eos_jax import cli
from experiments import pde

REPO = Path(__file__).resolve().parents[1]
# 2 dts x (k=1, k=3) = 4 lanes, 2 per device; 4 steps in chunks of 2, sharpness at steps 0, 2, 4.
NONLINEAR = [
    "nonlinear", "--dt", "0.05", "0.2", "--steps", "4", "--size", "8", "--kernel", "3", "--sharpness-every", "2",
    "--sharpness-iters", "2", "--rel-l1-window", "2",
]  # fmt: skip
HEAT = ["heat", "--ratio", "0.4", "0.8", "--points", "9", "--steps", "40"]
COORDINATOR_ENV = ("EOS_JAX_COORDINATOR", "EOS_JAX_NUM_PROCESSES", "EOS_JAX_PROCESS_ID")
# What differs between the runs compared: the process and device counts, XLA_FLAGS (the device
# count per process) and wall-clock times; metadata.json holds all of them, and nothing else differs.
METADATA_DIFFERS = ("process_count", "device_count", "xla_flags", "timing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", *COORDINATOR_ENV)}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _start(argv: list[str], out: Path, *, devices: int = 1, process: tuple[int, int, int] | None = None):
    """Starts ``python -m experiments.pde ARGV --out OUT`` (``process``: port, count, id)."""
    cmd = [sys.executable, "-m", "experiments.pde", *argv, "--out", str(out)]
    if process is not None:
        port, n, i = process
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        cmd += ["--join-timeout", "60", "--heartbeat-timeout", "10"]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pair(argv: list[str], out: Path) -> list[subprocess.Popen]:
    port = _free_port()
    return [_start(argv, out, process=(port, 2, i)) for i in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of each; none is left running (a hung one is killed)."""
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _ours(text: str) -> list[str]:
    """The lines the CLI printed (gloo's C++ code prints its connection line on stdout)."""
    return [l for l in text.splitlines() if not l.startswith("[Gloo]")]


def _files(run: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(run.iterdir())}


def _assert_same_run(one: Path, two: Path, names: set[str]) -> None:
    """Every file bitwise equal but metadata.json, which differs in METADATA_DIFFERS only."""
    a, b = _files(one), _files(two)
    assert set(a) == set(b) == names | {"metadata.json"}
    for name in names:
        assert a[name] == b[name], name
    ma, mb = json.loads(a["metadata.json"]), json.loads(b["metadata.json"])
    assert ma["process_count"] == 1 and mb["process_count"] == 2
    strip = lambda m: {k: v for k, v in m.items() if k not in METADATA_DIFFERS}  # noqa: E731
    assert strip(ma) == strip(mb)


@pytest.mark.subprocess
def test_nonlinear_two_processes_equal_one_process_with_two_devices(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    procs = [_start(NONLINEAR, one, devices=2), *_pair(NONLINEAR, two)]
    (rc1, out1, err1), *pair = _finish(procs)
    assert rc1 == 0, err1[-3000:]
    assert [rc for rc, _, _ in pair] == [0, 0], [e[-3000:] for _, _, e in pair]
    names = {"config.json", "results.json", "figure5.png", "figure6.png", "regimes.png"}
    _assert_same_run(one, two, names)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["per_dt"] == r2["per_dt"] and set(r2["per_dt"]) == {"0.05", "0.2"}  # every number, exactly
    assert [json.loads((d / "metadata.json").read_text())["device_count"] for d in (one, two)] == [2, 2]
    # Process 0 prints the summary and the progress; process 1 nothing.
    assert _ours(pair[0][1]) == _ours(out1) and "note:" in out1
    assert "step 4/4" in pair[0][2] and _ours(pair[1][1]) == [] and "step" not in pair[1][2]


@pytest.mark.subprocess
def test_heat_two_processes_equal_one_and_a_used_directory_is_refused_by_both(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    procs = [_start(HEAT, one), *_pair(HEAT, two)]
    (rc1, out1, err1), *pair = _finish(procs)
    assert rc1 == 0 and [rc for rc, _, _ in pair] == [0, 0], (err1[-2000:], [e[-2000:] for _, _, e in pair])
    _assert_same_run(one, two, {"config.json", "results.json", "figure1.png"})
    assert _ours(pair[0][1]) == _ours(out1) and _ours(pair[1][1]) == []
    # The same directory again: both processes refuse it with the same line, exit 2, nothing written.
    before = _files(two)
    again = _finish(_pair(HEAT, two))
    assert [rc for rc, _, _ in again] == [2, 2], [e[-2000:] for _, _, e in again]
    (_, _, err0), (_, _, err1) = again
    assert err0 == err1 and err0.count("\n") == 1 and f"error: run directory {two} already holds" in err0, err0
    assert _files(two) == before


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id 2"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--num-processes", "2", "--process-id", "1"], "--coordinator"),
    ],
)
def test_bad_coordinator_settings_one_line_exit_2_nothing_written(argv, needle, tmp_path, capsys, monkeypatch):
    for var in COORDINATOR_ENV:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    for sub in (HEAT, NONLINEAR):
        with pytest.raises(SystemExit) as e:
            cli.run(pde.main, [*sub, *argv, "--out", str(out)], prog="python -m experiments.pde")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err
        assert not out.exists()


def test_bad_coordinator_environment_and_missing_out_exit_2(tmp_path, capsys, monkeypatch):
    for var in COORDINATOR_ENV:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    monkeypatch.setenv("EOS_JAX_NUM_PROCESSES", "two")
    with pytest.raises(SystemExit) as e:
        cli.run(pde.main, [*HEAT, "--coordinator", "127.0.0.1:1234", "--process-id", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "EOS_JAX_NUM_PROCESSES='two'" in err, err
    monkeypatch.delenv("EOS_JAX_NUM_PROCESSES")
    with pytest.raises(SystemExit) as e:  # --out stays required with several processes
        cli.run(pde.main, [*HEAT, "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--out" in err, err
    assert not out.exists()


@pytest.mark.subprocess
def test_unreachable_coordinator_one_line_exit_2_nothing_written(tmp_path):
    # Process 1 of 2 with nobody at the address: gives up after --join-timeout, one line.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.pde", *HEAT, "--out", str(out), "--join-timeout", "1"]
    cmd += ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing answered within 1 s" in r.stderr, r.stderr
    assert r.stderr.startswith("python -m experiments.pde: error: --coordinator ") and not out.exists()
