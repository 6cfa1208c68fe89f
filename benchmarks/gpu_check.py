"""GPU readiness check: the bits and the speed a GPU run of eos-jax depends on, in one script.

Run on a GPU (the paper's sizes; a few minutes on one H100/H200-class GPU, most of it compiling)::

    python benchmarks/gpu_check.py --out gpu_check.json

and on a CPU with small sizes (the test suite runs this, about a minute on 2 cores)::

    python benchmarks/gpu_check.py --quick

It prints, measured in this one run, and writes as one JSON summary (``--out``):

(a) the perturbed update ``u = -(lr/k)*(k*g)`` of Section 4.1 and ``theta + u`` for k = 1..12 on this device, jitted
    with k a constant and vmapped with k traced, against the same three roundings done by NumPy,
    element by element (float32, and float64 where x64 is on): the number of differing elements;
(b) determinism: the same small training run (GD steps of the paper's CNN plus one Lanczos
    sharpness estimate) twice in one process, compared by SHA-256 of the final parameters and
    the bits of the eigenvalue (on a GPU this needs ``--xla_gpu_deterministic_ops=true``, which
    :func:`eos_jax.runtime.configure` sets before the backend starts);
(c) float32 matmuls at the configured precision (``highest``) against a float64 reference:
    the largest relative error, and whether it is at float32 level (TF32 would give ~1e-3);
(d) speed: one full-batch GD step of the main job (3-layer single-channel CNN; 12,000 28x28
    images on a GPU), one 20-product Lanczos sharpness estimate, and one SGD step (Nesterov
    momentum 0.9, weight decay 5e-4, batch 128, 32x32x3) of Table 1's ResNet-56 for 6 k-lanes as
    one vmapped program against one lane alone (goal on a GPU: 6 lanes in at most 2x the time
    of one);
(e) a JSON summary of all of it, with ``ok`` per check.

Exit status 0 when every bitwise check (a, b, c) passes; the speed goal (d) is reported, not
enforced (it is a property of the machine). ``--quick`` shrinks every size (k = 1..5 and 8 in (a), the 1-layer CNN in (b) and (d), and 2
lanes of a ResNet-8 of the same construction instead of ResNet-56; host-made data and jitted
inits) so that CPU runs stay short.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eos_jax import runtime

# The runtime (x64, matmul precision, deterministic GPU ops) must be set before any JAX backend starts.
_META = runtime.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from bench_models import _time  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from eos_jax import hessian, losses, metrics, models, optim  # noqa: E402
from eos_jax.models.resnet import ResNetCifar  # noqa: E402

# ----------------------------------------------------------------------------- (a) perturbed update


def _numpy_perturbed(theta: np.ndarray, g: np.ndarray, lr: float, k: int) -> np.ndarray:
    """The three roundings of (PERTURBED SGD) in NumPy, in theta's dtype, then the sum."""
    d = theta.dtype.type
    q = d(lr) / d(k)
    p = d(k) * g
    return theta + (-(q * p))


def check_perturbed_update(n: int, lr: float = 0.1, ks: tuple[int, ...] = tuple(range(1, 13))) -> dict[str, Any]:
    """(a): jitted (k constant: one program per k) and vmapped (k traced) update and new parameters vs NumPy."""
    ks = list(ks)
    dtypes = [np.float32] + ([np.float64] if jax.config.jax_enable_x64 else [])
    out: dict[str, Any] = {"k": ks, "lr": lr, "n": n, "per_dtype": {}}
    ok = True
    rng = np.random.default_rng(0)
    for dt in dtypes:
        theta = rng.standard_normal(n).astype(dt)
        g = rng.standard_normal(n).astype(dt)  # updates of order lr * theta: most last bits reach theta
        d = np.dtype(dt).type
        ref_upd = np.stack([-((d(lr) / d(k)) * (d(k) * g)) for k in ks])
        ref = np.stack([_numpy_perturbed(theta, g, lr, k) for k in ks])

        def step(th, gr, k):
            tx = optim.perturbed_scale(lr, k=k)
            upd, _ = tx.update(gr, tx.init(th))
            return jnp.stack([upd, optax.apply_updates(th, upd)])

        const = np.stack([np.asarray(jax.jit(lambda th, gr, k=k: step(th, gr, k))(theta, g)) for k in ks])
        traced = np.asarray(jax.jit(jax.vmap(step, in_axes=(None, None, 0)))(theta, g, jnp.asarray(ks, jnp.int32)))
        want = np.stack([ref_upd, ref], axis=1)  # (k, [update, new theta], n)
        d_const = metrics.ulp_diff(const, want)
        d_traced = metrics.ulp_diff(traced, want)
        # Sanity of the reference itself: odd k must perturb some elements, powers of two none.
        k1 = ref[0]
        perturbed = {k: int(np.sum(ref[i] != k1)) for i, k in enumerate(ks)}
        pow2_equal = all(perturbed[k] == 0 for k in ks if k & (k - 1) == 0)
        some_odd = any(perturbed[k] > 0 for k in ks if k % 2 == 1 and k > 1)
        entry = {
            "const_k_differing_elements": d_const.n_diff,
            "const_k_max_ulp": d_const.max_ulp,
            "traced_k_differing_elements": d_traced.n_diff,
            "traced_k_max_ulp": d_traced.max_ulp,
            "elements_changed_vs_k1_by_k": perturbed,
            "powers_of_two_equal_k1": pow2_equal,
            "odd_k_perturb": some_odd,
        }
        entry["ok"] = d_const.n_diff == 0 and d_traced.n_diff == 0 and pow2_equal and some_odd
        ok &= entry["ok"]
        out["per_dtype"][np.dtype(dt).name] = entry
    out["ok"] = ok
    return out


# ----------------------------------------------------------------------------- (b) determinism


def _cnn_problem(num_images: int, size: int, dtype: str = "float32", layers: int = 3):
    """The main job's model (``layers``-layer single-channel 3x3 Swish CNN, BCE) on random binary data."""
    model = models.get("cnn", layers=layers, dtype=dtype)
    rng = np.random.default_rng(7)  # host data: no device programs to compile for it
    x = rng.uniform(size=(num_images, size, size, 1)).astype(dtype)
    y = (rng.uniform(size=num_images) < 0.5).astype(np.int32)
    # One compiled init (an eager init dispatches, and compiles, every op of the forward pass).
    params = jax.jit(lambda k: model.init(k, (size, size, 1))["params"])(jax.random.key(7))

    def loss_fn(p, batch):
        logits, _ = model.apply({"params": p}, batch["x"], train=True)
        return losses.binary_cross_entropy(logits, batch["y"])

    return params, {"x": x, "y": y}, loss_fn


def check_determinism(
    num_images: int, size: int, steps: int, lr: float = 5.0, eig_iters: int = 20, layers: int = 3
) -> dict[str, Any]:
    """(b): the same GD run plus a sharpness estimate twice; digests and eigenvalue bits equal."""
    params, batch, loss_fn = _cnn_problem(num_images, size, layers=layers)

    def run(p, b):
        tx = optim.sgd(lr, k=3)
        st = tx.init(p)

        def body(carry, _):
            p_, st_ = carry
            g = jax.grad(loss_fn)(p_, b)
            u, st_ = tx.update(g, st_, p_)
            return (optax.apply_updates(p_, u), st_), None

        (p, _), _ = jax.lax.scan(body, (p, st), None, length=steps)
        eig = hessian.top_eigenvalue(loss_fn, p, b, num_iters=eig_iters, key=jax.random.key(1))
        return p, eig.eigenvalue

    f = jax.jit(run)
    p1, e1 = jax.device_get(f(params, batch))
    f2 = jax.jit(run)  # a second compilation as well as a second execution
    p2, e2 = jax.device_get(f2(params, batch))
    d = metrics.ulp_diff(p1, p2)
    eig_equal = bool(np.asarray(e1).tobytes() == np.asarray(e2).tobytes())
    out = {
        "layers": layers,
        "steps": steps,
        "num_images": num_images,
        "digest_run1": metrics.tree_digest(p1),
        "digest_run2": metrics.tree_digest(p2),
        "differing_elements": d.n_diff,
        "max_ulp": d.max_ulp,
        "eigenvalue": float(e1),
        "eigenvalue_bits_equal": eig_equal,
        "deterministic_flag_set": runtime.DETERMINISTIC_GPU_FLAG in _META["xla_flags"].split(),
    }
    out["ok"] = out["digest_run1"] == out["digest_run2"] and eig_equal
    return out


# ----------------------------------------------------------------------------- (c) matmul precision


def check_matmul_precision(n: int) -> dict[str, Any]:
    """(c): float32 matmul at the configured precision vs a float64 reference (no TF32)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    got = np.asarray(jax.jit(jnp.matmul)(a, b)).astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)  # error bound scale per element
    rel = float(np.max(np.abs(got - ref) / scale))
    # float32 accumulation gives ~n * 2^-24 / sqrt-ish; TF32 (10-bit mantissa inputs) gives ~1e-3.
    limit = 1e-5
    return {
        "n": n,
        "matmul_precision": _META["matmul_precision"],
        "max_error_relative_to_abs_product": rel,
        "limit": limit,
        "ok": rel < limit,
    }


# ----------------------------------------------------------------------------- (d) speed


def time_main_job(num_images: int, size: int, repeats: int, eig_iters: int = 20, layers: int = 3) -> dict[str, Any]:
    """(d): one full-batch GD step of the main job and one ``eig_iters``-product Lanczos estimate."""
    params, batch, loss_fn = _cnn_problem(num_images, size, layers=layers)
    tx = optim.sgd(5.0, k=1)

    @jax.jit
    def step(p, b):
        g = jax.grad(loss_fn)(p, b)
        u, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, u)

    @jax.jit
    def grad_only(p, b):
        return jax.grad(loss_fn)(p, b)

    @jax.jit
    def sharp(p, b):
        return hessian.top_eigenvalue(loss_fn, p, b, num_iters=eig_iters, key=jax.random.key(2)).eigenvalue

    c_step, t_step = _time(step, params, batch, repeats=repeats)
    _, t_grad = _time(grad_only, params, batch, repeats=repeats)
    c_sharp, t_sharp = _time(sharp, params, batch, repeats=max(1, repeats // 2))
    return {
        "layers": layers,
        "num_images": num_images,
        "gd_step_s": t_step,
        "gd_step_compile_s": c_step,
        "gradient_s": t_grad,
        "sharpness_products": eig_iters,
        "sharpness_s": t_sharp,
        "sharpness_compile_s": c_sharp,
        "sharpness_in_gradients": t_sharp / t_grad,
    }


def time_resnet_lanes(blocks_per_stage: int, batch_size: int, num_lanes: int, repeats: int) -> dict[str, Any]:
    """(d): Table 1's k-lanes of a CIFAR ResNet as one vmapped SGD step vs one lane alone."""
    module = ResNetCifar(blocks_per_stage, 10, "relu", 1.0, "pytorch", jnp.float32)
    key = jax.random.key(3)
    rng = np.random.default_rng(3)  # host data: no device programs to compile for it
    x = rng.standard_normal((batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    # One compiled init (an eager init dispatches every layer's ops one by one).
    variables = jax.jit(lambda k, xb: module.init(k, xb, train=False))(jax.random.fold_in(key, 3), x[:1])
    params, stats = variables["params"], variables["batch_stats"]
    num_params = int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))

    def one_step(p, s, opt_state, k, xb, yb):
        def loss_fn(pp):
            logits, mut = module.apply({"params": pp, "batch_stats": s}, xb, train=True, mutable=["batch_stats"])
            return losses.cross_entropy(logits, yb), mut["batch_stats"]

        (loss, new_s), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        tx = optim.sgd(0.1, k=k, momentum=0.9, nesterov=True, weight_decay=5e-4)
        u, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, u), new_s, opt_state, loss

    def init_opt(p):
        return optim.sgd(0.1, k=1, momentum=0.9, nesterov=True, weight_decay=5e-4).init(p)

    ks = jnp.asarray([2 * i + 1 for i in range(num_lanes)], jnp.int32)  # k = 1, 3, 5, ... (Table 1: 1..11)
    single = jax.jit(one_step)
    lanes = jax.jit(jax.vmap(one_step, in_axes=(0, 0, 0, 0, None, None)))
    stack = lambda t: jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_lanes, *a.shape)), t)  # noqa: E731
    opt1 = init_opt(params)
    c1, t1 = _time(single, params, stats, opt1, jnp.asarray(1, jnp.int32), x, y, repeats=repeats)
    cl, tl = _time(lanes, stack(params), stack(stats), stack(opt1), ks, x, y, repeats=repeats)
    return {
        "depth": 6 * blocks_per_stage + 2,
        "num_params": num_params,
        "batch_size": batch_size,
        "num_lanes": num_lanes,
        "one_lane_step_s": t1,
        "lanes_step_s": tl,
        "one_lane_compile_s": c1,
        "lanes_compile_s": cl,
        "lanes_over_one": tl / t1,
        "goal_lanes_over_one": 2.0,
        "goal_met": tl / t1 <= 2.0,
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU (the test suite)")
    p.add_argument(
        "--out", default=None, help="write the JSON summary to this file (without it, only the lines above are printed)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; quick 1)")
    args = p.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 5)
    summary: dict[str, Any] = {"runtime": _META, "quick": quick}
    print(
        f"backend {_META['backend']} {_META['device_kinds']}  x64={_META['x64']}  "
        f"matmul_precision={_META['matmul_precision']}  XLA_FLAGS={_META['xla_flags']!r}",
        flush=True,
    )

    # Quick: k = 1..5 and 8 (the odd k that perturb, the powers of two that must not; one program per k).
    a = check_perturbed_update(2_000 if quick else 1_000_000, ks=(1, 2, 3, 4, 5, 8) if quick else tuple(range(1, 13)))
    summary["perturbed_update"] = a
    for dt, e in a["per_dtype"].items():
        print(
            f"(a) perturbed update {dt}, k={a['k']} vs NumPy: constant k {e['const_k_differing_elements']} differing "
            f"elements (max {e['const_k_max_ulp']} ulp), traced k {e['traced_k_differing_elements']} "
            f"(max {e['traced_k_max_ulp']} ulp); k=3 changes {e['elements_changed_vs_k1_by_k'][3]} of {a['n']}; "
            f"powers of two equal k=1: {e['powers_of_two_equal_k1']}  -> {'OK' if e['ok'] else 'FAIL'}",
            flush=True,
        )

    # Quick: the 1-layer net (its programs compile in a third of the 3-layer net's time on 2 CPU cores).
    layers = 1 if quick else 3
    b = check_determinism(
        64 if quick else 12_000, 12 if quick else 28, 5 if quick else 20, eig_iters=6 if quick else 20, layers=layers
    )
    summary["determinism"] = b
    print(
        f"(b) same run twice ({b['steps']} GD steps + sharpness, {layers}-layer CNN, {b['num_images']} images): params "
        f"{b['differing_elements']} differing elements (max {b['max_ulp']} ulp), eigenvalue bits equal "
        f"{b['eigenvalue_bits_equal']}, deterministic GPU flag set {b['deterministic_flag_set']}  -> "
        f"{'OK' if b['ok'] else 'FAIL'}",
        flush=True,
    )

    c = check_matmul_precision(256 if quick else 4096)
    summary["matmul_precision"] = c
    print(
        f"(c) float32 matmul {c['n']}x{c['n']} at precision {c['matmul_precision']!r} vs float64: max error "
        f"{c['max_error_relative_to_abs_product']:.2e} of |A||B| (limit {c['limit']:g}; TF32 ~1e-3)  -> "
        f"{'OK' if c['ok'] else 'FAIL'}",
        flush=True,
    )

    d_main = time_main_job(200 if quick else 12_000, 28, repeats, eig_iters=6 if quick else 20, layers=layers)
    print(
        f"(d) main job step ({layers}-layer CNN, {d_main['num_images']} images): {d_main['gd_step_s'] * 1e3:.1f} ms, gradient "
        f"{d_main['gradient_s'] * 1e3:.1f} ms, {d_main['sharpness_products']}-product sharpness "
        f"{d_main['sharpness_s'] * 1e3:.1f} ms "
        f"({d_main['sharpness_in_gradients']:.1f} gradients)",
        flush=True,
    )
    # Quick: 2 lanes of a ResNet-8 (compiling 6 vmapped lanes of it alone takes ~a minute on 2 CPU cores).
    d_res = time_resnet_lanes(1 if quick else 9, 4 if quick else 128, 2 if quick else 6, repeats)
    print(
        f"(d) ResNet-{d_res['depth']} ({d_res['num_params']} params), batch {d_res['batch_size']}: one lane "
        f"{d_res['one_lane_step_s'] * 1e3:.1f} ms, {d_res['num_lanes']} k-lanes vmapped "
        f"{d_res['lanes_step_s'] * 1e3:.1f} ms, ratio {d_res['lanes_over_one']:.2f} (goal <= 2: "
        f"{'met' if d_res['goal_met'] else 'not met'})",
        flush=True,
    )
    summary["speed"] = {"main_job": d_main, "resnet_lanes": d_res}
    summary["ok"] = bool(a["ok"] and b["ok"] and c["ok"])
    text = json.dumps(summary, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(
        "(e) summary: "
        + ("all bitwise checks passed" if summary["ok"] else "SOME CHECKS FAILED")
        + (f"; JSON in {args.out}" if args.out else ""),
        flush=True,
    )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
