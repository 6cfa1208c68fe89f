"""What a notebook loses without ``eos_jax.runtime.configure()``: a GD step of the main job's CNN, measured in one run.

Three fresh processes each time a GD step of the 3-layer CNN on 12,000 28x28 images (the bundled
Fashion-MNIST subset, tiled six times): without ``configure()``, with it called first, and with its
host-memory settings (glibc ``mallopt``) applied only after the JAX backend started. Prints each
mode's fastest and median step and the ratios to the configured one::

    python benchmarks/bench_configure.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MODES = ("none", "before", "after")


def child(mode: str, repeats: int) -> None:
    """One measurement in this process (``mode``: when, if at all, the runtime is configured)."""
    if mode == "before":
        from eos_jax import runtime

        runtime.configure()
    import ctypes
    import ctypes.util

    import jax
    import jax.numpy as jnp
    import numpy as np

    from eos_jax import data, losses, models

    jnp.zeros(1).block_until_ready()  # the backend starts here
    if mode == "after":  # runtime.retain_host_memory's settings, too late
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        for param, value in ((-8, 1), (-4, 0), (-1, (1 << 31) - 1)):
            libc.mallopt(param, value)
    ds = data.load("fashion_mnist01_bundled", "train")
    x = jnp.asarray(np.tile(np.asarray(ds.x), (6, 1, 1, 1)), jnp.float32)
    y = jnp.asarray(np.tile(np.asarray(ds.y), 6))
    model = models.get("cnn", layers=3, init="normal")
    params = model.init(jax.random.key(0), (28, 28, 1))["params"]

    def loss(p):
        z, _ = model.apply({"params": p}, x, train=True)
        return losses.binary_cross_entropy(z, y)

    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda w, g: w - 1e-3 * g, p, jax.grad(loss)(p)))
    params = jax.block_until_ready(step(params))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params = jax.block_until_ready(step(params))
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"{times[0]:.4f} {times[len(times) // 2]:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.repeats)
        return 0
    got = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        got[mode] = (float(out[-2]), float(out[-1]))
        print(f"{mode:7s} step fastest {got[mode][0]:.3f} s, median {got[mode][1]:.3f} s", flush=True)
    for mode in ("none", "after"):
        print(f"{mode} / configured (fastest): {got[mode][0] / got['before'][0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
