"""Peak resident memory of the main workload, phase by phase, with and without kept host memory.

The workload is the main job's 3-layer CNN (kernels N(0, 1), mean pooling, one logit and binary
cross-entropy, float32) on ``--n`` random 28x28 images: a few gradient-descent steps, one
Hessian-vector product, and the sharpness by Lanczos with ``--iters`` products. Each setting runs
in a fresh child process (peak RSS only grows), which prints its peak RSS after each phase and
XLA's memory analysis of the compiled programs (arguments, outputs, temporaries). Settings:
``eos_jax.runtime.configure()`` as every entry point calls it (freed host memory kept in the
process: ``retain_memory=True``) and with ``retain_memory=False``; and, with ``--torch``, the same work
written as a PyTorch user would (``conv2d``, autograd's double backward for the products, Lanczos with
full reorthogonalization as PyHessian does), in a process that imports no JAX. The last line is the
ratio of the peaks: eos-jax / PyTorch.

    python benchmarks/bench_memory.py            # 12,000 images, 3 runs per setting, ~3 min on a 2-core CPU
    python benchmarks/bench_memory.py --n 2000   # quicker
    python benchmarks/bench_memory.py --torch    # and PyTorch's peak (needs torch installed)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

GIB = 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def child(n: int, iters: int, retain: bool) -> dict:
    """The workload in this process; returns peak RSS after each phase and the programs' sizes."""
    from eos_jax import runtime

    runtime.configure(retain_memory=retain)
    host_memory = runtime.retain_host_memory() if retain else "system (retain_memory=False)"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eos_jax import hessian
    from experiments import eos

    out: dict = {"retain_memory": retain, "host_memory": host_memory, "peak_gib": {}}
    rs = np.random.RandomState(0)
    x = rs.rand(n, 28, 28, 1).astype(np.float32)
    y = rs.randint(0, 2, n).astype(np.int32)
    prob, _ = eos.build_problem(eos.default_config("cnn", num_examples=None), {"x": x, "y": y, "num_classes": 2})
    data = jax.device_put(prob.data)
    params = prob.init_params(jax.random.key(0))
    out["peak_gib"]["data"] = _peak_gib()

    def gd(p, b):
        g = jax.grad(prob.loss_fn)(p, b)
        return jax.tree_util.tree_map(lambda w, d: w - jnp.float32(5.0) * d, p, g)

    step = jax.jit(gd).lower(params, data).compile()
    for _ in range(3):
        params = step(params, data)
    jax.block_until_ready(params)
    out["peak_gib"]["gd_steps"] = _peak_gib()
    hvp = jax.jit(lambda p, b, v: hessian.hvp(prob.loss_fn, p, b, v)).lower(params, data, params).compile()
    jax.block_until_ready(hvp(params, data, params))
    out["peak_gib"]["hvp"] = _peak_gib()
    eig_fn = jax.jit(lambda p, b: hessian.top_eigenvalue(prob.loss_fn, p, b, num_iters=iters).eigenvalue)
    eig = eig_fn.lower(params, data).compile()
    jax.block_until_ready(eig(params, data))
    out["peak_gib"]["lanczos"] = _peak_gib()
    out["programs_gib"] = {}
    for name, prog in (("gd_step", step), ("hvp", hvp), ("lanczos", eig)):
        m = prog.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        out["programs_gib"][name] = {"temp": m.temp_size_in_bytes / GIB, "total": total / GIB}
    out["data_gib"] = x.nbytes / GIB
    return out


def torch_child(n: int, iters: int) -> dict:
    """The same workload in PyTorch (imports no JAX): the peaks after each phase."""
    import numpy as np
    import torch

    out: dict = {"retain_memory": "torch", "peak_gib": {}}
    rs = np.random.RandomState(0)
    x = torch.from_numpy(rs.rand(n, 28, 28, 1).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(rs.randint(0, 2, n).astype(np.float32))
    gen = torch.Generator().manual_seed(0)
    ks = [torch.randn(1, 1, 3, 3, generator=gen).requires_grad_() for _ in range(3)]  # kernels N(0, 1)
    out["peak_gib"]["data"] = _peak_gib()

    def loss(ps):  # valid cross-correlation, no bias, Swish(1), mean pooling, one logit, BCE
        h = x
        for k in ps:
            h = torch.nn.functional.conv2d(h, k)
            h = h * torch.sigmoid(h)
        return torch.nn.functional.binary_cross_entropy_with_logits(h.mean(dim=(1, 2, 3)), y)

    for _ in range(3):
        grads = torch.autograd.grad(loss(ks), ks)
        with torch.no_grad():
            for k, g in zip(ks, grads):
                k.sub_(5.0 * g)  # the paper's update: the product rounded, then the sum
    out["peak_gib"]["gd_steps"] = _peak_gib()
    grads = torch.autograd.grad(loss(ks), ks, create_graph=True)

    def hvp(flat):
        vs = [c.view(1, 1, 3, 3) for c in torch.split(flat, 9)]
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, ks, grad_outputs=vs, retain_graph=True)])

    hvp(torch.ones(27))
    out["peak_gib"]["hvp"] = _peak_gib()
    q = torch.zeros((iters, 27))
    v = torch.randn(27, generator=gen)
    q[0] = v / torch.linalg.norm(v)
    alpha, beta = torch.zeros(iters), torch.zeros(max(iters - 1, 0))
    for j in range(iters):  # Lanczos with full reorthogonalization (PyHessian's density)
        w = hvp(q[j])
        alpha[j] = torch.dot(w, q[j])
        w = w - q[: j + 1].T @ (q[: j + 1] @ w)
        if j + 1 < iters:
            beta[j] = torch.linalg.norm(w)
            q[j + 1] = w / beta[j]
    torch.linalg.eigvalsh(torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1))
    out["peak_gib"]["lanczos"] = _peak_gib()
    out["data_gib"] = x.numel() * 4 / GIB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12_000, help="images (default 12000)")
    p.add_argument("--iters", type=int, default=20, help="Lanczos products (default 20)")
    p.add_argument("--torch", action="store_true", help="also run the workload in PyTorch (needs torch)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per setting (default 3)")
    p.add_argument("--child", choices=("retain", "release", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "torch":
        print(json.dumps(torch_child(args.n, args.iters)))
        return
    if args.child:
        print(json.dumps(child(args.n, args.iters, args.child == "retain")))
        return
    settings = ("retain", "release") + (("torch",) if args.torch else ())
    rows: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine fall on every setting alike
        for setting in settings:
            cmd = [sys.executable, __file__, "--n", str(args.n), "--iters", str(args.iters), "--child", setting]
            r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=True)
            rows[setting].append(json.loads(r.stdout.strip().splitlines()[-1]))
    first = rows["retain"][0]
    print(
        f"main-job CNN, 3 layers, {args.n} images of 28x28 (data {first['data_gib']:.3f} GiB), {args.iters} Lanczos "
        f"products; host memory: {first['host_memory']}"
    )
    print(f"peak RSS (GiB) after each phase, a fresh process per run, {args.repeats} runs per setting:")
    print(f"  {'setting':<24}" + "".join(f"{k:>10}" for k in first["peak_gib"]))
    names = {"retain": "retain_memory=True", "release": "retain_memory=False", "torch": "PyTorch"}
    for setting, runs in rows.items():
        for r in runs:
            print(f"  {names[setting]:<24}" + "".join(f"{v:>10.2f}" for v in r["peak_gib"].values()))
    print("XLA's memory analysis of the compiled programs (GiB): temporaries / arguments + outputs + temporaries")
    for name, m in first["programs_gib"].items():
        print(f"  {name:<10} {m['temp']:8.3f} / {m['total']:8.3f}")
    peak = {k: [r["peak_gib"]["lanczos"] for r in runs] for k, runs in rows.items()}
    print(f"peak with kept memory / peak without: {max(peak['retain']) / max(peak['release']):.2f} (largest of each)")
    if args.torch:
        t = max(peak["torch"])
        print(
            f"peak eos-jax / PyTorch (largest of each): {max(peak['retain']) / t:.2f} with kept memory (as the CLIs "
            f"run; {min(peak['retain']) / t:.2f}-{max(peak['retain']) / t:.2f} over the runs), "
            f"{max(peak['release']) / t:.2f} without"
        )


if __name__ == "__main__":
    main()
