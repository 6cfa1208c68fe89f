"""Tests of eos_jax.runtime. ``configure`` acts before the backend starts, and this test
process has started it already, so those checks run in a fresh child interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from eos_jax import runtime
from eos_jax.errors import ConfigError
from eos_jax.runtime import DETERMINISTIC_GPU_FLAG, EIGEN_CONV_FLAG, check_xla_flags, configure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys
from eos_jax.errors import ConfigError
from eos_jax.runtime import configure
try:
    meta = configure()
except ConfigError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(3)
import jax, jax.numpy as jnp
print(json.dumps({"meta": meta, "x64_dtype": str(jnp.asarray(1.0).dtype),
                  "precision": str(jax.config.jax_default_matmul_precision)}))
"""


def _child(xla_flags: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.subprocess
def test_configure_in_fresh_process_sets_flags_and_returns_metadata():
    proc = _child(None)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = out["meta"]
    assert DETERMINISTIC_GPU_FLAG in meta["xla_flags"].split()
    assert meta["x64"] is True and out["x64_dtype"] == "float64"
    assert meta["matmul_precision"] == "highest" and out["precision"] == "highest"
    assert meta["backend"] == "cpu" and meta["device_count"] >= 1 and meta["device_kinds"]
    for name in ("jax", "jaxlib", "flax", "optax"):
        assert meta["versions"][name], name
    assert EIGEN_CONV_FLAG in meta["xla_flags"].split() and meta["cpu_convolutions"] == "eigen"
    # A user's own flags are kept, the deterministic and convolution flags are appended once.
    proc = _child("--xla_cpu_enable_fast_math=false " + DETERMINISTIC_GPU_FLAG)
    assert proc.returncode == 0, proc.stderr
    flags = json.loads(proc.stdout.strip().splitlines()[-1])["meta"]["xla_flags"].split()
    assert flags == ["--xla_cpu_enable_fast_math=false", DETERMINISTIC_GPU_FLAG, EIGEN_CONV_FLAG]
    # A user's own choice of YNNPACK fusions is theirs: nothing is added.
    proc = _child("--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout.strip().splitlines()[-1])["meta"]
    assert meta["xla_flags"].split() == [
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
        DETERMINISTIC_GPU_FLAG,
    ]
    assert meta["cpu_convolutions"] == "as XLA_FLAGS sets (--xla_cpu_experimental_ynn_fusion_type=individual_dot)"


@pytest.mark.subprocess
def test_configure_after_the_cpu_backend_started_warns_and_records_ynnpack_convolutions():
    code = (
        "import json, warnings, jax.numpy as jnp\n"
        "from eos_jax.runtime import configure\n"
        "jnp.ones(2).block_until_ready()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    meta = configure()\n"
        "print(json.dumps({'warnings': [str(w.message) for w in caught], 'conv': meta['cpu_convolutions']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["conv"] == "ynnpack (XLA's default: the CPU backend started before configure())"
    assert len(out["warnings"]) == 1 and EIGEN_CONV_FLAG in out["warnings"][0]
    assert "configure() first" in out["warnings"][0] and "\n" not in out["warnings"][0]


def _hlo(fn, *args, compiler_options=None) -> str:
    """Compiled HLO text without metadata (source locations differ between otherwise equal programs)."""
    text = jax.jit(fn, compiler_options=compiler_options).lower(*args).compile().as_text()
    return re.sub(r"metadata=\{[^}]*\}", "", text)


def test_convolution_setting_changes_convolutions_only():
    if not runtime.eigen_conv_supported():
        pytest.skip("this jaxlib predates the YNNPACK fusion flag")
    # 32 channels: XLA:CPU leaves smaller convolutions (16 channels) out of YNNPACK anyway.
    x = jnp.ones((2, 8, 8, 32), jnp.float32)
    w = jnp.ones((3, 3, 32, 32), jnp.float32)

    def conv_loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y))

    conv = jax.grad(conv_loss)
    eigen = _hlo(conv, w, x, compiler_options=runtime.EIGEN_CONV_COMPILER_OPTIONS)
    ynn = _hlo(conv, w, x, compiler_options=runtime.YNN_CONV_COMPILER_OPTIONS)
    assert "__ynn_fusion" not in eigen and "convolution(" in eigen
    assert "__ynn_fusion" in ynn
    # This process runs under EIGEN_CONV_FLAG (tests/conftest.py), the flag form of the same setting.
    assert EIGEN_CONV_FLAG in os.environ["XLA_FLAGS"].split()
    assert _hlo(conv, w, x) == eigen
    # XLA's default (no flag) is the YNNPACK list: checked on a program without convolutions
    # (a dot, a reduction, elementwise ops), which compiles to the same HLO under both.
    a = jnp.ones((64, 128), jnp.float32)
    b = jnp.ones((128, 32), jnp.float32)
    dense = jax.grad(lambda b, a: jnp.sum(jnp.tanh(a @ b) ** 2))
    dense_ynn = _hlo(dense, b, a, compiler_options=runtime.YNN_CONV_COMPILER_OPTIONS)
    assert "__ynn_fusion" in dense_ynn
    assert _hlo(dense, b, a, compiler_options=runtime.EIGEN_CONV_COMPILER_OPTIONS) == dense_ynn


@pytest.mark.subprocess
@pytest.mark.parametrize("flags", ["--xla_cpu_enable_fast_math=true", "--foo=1 --xla_cpu_enable_fast_math"])
def test_configure_refuses_fast_math(flags):
    proc = _child(flags)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    message = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert "--xla_cpu_enable_fast_math" in message and "fast math" in message


def test_check_xla_flags_parses_tokens():
    check_xla_flags("")
    check_xla_flags("--xla_cpu_enable_fast_math=false --xla_gpu_deterministic_ops=true")
    for bad in ("--xla_cpu_enable_fast_math=true", "--a=1 --xla_cpu_enable_fast_math"):
        with pytest.raises(ConfigError, match="fast_math"):
            check_xla_flags(bad)


def test_configure_rejects_unknown_precision_before_touching_anything():
    before = os.environ.get("XLA_FLAGS")
    with pytest.raises(ConfigError, match="matmul_precision='tf32'"):
        configure(matmul_precision="tf32")
    assert os.environ.get("XLA_FLAGS") == before


_FAULTS_CHILD = r"""
import json, resource, sys
from eos_jax import runtime
meta = runtime.configure()
import jax, jax.numpy as jnp, numpy as np
from jax import lax

@jax.jit
def step(x):  # a chain of 48 MB temporaries XLA:CPU allocates and frees every call
    for i in range(4):
        x = jnp.tanh(x * (1.0 + i)) + lax.cumsum(x, axis=1)
    return x.sum(axis=1)

x = jnp.asarray(np.random.RandomState(0).rand(3000, 4000).astype(np.float32))
for _ in range(2):  # the heap reaches its working size (a cached executable skips compiling's growth)
    step(x).block_until_ready()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"host_memory": meta["host_memory"], "faults": faults, "bits": np.asarray(out).view(np.uint32).tolist()}))
"""


def _faults_child(**env_extra: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", _FAULTS_CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and ru_minflt: Linux only")
def test_retained_host_memory_removes_page_faults_and_keeps_bits():
    retained = _faults_child()
    system = _faults_child(EOS_JAX_HOST_MEMORY="system")
    assert retained["host_memory"] == "retained"
    assert system["host_memory"] == "system (EOS_JAX_HOST_MEMORY=system)"
    # One call's temporaries are several 48 MB buffers (~12k pages each): glibc's defaults map and
    # fault them in anew on every call. Retained, they are reused: a call faults only when the
    # heap grows, because the free space is fragmented (measured: 0-3 calls of 12).
    assert min(system["faults"]) > 10_000, system["faults"]
    assert sum(f < 500 for f in retained["faults"]) >= 6, retained["faults"]
    assert sum(retained["faults"]) < sum(system["faults"]) / 3, (retained["faults"], system["faults"])
    assert retained["bits"] == system["bits"]  # speed only: the same bits


def test_retain_host_memory_after_the_backend_started_is_a_recorded_no_op():
    import jax

    from eos_jax import runtime

    jax.devices()  # this test process's backend is running
    status = runtime.retain_host_memory()
    assert status == "retained" or status.startswith("system (")
    assert runtime.metadata()["host_memory"] == status


_DEFAULT_CHILD = r"""
import json, re, jax, jax.numpy as jnp
from eos_jax import runtime
def hlo(fn, *args, **kw):
    return re.sub(r"metadata=\{[^}]*\}", "", jax.jit(fn, **kw).lower(*args).compile().as_text())
x = jnp.ones((2, 8, 8, 32), jnp.float32); w = jnp.ones((3, 3, 32, 32), jnp.float32)
conv = jax.grad(lambda w, x: jnp.sum(jnp.tanh(jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))))
print(json.dumps({"default_is_ynn": hlo(conv, w, x) == hlo(conv, w, x, compiler_options=runtime.YNN_CONV_COMPILER_OPTIONS),
                  "default_is_eigen": hlo(conv, w, x) == hlo(conv, w, x, compiler_options=runtime.EIGEN_CONV_COMPILER_OPTIONS)}))
"""


@pytest.mark.subprocess
def test_xla_default_is_the_ynnpack_list():
    """What ``bench_models.py`` labels "XLA's default" is: a process without the flag compiles like the YNNPACK list."""
    if not runtime.eigen_conv_supported():
        pytest.skip("this jaxlib predates the YNNPACK fusion flag")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _DEFAULT_CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"default_is_ynn": True, "default_is_eigen": False}
