"""Cost of Hessian-vector products and of sharpness tracking (eos_jax.hessian), measured in one run.

Network: the paper's Figure 8 tanh MLP 3072-200-200-10 (cross-entropy, float32) on 5000
CIFAR-5k-shaped random examples. Prints, all measured on the machine at hand in this run:

* HVP time / gradient time, for a fresh ``jvp(grad)`` and for a product through one
  ``jax.linearize`` (marginal cost per product inside one jitted loop). Goal: linearized <= 1.3x.
* Lanczos products needed for a relative residual <= 1e-3 (so relative eigenvalue error <= 1e-3),
  cold (random start) and warm (previous eigenvector, after ``--track-every`` GD steps), with the
  actual errors against a tight reference. Goal: warm-started tracking within 10 products.

    python benchmarks/bench_hessian.py            # ~1-3 min on a 2-core CPU
    python benchmarks/bench_hessian.py --n 1000   # quicker
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eos_jax import hessian as hs
from eos_jax.runtime import configure


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    """PyTorch-style uniform init of a dense stack, float32."""
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = float(1 / np.sqrt(a))
        params.append(
            {
                "w": jax.random.uniform(kw, (a, b), jnp.float32, -bound, bound),
                "b": jax.random.uniform(kb, (b,), jnp.float32, -bound, bound),
            }
        )
    return params


def loss_fn(params: list[dict[str, jax.Array]], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean cross-entropy of a tanh MLP."""
    x, y = batch
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"][None, :])
    logits = h @ params[-1]["w"] + params[-1]["b"][None, :]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def timeit(fn, *args, repeats: int) -> float:
    """Fastest wall time of ``fn(*args)`` after one warm-up (compile) call, in seconds.

    The minimum, not the median: on a shared CPU other processes only ever add time.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="number of examples")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop", type=int, default=10, help="products per jitted loop for the marginal cost")
    ap.add_argument("--track-every", type=int, default=5, help="GD steps between sharpness evaluations")
    ap.add_argument("--lr", type=float, default=2 / 150, help="GD learning rate (paper Fig. 8: 2/150)")
    args = ap.parse_args()
    configure(x64=False)
    print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} n={args.n}")

    key = jax.random.key(0)
    params = init_mlp(key, (3072, 200, 200, 10))
    x = jax.random.uniform(jax.random.fold_in(key, 100), (args.n, 3072), jnp.float32)
    y = jax.random.randint(jax.random.fold_in(key, 101), (args.n,), 0, 10, jnp.int32)
    batch = (x, y)
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / 100, params)

    grad = jax.jit(jax.grad(loss_fn))
    plain = jax.jit(lambda p, b, t: hs.hvp(loss_fn, p, b, t))

    def lin_loop(p, b, t, k):
        f = hs.linearized_hvp(loss_fn, p, b)
        return lax.fori_loop(0, k, lambda i, u: jax.tree_util.tree_map(lambda a: a * 1e-2, f(u)), t)

    lin = jax.jit(lin_loop, static_argnums=3)
    t_grad = timeit(grad, params, batch, repeats=args.repeats)
    t_plain = timeit(plain, params, batch, v, repeats=args.repeats)
    t_lin1 = timeit(lin, params, batch, v, 1, repeats=args.repeats)
    t_link = timeit(lin, params, batch, v, 1 + args.loop, repeats=args.repeats)
    t_lin = (t_link - t_lin1) / args.loop
    print(f"gradient                  {1e3 * t_grad:8.1f} ms")
    print(f"hvp jvp(grad)             {1e3 * t_plain:8.1f} ms   ratio to gradient {t_plain / t_grad:5.2f}")
    print(
        f"hvp linearized (marginal) {1e3 * t_lin:8.1f} ms   ratio to gradient {t_lin / t_grad:5.2f}"
        f"   (goal <= 1.3; linearize + 1 product {1e3 * t_lin1:.1f} ms)"
    )

    # hessian.top_eigenvalue as a notebook calls it (its defaults): the slope per product between 10 and 30 iterations.
    top = jax.jit(lambda p, b, n: hs.top_eigenvalue(loss_fn, p, b, num_iters=n).eigenvalue, static_argnums=2)
    t_few = timeit(top, params, batch, 10, repeats=args.repeats)
    t_many = timeit(top, params, batch, 30, repeats=args.repeats)
    per = (t_many - t_few) / 20
    print(f"top_eigenvalue defaults   {1e3 * per:8.1f} ms   per product, ratio to gradient {per / t_grad:5.2f}")

    # Sharpness tracking: cold vs warm Lanczos to a relative residual of 1e-3.
    eig = jax.jit(
        lambda p, b, v0, tol_key: hs.top_eigenvalue(loss_fn, p, b, num_iters=60, tol=1e-3, v0=v0, key=tol_key)
    )
    ref_eig = jax.jit(lambda p, b: hs.top_eigenvalue(loss_fn, p, b, num_iters=80, tol=1e-6))
    gd = jax.jit(lambda p, b: jax.tree_util.tree_map(lambda w, g: w - args.lr * g, p, jax.grad(loss_fn)(p, b)))
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    prev = eig(params, batch, zero, jax.random.key(1))
    print(f"step 0: cold products {int(prev.num_hvps)}  eigenvalue {float(prev.eigenvalue):.5g}")
    for round_ in range(1, 4):
        for _ in range(args.track_every):
            params = gd(params, batch)
        ref = jax.block_until_ready(ref_eig(params, batch))
        cold = jax.block_until_ready(eig(params, batch, zero, jax.random.key(round_ + 1)))  # not in t_warm
        t0 = time.perf_counter()
        warm = jax.block_until_ready(eig(params, batch, prev.eigenvector, jax.random.key(round_ + 1)))
        t_warm = time.perf_counter() - t0
        n_compiled = eig._cache_size()  # noqa: SLF001 (a recompile would inflate t_warm)
        err = lambda r: abs(float(r.eigenvalue) - float(ref.eigenvalue)) / abs(float(ref.eigenvalue))  # noqa: E731
        print(
            f"step {round_ * args.track_every}: lambda_max {float(ref.eigenvalue):.5g} "
            f"(lr*lambda {args.lr * float(ref.eigenvalue):.3f})  products cold {int(cold.num_hvps)} "
            f"(rel err {err(cold):.1e})  warm {int(warm.num_hvps)} (rel err {err(warm):.1e}, {t_warm:.2f} s, "
            f"{n_compiled} compiled)"
            "   (goal: warm <= 10)"
        )
        prev = warm


if __name__ == "__main__":
    main()
