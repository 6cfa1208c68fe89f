"""Peak resident memory of the main workload, phase by phase, with and without kept host memory.

The workload is the main job's 3-layer CNN (kernels N(0, 1), mean pooling, one logit and binary
cross-entropy, float32) on ``--n`` random 28x28 images: a few gradient-descent steps, one
Hessian-vector product, and the sharpness by Lanczos with ``--iters`` products. Each setting runs
in a fresh child process (peak RSS only grows), which prints its peak RSS after each phase and
XLA's memory analysis of the compiled programs (arguments, outputs, temporaries). Settings:
``eos_jax.runtime.configure()`` as every entry point calls it (freed host memory kept in the
process: ``retain_memory=True``) and with ``retain_memory=False``.

    python benchmarks/bench_memory.py            # 12,000 images, ~1 min on a 2-core CPU
    python benchmarks/bench_memory.py --n 2000   # quicker
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
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eos_jax import hessian
    from experiments import eos

    out: dict = {"retain_memory": retain, "peak_gib": {}}
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12_000, help="images (default 12000)")
    p.add_argument("--iters", type=int, default=20, help="Lanczos products (default 20)")
    p.add_argument("--child", choices=("retain", "release"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.iters, args.child == "retain")))
        return
    rows = []
    for setting in ("retain", "release"):
        cmd = [sys.executable, __file__, "--n", str(args.n), "--iters", str(args.iters), "--child", setting]
        r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(
        f"main-job CNN, 3 layers, {args.n} images of 28x28 (data {first['data_gib']:.3f} GiB), {args.iters} Lanczos products"
    )
    print("peak RSS (GiB) after each phase, a fresh process per setting:")
    print(f"  {'setting':<24}" + "".join(f"{k:>10}" for k in first["peak_gib"]))
    for r in rows:
        name = "retain_memory=" + str(r["retain_memory"])
        print(f"  {name:<24}" + "".join(f"{v:>10.2f}" for v in r["peak_gib"].values()))
    print("XLA's memory analysis of the compiled programs (GiB): temporaries / arguments + outputs + temporaries")
    for name, m in first["programs_gib"].items():
        print(f"  {name:<10} {m['temp']:8.3f} / {m['total']:8.3f}")
    ratio = rows[0]["peak_gib"]["lanczos"] / rows[1]["peak_gib"]["lanczos"]
    print(f"peak with kept memory / peak without: {ratio:.2f}")


if __name__ == "__main__":
    main()
