"""One experiments.eos sweep over two processes joined by jax.distributed on 127.0.0.1 (gloo
collectives), against the same sweep in one process with two devices: the same per-device lane
grouping, so the same bits; one process killed mid-run: the other stops within a bounded time
with an error and nothing hangs; both resumed: the same bits again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eos_jax import cli
from experiments.eos import cli as eos_cli

REPO = Path(__file__).resolve().parents[1]
# A tiny fc sweep: 4 learning rates, 2 per device; 24 steps in chunks of 4.
SWEEP = [
    "--model", "fc", "--layers", "2", "--width", "8", "--lr", "0.5", "1", "2", "4", "--dataset", "digits01",
    "--num-examples", "64", "--steps", "24", "--chunk-steps", "4", "--sharpness-every", "8", "--sharpness-iters",
    "3", "--sharpness-method", "power", "--quiet",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EOS_JAX_COORDINATOR")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _launch(out: Path, n: int, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "experiments.eos", *SWEEP, "--out", str(out), *extra]
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        cmd += ["--heartbeat-timeout", "5", "--join-timeout", "60"]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        out.append((p.returncode, so, se))
    return out


def _digests(run: Path) -> list[str]:
    return [l["params_digest"] for l in json.loads((run / "results.json").read_text())["lanes"]]


def _wait_for_checkpoint(run: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a process ended before the first checkpoint: " + str([p.poll() for p in procs]))
        d = run / "checkpoints" / "group_000"
        if d.is_dir() and any(c.name.isdigit() and (c / "_CHECKPOINT_METADATA").exists() for c in d.iterdir()):
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.subprocess
def test_one_process_killed_stops_the_other_and_both_resume_equal_one_process_with_two_devices(tmp_path):
    # One process, two devices: lanes 0-1 on device 0, 2-3 on device 1.
    ref = tmp_path / "one"
    r = subprocess.run(
        [sys.executable, "-m", "experiments.eos", *SWEEP, "--out", str(ref), "--checkpoint-every", "0"],
        cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # Two processes, one device each (the same placement of lanes, across processes). Process 1 is
    # killed (SIGKILL: no handler runs) after the first checkpoint: process 0 stops within a bounded
    # time with an error, its message from JAX's coordination service (the process aborts, no
    # Python traceback), and nothing hangs.
    two = tmp_path / "two"
    procs = _launch(two, 2, "--checkpoint-every", "4")
    _wait_for_checkpoint(two, procs)
    procs[1].kill()
    t0 = time.time()
    rc, _, err = _finish(procs[:1], timeout=120)[0]
    waited = time.time() - t0
    procs[1].wait(timeout=30)
    assert rc not in (0, None) and waited < 60, (rc, waited, err[-2000:])
    assert "another task died" in err, err[-2000:]
    assert not (two / "results.json").exists()
    # Both resumed: the bits of the one process, in the parameters and in every metrics line.
    # (Checkpoint schedules do not change bits: tests/test_train.py.)
    results = _finish(_launch(two, 2, "--checkpoint-every", "4", "--resume"))
    assert [rc for rc, _, _ in results] == [0, 0], [e[-2000:] for _, _, e in results]
    assert _digests(two) == _digests(ref)
    assert (two / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    res = json.loads((two / "results.json").read_text())
    assert res["timing"]["num_processes"] == 2 and res["timing"]["num_devices"] == 2
    assert json.loads((two / "metadata.json").read_text())["runtime"]["process_count"] == 2


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:99999", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id 2"),
        (["--num-processes", "2", "--process-id", "1"], "--coordinator"),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1", "--preset", "fig7"],
            "--preset",
        ),
    ],
)
def test_bad_coordinator_settings_one_line_exit_2_nothing_written(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(eos_cli.main, [*argv, "--out", str(out)], prog="python -m experiments.eos")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.subprocess
def test_port_in_use_and_unreachable_coordinator_are_one_line_exit_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "experiments.eos", *SWEEP, "--out", str(tmp_path / "a")]
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
        r = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already in use" in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
    # Process 1 of 2 with nobody at the address: gives up after --join-timeout, one line.
    cmd = [sys.executable, "-m", "experiments.eos", *SWEEP, "--out", str(tmp_path / "b")]
    cmd += ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1"]
    r = subprocess.run(
        [*cmd, "--join-timeout", "3"], cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "nothing answered within 3 s" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # Process 1 started with another process count than process 0: both stop with one line.
    port = _free_port()
    procs = []
    for i, n in ((0, 2), (1, 3)):
        cmd = [sys.executable, "-m", "experiments.eos", *SWEEP, "--out", str(tmp_path / "c")]
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for rc, _, err in _finish(procs, timeout=120):
        lines = [l for l in err.splitlines() if "error" in l]
        assert rc == 2 and len(lines) == 1 and "process 0: 2, process 1: 3" in lines[0], err[-2000:]
    assert not (tmp_path / "c").exists()


# experiments.sensitivity: the k=1 and k=3 lanes of one seed, one per device, 2 epochs of 2 steps.
SENS = [
    "--model", "vgg_small_bn", "--dataset", "fashion_mnist01_bundled", "--num-train", "32", "--num-test", "16",
    "--batch-size", "16", "--lr", "0.05", "--epochs", "2", "--k", "1", "3", "--seeds", "5", "--final-epochs", "1",
    "--quiet",
]  # fmt: skip
SENS_SAME = ("metrics.jsonl", "sensitivity.json", "table1.csv", "table1.md", "determinism.md", "rel_l1.json")


@pytest.mark.subprocess
def test_sensitivity_over_two_processes_equals_one_process_with_two_devices(tmp_path):
    ref = tmp_path / "one"
    r = subprocess.run(
        [sys.executable, "-m", "experiments.sensitivity", *SENS, "--out", str(ref)],
        cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "experiments.sensitivity", *SENS, "--out", str(two)]
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = _finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], [e[-2000:] for _, _, e in results]
    # The k=1 lane trains in process 0 and the k=3 lane in process 1, as on the two devices of
    # one process: the same bits in every line, table and digest (the k=1 vs k=3 RelL1 and
    # the determinism table compare lanes of different processes).
    for name in SENS_SAME:
        assert (two / name).read_bytes() == (ref / name).read_bytes(), name
    assert _digests(two) == _digests(ref)
    sens = json.loads((two / "sensitivity.json").read_text())
    assert sens["summary"]["k1_vs_k3"][0]["bitwise_equal"] is False
    assert json.loads((two / "metadata.json").read_text())["runtime"]["process_count"] == 2
    assert (two / "rel_l1.png").read_bytes()[:4] == b"\x89PNG"


def test_sensitivity_several_processes_need_out(tmp_path, capsys, monkeypatch):
    from experiments.sensitivity import cli as sens_cli

    monkeypatch.chdir(tmp_path)
    argv = [*SENS, "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1"]
    with pytest.raises(SystemExit) as e:
        cli.run(sens_cli.main, argv, prog="python -m experiments.sensitivity")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--out is required" in err, err
    with pytest.raises(SystemExit) as e:
        cli.run(sens_cli.main, [*argv[:-1], "7", "--out", "x"], prog="python -m experiments.sensitivity")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--process-id 7" in err, err
    assert list(tmp_path.iterdir()) == []
