"""benchmarks/gpu_check.py runs on the CPU with small sizes and its bitwise checks pass there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.subprocess
def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    # Without the suite's shared compilation cache: check (b) compiles its program twice on purpose.
    # The checkout's package, whichever copy the interpreter has installed.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for tag in (
        "(a) perturbed update float32",
        "(b) same run twice",
        "(c) float32 matmul",
        "(d) main job step",
        "(d) ResNet-8",
        "(e) summary: all bitwise checks passed",
    ):
        assert tag in r.stdout, (tag, r.stdout)
    s = json.loads(out.read_text())
    assert s["ok"] and s["quick"]
    for dt in ("float32", "float64"):
        e = s["perturbed_update"]["per_dtype"][dt]
        assert e["const_k_differing_elements"] == 0 and e["traced_k_differing_elements"] == 0
        # The check can fail: odd k do change elements, powers of two do not.
        assert e["elements_changed_vs_k1_by_k"]["3"] > 0
        assert e["elements_changed_vs_k1_by_k"]["4"] == 0
    assert s["determinism"]["digest_run1"] == s["determinism"]["digest_run2"]
    assert s["matmul_precision"]["max_error_relative_to_abs_product"] < 1e-5
    lanes = s["speed"]["resnet_lanes"]
    assert lanes["num_lanes"] == 2 and lanes["lanes_over_one"] > 0
