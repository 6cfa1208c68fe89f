"""The data-parallel HVP and the sharpness solvers on a batch sharded over the devices of several
processes: 2 processes x 1 device, each holding its half of the batch
(``distributed.process_slice`` + ``distributed.shard_batch``), against 1 process x 2 devices on the
full batch, with ``mesh=hessian.data_mesh()`` in both.

Bits: each device runs the same program on the same shard (its 128 examples), and the shards' sums
are joined by one all-reduce per product, over gloo between the processes or inside XLA in one
process. With two shards that all-reduce is one addition, ``a + b``, which is commutative in IEEE
arithmetic, so the order in which either reduction adds does not matter: the HVP, the eigenvalues,
eigenvectors and residuals are asserted BITWISE equal, in float64 and float32 (on failure the
assertion says how many elements differ by how many ulps). With more shards a different
reduction order would change bits; that is not claimed.

Accuracy (1 process x 2 devices against the dense Hessian of the full batch, ``jax.hessian`` in
float64 + ``eigh``): for a symmetric matrix, the Rayleigh quotient ``theta`` of a unit vector with
residual ``r = ||H v - theta v||`` lying above the second eigenvalue satisfies (Kato-Temple)
``lambda_1 - r**2 / (theta - lambda_2) <= theta <= lambda_1``. Lanczos has converged
(its Ritz residual estimate is ~1e-9, so only rounding is left); power iteration stops after 30
products with ``r ~ 0.07-0.08`` and is 0.018 (float64) and 0.020 (float32) low, inside the bound
(0.018 and 0.022). On top of it each side gets ``SLACK * eps(dtype) * lambda_1`` for rounding:
the float32 run sees the data and params rounded to float32 (relative perturbation eps/2 per
entry) and sums 128 examples per shard in float32, and the dense ``eigh`` has its own few eps;
measured Lanczos errors are 3 eps (float64) and 0.14 eps (float32), HVP errors 2.2 eps and 1.1
eps (relative 2-norm), against a slack of 64 eps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import assert_tree_equal_bits
from jax.sharding import Mesh

from eos_jax import distributed as dist
from eos_jax import hessian as hs
from eos_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
N = 256  # examples: 128 per shard
SLACK = 64  # rounding slack against the dense eigenvalue, in units of eps(dtype) * lambda_1 (module docstring)

# argv: coordinator (or "" for one process), num_processes, process_id, output directory, N.
_WORKER = textwrap.dedent(
    """
    import functools, sys
    import numpy as np
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from jax.flatten_util import ravel_pytree
    from eos_jax import distributed as dist, hessian as hs
    from eos_jax.errors import ConfigError

    coord, nproc, pid, out, N = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    dist.initialize(dist.DistributedConfig.from_values(coord, nproc, pid, env={}))
    mesh = hs.data_mesh()  # every process's devices: 2 in both layouts
    assert mesh.size == 2 and jax.process_count() == nproc, (mesh, jax.process_count())

    def loss(p, batch):  # a mean over examples of a tanh MLP's squared error
        x, y = batch
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean(jnp.sum((h @ p["w2"] + p["b2"][None, :] - y) ** 2, axis=1))

    # The full data, the same in every process (NumPy's generator); each process keeps its part.
    rng = np.random.default_rng(0)
    x64, y64 = rng.normal(size=(N, 6)), rng.normal(size=(N, 3))
    p64 = {"w1": rng.normal(size=(6, 8)) / np.sqrt(6), "b1": 0.1 * rng.normal(size=8),
           "w2": rng.normal(size=(8, 3)) / np.sqrt(8), "b2": 0.1 * rng.normal(size=3)}
    v64 = {k: rng.normal(size=a.shape) for k, a in p64.items()}
    mine = dist.process_slice(N, mesh)
    assert (mine.start, mine.stop) == ((pid * N // 2, (pid + 1) * N // 2) if nproc == 2 else (0, N)), mine
    res = {}
    for dt in (np.float64, np.float32):
        name = np.dtype(dt).name
        p, v = ({k: jnp.asarray(a, dt) for k, a in t.items()} for t in (p64, v64))
        batch = dist.shard_batch((x64[mine].astype(dt), y64[mine].astype(dt)), mesh)
        assert batch[0].shape == (N, 6) and batch[0].is_fully_addressable == (nproc == 1)

        def curvature(p, b, v):  # one program: the HVP and both solvers
            solve = functools.partial(hs.top_eigenvalue, loss, p, b, num_iters=30, key=jax.random.key(3), mesh=mesh)
            return hs.data_parallel_hvp(loss, p, b, v, mesh=mesh), {m: solve(method=m) for m in ("lanczos", "power")}

        hv, eig = jax.jit(curvature)(p, batch, v)
        res[name + "_hvp"] = ravel_pytree(dist.to_host(hv))[0]
        for method, r in eig.items():
            assert r.eigenvalue.is_fully_replicated, r.eigenvalue.sharding
            res[f"{name}_{method}_float"] = np.asarray(float(r.eigenvalue), dt)  # this process's copy
            res[f"{name}_{method}_vec_local"] = np.asarray(r.eigenvector["w1"])  # readable as is
            h = dist.to_host(r)
            res[f"{name}_{method}_eig"] = h.eigenvalue
            res[f"{name}_{method}_vec"] = ravel_pytree(h.eigenvector)[0]
            res[f"{name}_{method}_res"] = h.residual
            res[f"{name}_{method}_n"] = h.num_hvps
    if nproc == 1:  # the reference: the dense Hessian of the full batch in float64
        flat, unravel = ravel_pytree(p64)
        H = np.asarray(jax.jit(jax.hessian(lambda f, b: loss(unravel(f), b)))(flat, (x64, y64)))
        res["dense_eigs"] = np.linalg.eigvalsh(H)
        res["dense_hvp"] = H @ ravel_pytree(v64)[0]
    np.savez(f"{out}/p{nproc}_{pid}.npz", **res)

    # Errors: raised alike on every process (the sizes are compared after one all-gather).
    errors = []
    try:  # 2 processes: 4 and 6 examples; 1 process on 2 devices: 5 examples
        dist.shard_batch(np.zeros((4 + 2 * pid if nproc == 2 else 5, 3)), mesh)
    except ConfigError as e:
        errors.append(str(e))
    try:
        dist.process_slice(N + 1, mesh)
    except ConfigError as e:
        errors.append(str(e))
    with open(f"{out}/p{nproc}_{pid}.err", "w") as f:
        f.write("\\n".join(errors))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("EOS_JAX_COORDINATOR")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _start(out: Path, coordinator: str, nproc: int, pid: int, devices: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _WORKER, coordinator, str(nproc), str(pid), str(out), str(N)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.subprocess
def test_two_processes_equal_one_process_with_two_devices_bitwise_and_match_dense(tmp_path):
    # All three at once: (a) 2 processes x 1 device, (b) 1 process x 2 devices.
    port = _free_port()
    procs = [_start(tmp_path, f"127.0.0.1:{port}", 2, i, 1) for i in range(2)] + [_start(tmp_path, "", 1, 0, 2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    a0, a1, b = (dict(np.load(tmp_path / f"{n}.npz")) for n in ("p2_0", "p2_1", "p1_0"))
    keys = sorted(k for k in b if not k.startswith("dense"))
    assert set(a0) == set(a1) == set(keys) and len(keys) == 2 * (1 + 2 * 6)
    for k in keys:
        # Every process of (a) read the same value from its own copy ...
        assert_tree_equal_bits(a0[k], a1[k], f"{k}: process 0 vs process 1")
        # ... and the same bits as one process with two devices (module docstring: why bitwise).
        assert_tree_equal_bits(a0[k], b[k], f"{k}: 2 processes x 1 device vs 1 process x 2 devices")
    for dt in ("float64", "float32"):
        for m in ("lanczos", "power"):
            assert b[f"{dt}_{m}_float"] == b[f"{dt}_{m}_eig"] and b[f"{dt}_{m}_n"] == 30

    # (b) against the dense Hessian of the full batch (Kato-Temple bound, module docstring).
    lam1, lam2 = b["dense_eigs"][-1], b["dense_eigs"][-2]
    assert lam1 > 0 and lam1 - lam2 > 0.1, b["dense_eigs"][-3:]  # a gap the bound can use
    for dt in ("float64", "float32"):
        slack = SLACK * np.finfo(dt).eps * lam1
        hv, dense_hv = b[dt + "_hvp"].astype(np.float64), b["dense_hvp"]
        assert np.linalg.norm(hv - dense_hv) <= slack * np.linalg.norm(b["dense_hvp"]) / lam1, dt
        for m in ("lanczos", "power"):
            theta, r = float(b[f"{dt}_{m}_eig"]), float(b[f"{dt}_{m}_res"])
            assert theta > lam2, (dt, m, theta, lam2)
            low = lam1 - r**2 / (theta - lam2) - slack
            assert low <= theta <= lam1 + slack, (dt, m, theta, lam1, r, low)
            if m == "lanczos":  # converged: only rounding is left
                assert r <= 1e-6 * lam1 and abs(theta - lam1) <= slack, (dt, theta, lam1, r)

    # The helpers' errors in several processes: one line, the same on every process.
    e0, e1, eb = ((tmp_path / f"{n}.err").read_text().splitlines() for n in ("p2_0", "p2_1", "p1_0"))
    assert e0 == e1 and len(e0) == 2, (e0, e1)
    assert "local batch sizes differ between processes" in e0[0], e0
    assert "(process 0: 4 over 1 device, process 1: 6 over 1 device); expected the same number" in e0[0], e0
    assert "n=257 is not allowed" in e0[1] and "multiple of the 2 devices" in e0[1], e0
    assert len(eb) == 2 and "local batch size 5 of process 0 is not allowed" in eb[0], eb
    assert "expected a multiple of its 2 devices on mesh axis 'data'" in eb[0], eb


def test_shard_batch_and_process_slice_one_process_and_their_errors():
    mesh = hs.data_mesh(jax.devices()[:1])
    assert hs.data_mesh().devices.tolist() == jax.devices()  # every process's devices (here: one process's)
    n = 6 * len(jax.devices())
    assert dist.process_slice(6, mesh) == slice(0, 6) and dist.process_slice(n) == slice(0, n)  # one process: all
    x = np.arange(12.0).reshape(6, 2)
    out = dist.shard_batch({"x": x, "y": x[:, 0]}, mesh)
    assert tuple(out["x"].sharding.spec) == ("data",) and np.array_equal(np.asarray(out["x"]), x)
    assert np.array_equal(np.asarray(out["y"]), x[:, 0])

    def one_line(fn, *needles):
        with pytest.raises(ConfigError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg

    one_line(lambda: dist.shard_batch({"x": x, "y": x[:5]}, mesh), "leading sizes [5, 6]", "one leading example axis")
    one_line(lambda: dist.shard_batch({"x": x, "s": np.float64(1)}, mesh), "leading sizes [-1, 6]", "scalar leaf")
    one_line(lambda: dist.shard_batch({}, mesh), "leading sizes []")
    one_line(lambda: dist.shard_batch(x, mesh, axis="model"), "axis='model' is not allowed", "('data',)")
    two_axes = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    one_line(lambda: dist.shard_batch(x, two_axes), "mesh has axes ('data', 'model')", "pass axis=")
    assert dist.shard_batch(x, two_axes, axis="data").shape == (6, 2)
    one_line(lambda: dist.process_slice(0, mesh), "n=0 is not allowed", "positive multiple of the 1 devices")
    one_line(lambda: dist.process_slice(True, mesh), "n=True is not allowed")
