"""The main job's speed, measured in one run: step, HVP, tracking, sweep, and a roofline.

The main job is ``python -m experiments.eos --layers 3 --lr 5``: the 3-layer single-channel
3x3 Swish CNN with global mean pooling, binary cross-entropy and full-batch gradient descent
(``experiments.eos.config.build_problem``), here on 12,000 Fashion-MNIST 0/1 images. Run::

    python benchmarks/bench_main.py                # shared 2-core VM: 10-30 minutes (load-dependent)
    python benchmarks/bench_main.py --quick        # tiny sizes, random images: seconds (smoke test)

Prints, all measured in this run on the machine at hand (the fastest of ``--repeats`` calls:
on a shared VM, noise only adds time; this one's kernel also pages out idle memory, DAMON
``pageout``, and a call that finds its retained buffers paged out takes 2-3x as long):

* ``peak``: the machine's measured peak: a large float32 matmul (GFLOP/s) and a large
  array add ``c = a + b`` (GB/s of its 3 streams);
* ``step <impl>``: one GD step of the main job (``eos_jax.train.make_chunk_fn``: loss,
  gradient, perturbed update, finiteness checks) per convolution implementation, and its
  speed-up over ``lax``;
* ``hvp``: a Hessian-vector product through one linearization (the product Lanczos runs:
  marginal cost inside a jitted loop) and a fresh ``jvp(grad)``, both over a gradient;
* ``products``: Lanczos products per sharpness estimate to 1e-3, cold (random start) and warm
  (previous eigenvector, ``sharpness_every`` GD steps later), for each stop rule: the relative
  residual and the estimated relative eigenvalue error (``stop="eigenvalue"``, the main job's);
* ``tracking``: the share of sharpness tracking in the main job's run time at the default
  schedule (``EosConfig``: ``steps``, ``sharpness_every``, ``sharpness_iters``), from the
  measured times of one step, of the first (cold) tracking call and of a warm-started one
  (from the eigenvector of ``sharpness_every`` steps earlier, as in a run);
* ``roofline <kernel>``: achieved GFLOP/s (useful convolution FLOPs, counted analytically)
  and GB/s (compulsory traffic: the images read once) against the peaks, and how many
  times slower than the roofline bound ``max(flops / peak_flops, bytes / peak_bw)`` it ran;
* ``sweep``: 16 learning rates as one program, all lanes vectorized, one lane at a time
  (``lane_batch=1``) and as the engine runs them by default (``lane_batch="auto"``: the batch its
  :class:`eos_jax.train.core.Plan` picks from the programs' temporaries), vs 16 sequential runs.

Ratios are taken within this run; on a shared machine, compare ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eos_jax import hessian, runtime
from eos_jax import train as tr
from eos_jax.train.sizing import AUTO_LANE_BATCH

IMPLS = ("lax", "shifted", "fft", "fused")


CPU_TIMES: dict[int, float] = {}


def _cpu() -> float:
    """CPU seconds of this process, all threads (user + system: page faults are system time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn, *args, repeats: int) -> float:
    """Least wall seconds of ``repeats`` calls after one warm-up (compile) call.

    The least CPU seconds (all threads) of the same calls is kept in ``CPU_TIMES[id(fn)]``:
    on a shared machine the wall time includes waiting for the cores, the CPU time does not.
    """
    jax.block_until_ready(fn(*args))
    times, cpus = [], []
    for _ in range(repeats):
        c0, t0 = _cpu(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
    CPU_TIMES[id(fn)] = min(cpus)
    return min(times)


def measure_peak(n_mm: int, n_bw: int, repeats: int) -> tuple[float, float]:
    """(matmul GFLOP/s, add GB/s) of an ``n_mm``^2 float32 matmul and ``n_bw``-element arrays."""
    a = jax.random.normal(jax.random.key(0), (n_mm, n_mm), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, precision=lax.Precision.HIGHEST))
    t_mm = _timed(mm, a, a, repeats=repeats)
    u = jnp.ones((n_bw,), jnp.float32)
    v = jnp.full((n_bw,), 2.0, jnp.float32)
    add = jax.jit(lambda x, y: x + y)
    t_bw = _timed(add, u, v, repeats=repeats)
    return 2.0 * n_mm**3 / t_mm / 1e9, 3 * 4 * n_bw / t_bw / 1e9


def conv_flops(n: int, hw: int, layers: int, k: int = 3) -> dict[str, float]:
    """Useful FLOPs (a multiply-add = 2) of the valid k x k convolutions of the stack.

    ``step``: forward (one conv per layer), backward (``dK`` per layer, ``dx`` for all but
    the first). ``hvp``: the tangent program of jvp(grad): forward tangents (1 conv in the
    first layer, 2 in the others) and the tangents of ``dK`` (2 per layer) and of ``dx``
    (2 per layer but the first). Activations and pooling are not counted.
    """
    outs = []
    size = hw
    for _ in range(layers):
        size -= k - 1
        outs.append(n * size * size)
    tap = 2.0 * k * k
    fwd = sum(tap * o for o in outs)
    bwd = sum(tap * o for o in outs) + sum(tap * o for o in outs[1:])
    hvp_fwd = tap * outs[0] + sum(2 * tap * o for o in outs[1:])
    hvp_bwd = sum(2 * tap * o for o in outs) + sum(2 * tap * o for o in outs[1:])
    return {"step": fwd + bwd, "grad": fwd + bwd, "hvp": hvp_fwd + hvp_bwd}


def roofline_line(name: str, seconds: float, flops: float, nbytes: float, peak_gflops: float, peak_gbs: float) -> str:
    """One roofline line: achieved rates, their fractions of peak, and the distance to the bound."""
    gf = flops / seconds / 1e9
    gb = nbytes / seconds / 1e9
    bound = max(flops / (peak_gflops * 1e9), nbytes / (peak_gbs * 1e9))
    limit = "compute" if flops / (peak_gflops * 1e9) >= nbytes / (peak_gbs * 1e9) else "memory"
    return (
        f"roofline {name:16s} {gf:8.2f} GFLOP/s ({gf / peak_gflops:6.1%} of peak) {gb:8.2f} GB/s "
        f"({gb / peak_gbs:6.1%} of peak)  {limit}-bound limit {bound * 1e3:8.2f} ms, "
        f"measured {seconds * 1e3:9.2f} ms = {seconds / bound:7.1f}x the limit"
    )


def build(cfg_overrides: dict, x: np.ndarray, y: np.ndarray):
    """The main job's Problem for (x, y) with ``cfg_overrides`` (e.g. conv_impl)."""
    from experiments import eos

    cfg = eos.default_config("cnn", layers=3, lr=(5.0,), num_examples=None, **cfg_overrides)
    problem, info = eos.build_problem(cfg, {"x": x, "y": y, "num_classes": 2})
    return cfg, problem, info


def load_images(quick: bool, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Fashion-MNIST 0/1 (first n) or, in quick mode, random 28x28 images."""
    if quick:
        rs = np.random.RandomState(0)
        return rs.rand(n, 28, 28, 1).astype(np.float32), rs.randint(0, 2, n).astype(np.int32), "random"
    from eos_jax import data as edata

    ds = edata.load("fashion_mnist01", "train")
    x = np.asarray(ds.x)[:n].astype(np.float32)
    y = np.asarray(ds.y)[:n].astype(np.int32)
    return x, y, f"fashion_mnist01 train x {x.shape[0]}"


def print_products_per_estimate(loss, params, data, every: int, stop: str, quick: bool) -> None:
    """Lanczos products per estimate to 1e-3 under ``stop``, cold and warm-started ``every`` GD steps (lr 5) later."""
    step_fn = jax.jit(lambda p, b: jax.tree_util.tree_map(lambda w, g: w - 5.0 * g, p, jax.grad(loss)(p, b)))
    max_iters = 20 if quick else 60
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    eig = jax.jit(
        lambda p, b, v0, k: hessian.top_eigenvalue(loss, p, b, num_iters=max_iters, tol=1e-3, v0=v0, key=k, stop=stop)
    )
    p = params
    prev = eig(p, data, zero, jax.random.key(1))
    colds, warms = [], []
    for r in range(1 if quick else 4):
        for _ in range(2 if quick else every):
            p = step_fn(p, data)
        cold = eig(p, data, zero, jax.random.key(2 + r))
        warm = eig(p, data, prev.eigenvector, jax.random.key(2 + r))
        colds.append(int(cold.num_hvps))
        warms.append(int(warm.num_hvps))
        prev = warm
    print(
        f"products per estimate at 1e-3 ({stop}): cold = {statistics.median(colds):.1f} "
        f"warm = {statistics.median(warms):.1f}  (cold {colds}, warm {warms}, every {every} steps, "
        f"last lambda_max {float(warm.eigenvalue):.5g})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on random images (a smoke test)")
    ap.add_argument("--n", type=int, default=12000, help="images (default 12,000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--lanes", type=int, default=16)
    ap.add_argument("--sweep-steps", type=int, default=2)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.lanes, args.sweep_steps = 64, 1, 2, 1
        if args.impls == ",".join(IMPLS):
            args.impls = "lax,fused"  # fewer programs to compile: the smoke test checks the lines
    runtime.configure()
    impls = [i for i in args.impls.split(",") if i]
    load = os.getloadavg()
    print(
        f"backend {jax.default_backend()} devices {jax.device_count()} cpus {os.cpu_count()} "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    x, y, what = load_images(args.quick, args.n)
    n = x.shape[0]
    print(f"main job: cnn 3 layers 3x3 swish, mean pooling, BCE, full-batch GD lr 5; {what}", flush=True)

    peak_gf, peak_gb = measure_peak(
        256 if args.quick else 2048, (1 << 16) if args.quick else (1 << 24), max(args.repeats, 3)
    )
    print(f"peak matmul {peak_gf:.2f} GFLOP/s  add {peak_gb:.2f} GB/s", flush=True)
    flops = conv_flops(n, 28, 3)
    in_bytes = 4.0 * n * 28 * 28

    # ---- GD step per implementation.
    steps: dict[str, float] = {}
    cpu_steps: dict[str, float] = {}
    for impl in impls:
        cfg, problem, info = build({"conv_impl": impl}, x, y)
        hp = tr.stack_hparams(tr.make_lanes([5.0]))
        state = jax.jit(jax.vmap(lambda h, p=problem: tr.init_state(p, h)))(hp)
        chunk = tr.make_chunk_fn(problem, None, chunk_steps=1)
        data = jax.device_put(problem.data)
        one = jnp.int32(1)
        fn = lambda s, c=chunk, h=hp, d=data, o=one: c(s, h, d, o)  # noqa: E731
        steps[impl] = _timed(fn, state, repeats=args.repeats)
        cpu_steps[impl] = CPU_TIMES[id(fn)]
        print(
            f"step {impl:8s} {steps[impl] * 1e3:9.2f} ms wall {cpu_steps[impl] * 1e3:9.2f} ms cpu  "
            f"(conv_impl {info['conv_impl']})",
            flush=True,
        )
    if "lax" in steps:
        for impl in impls:
            print(
                f"speedup {impl:8s} over lax = {steps['lax'] / steps[impl]:.2f} wall, "
                f"{cpu_steps['lax'] / cpu_steps[impl]:.2f} cpu",
                flush=True,
            )

    # ---- HVP / gradient, products per estimate, tracking share: the default implementation.
    cfg, problem, info = build({}, x, y)
    default_impl = info["conv_impl"]
    data = jax.device_put(problem.data)
    params = problem.init_params(jax.random.key(0))
    loss = problem.loss_fn
    grad = jax.jit(jax.grad(loss))
    t_grad = _timed(grad, params, data, repeats=args.repeats)
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / 10, params)
    plain = jax.jit(lambda p, b, t: hessian.hvp(loss, p, b, t))
    t_plain = _timed(plain, params, data, v, repeats=args.repeats)
    loop = 2 if args.quick else 5

    def lin_loop(p, b, t, k):
        f = hessian.linearized_hvp(loss, p, b)
        return lax.fori_loop(0, k, lambda i, u: jax.tree_util.tree_map(lambda a: a * 1e-1, f(u)), t)

    lin = jax.jit(lin_loop, static_argnums=3)
    t_lin1 = _timed(lin, params, data, v, 1, repeats=args.repeats)
    t_link = _timed(lin, params, data, v, 1 + loop, repeats=args.repeats)
    t_lin = max(t_link - t_lin1, 1e-9) / loop
    print(f"gradient ({default_impl}) {t_grad * 1e3:9.2f} ms", flush=True)
    print(
        f"hvp linearized marginal {t_lin * 1e3:9.2f} ms  ratio to gradient = {t_lin / t_grad:.2f}"
        f"  (linearize + 1 product {t_lin1 * 1e3:.2f} ms)",
        flush=True,
    )
    print(f"hvp jvp(grad)           {t_plain * 1e3:9.2f} ms  ratio to gradient = {t_plain / t_grad:.2f}", flush=True)
    # hessian.top_eigenvalue as a notebook calls it (its defaults), fixed iteration counts: the slope per product.
    few, many = (4, 8) if args.quick else (10, 30)
    top = jax.jit(lambda p, b, n: hessian.top_eigenvalue(loss, p, b, num_iters=n).eigenvalue, static_argnums=2)
    t_few = _timed(top, params, data, few, repeats=args.repeats)
    t_many = _timed(top, params, data, many, repeats=args.repeats)
    per = max(t_many - t_few, 1e-9) / (many - few)
    print(
        f"top_eigenvalue defaults {per * 1e3:9.2f} ms per product  ratio to gradient = {per / t_grad:.2f}"
        f"  (slope between {few} and {many} iterations; goal <= 1.3)",
        flush=True,
    )

    every = cfg.sharpness_every
    for stop in ("residual", "eigenvalue"):  # what the tolerance bounds (eos_jax.eigen.STOPS)
        print_products_per_estimate(loss, params, data, every, stop, args.quick)

    hp = tr.stack_hparams(tr.make_lanes([5.0]))
    state = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(hp)
    ecfg = cfg.engine_config()
    sharp = tr.make_sharpness_fn(
        problem,
        tr.make_eig_fn(ecfg.sharpness_iters, ecfg.sharpness_method, ecfg.sharpness_tol, stop=ecfg.sharpness_stop),
    )  # the main job's eig_fn
    # As in a run: the first estimate starts cold (zero eigvec) at step 0; every later one is
    # warm-started from the eigenvector of the estimate `every` steps earlier.
    t_cold = _timed(lambda s: sharp(s, hp, data)[1], state, repeats=args.repeats)
    state_w, _ = sharp(state, hp, data)
    n_warm = 2 if args.quick else every
    state_w, _ = tr.make_chunk_fn(problem, None, chunk_steps=n_warm)(state_w, hp, data, jnp.int32(n_warm))
    t_warm = _timed(lambda s: sharp(s, hp, data)[1], state_w, repeats=args.repeats)
    t_step = steps.get(default_impl)
    if t_step is None:
        chunk = tr.make_chunk_fn(problem, None, chunk_steps=1)
        t_step = _timed(lambda s: chunk(s, hp, data, jnp.int32(1)), state, repeats=args.repeats)
    n_eval = len(range(0, cfg.steps + 1, every)) + (0 if cfg.steps % every == 0 else 1)
    t_train = cfg.steps * t_step
    t_track = t_cold + (n_eval - 1) * t_warm
    share = t_track / (t_train + t_track)
    print(
        f"tracking: {ecfg.sharpness_method} to tol {ecfg.sharpness_tol} on the {ecfg.sharpness_stop} "
        f"(at most {ecfg.sharpness_iters} products), "
        f"per call cold {t_cold * 1e3:.2f} ms, warm-started {t_warm * 1e3:.2f} ms (after {n_warm} steps); "
        f"{n_eval} calls in {cfg.steps} steps (every {every}, the first cold); step {t_step * 1e3:.2f} ms; "
        f"share of run time = {share:.3f}",
        flush=True,
    )

    # ---- Roofline.
    for impl in impls:
        print(roofline_line(f"step {impl}", steps[impl], flops["step"], in_bytes, peak_gf, peak_gb), flush=True)
    print(roofline_line(f"grad {default_impl}", t_grad, flops["grad"], in_bytes, peak_gf, peak_gb), flush=True)
    print(
        roofline_line(f"hvp lin {default_impl}", t_lin, flops["hvp"], in_bytes, peak_gf, peak_gb), flush=True
    )  # the tangent program alone
    print(
        roofline_line(f"hvp {default_impl}", t_plain, flops["grad"] + flops["hvp"], in_bytes, peak_gf, peak_gb),
        flush=True,
    )  # jvp(grad), as the engine runs it: the primal gradient and the tangent program

    # ---- Sweep: 16 learning rates vmapped vs sequential.
    lrs = [0.5 + 0.25 * i for i in range(args.lanes)]
    init = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))
    chunk = tr.make_chunk_fn(problem, None, chunk_steps=args.sweep_steps)
    ns = jnp.int32(args.sweep_steps)
    hp_all = tr.stack_hparams(tr.make_lanes(lrs))
    s_all = init(hp_all)
    sweep_repeats = 1 if args.quick else 3  # single runs of seconds each: the fastest of 3
    fn_vmapped = lambda s: chunk(s, hp_all, data, ns)  # noqa: E731
    t_vmapped = _timed(fn_vmapped, s_all, repeats=sweep_repeats)
    chunk_b1 = tr.make_chunk_fn(problem, None, chunk_steps=args.sweep_steps, lane_batch=1)
    fn_b1 = lambda s: chunk_b1(s, hp_all, data, ns)  # noqa: E731
    t_b1 = _timed(fn_b1, s_all, repeats=sweep_repeats)
    # What the engine runs by default (EngineConfig.lane_batch="auto"), decided by its Plan from the
    # temporaries of the run's all-at-once chunk and sharpness programs (its sizing step).
    # (The main job's own config sets lane_batch=1 for the CNN: ask for the engine's default explicitly.)
    # The lanes are k = 1 learning rates (no twins to start from: sharpness_twin_start off).
    engine_cfg = dataclasses.replace(cfg.engine_config(), lane_batch=AUTO_LANE_BATCH, sharpness_twin_start=False)
    choice = tr.core.size_lanes(problem, tr.make_lanes(lrs), engine_cfg).lane_batch_choice
    auto = choice.lane_batch
    if auto == 1:
        fn_auto, t_auto = fn_b1, t_b1
    elif auto is None:
        fn_auto, t_auto = fn_vmapped, t_vmapped
    else:
        chunk_auto = tr.make_chunk_fn(problem, None, chunk_steps=args.sweep_steps, lane_batch=auto)
        fn_auto = lambda s: chunk_auto(s, hp_all, data, ns)  # noqa: E731
        t_auto = _timed(fn_auto, s_all, repeats=sweep_repeats)
    hps = [tr.stack_hparams([tr.Lane(lr)]) for lr in lrs]
    states = [init(h) for h in hps]
    jax.block_until_ready(chunk(states[0], hps[0], data, ns))
    t_seq, c_seq = float("inf"), float("inf")
    for _ in range(sweep_repeats):
        c0, t0 = _cpu(), time.perf_counter()
        outs = [jax.block_until_ready(chunk(s, h, data, ns)[0].params) for s, h in zip(states, hps)]
        t_seq, c_seq = min(t_seq, time.perf_counter() - t0), min(c_seq, _cpu() - c0)
    p_b1 = chunk_b1(s_all, hp_all, data, ns)[0].params
    same = sum(
        all(
            np.array_equal(np.asarray(a)[i], np.asarray(b)[0])
            for a, b in zip(jax.tree_util.tree_leaves(p_b1), jax.tree_util.tree_leaves(o))
        )
        for i, o in enumerate(outs)
    )
    print(
        f"sweep {args.lanes} lrs x {args.sweep_steps} steps: vmapped {t_vmapped:.3f} s, lane_batch=1 {t_b1:.3f} s, "
        f"sequential {t_seq:.3f} s; sequential/vmapped = {t_seq / t_vmapped:.2f}, "
        f"sequential/lane_batch=1 = {t_seq / t_b1:.2f} ({same} of {args.lanes} lanes bitwise equal to their "
        "separate runs)",
        flush=True,
    )
    print(
        f"sweep default (lane_batch='auto'): {choice.describe()}; {t_auto:.3f} s, "
        f"sequential/auto = {t_seq / t_auto:.2f}",
        flush=True,
    )
    # What limits the sweep on this machine: how busy the cores are in each mode (CPU seconds of all
    # threads over wall seconds, out of os.cpu_count()); both modes move the same bytes per lane.
    print(
        f"sweep core use (cpu s / wall s of {os.cpu_count()} cores): sequential {c_seq / t_seq:.2f}, "
        f"lane_batch=1 {CPU_TIMES[id(fn_b1)] / t_b1:.2f}, vmapped {CPU_TIMES[id(fn_vmapped)] / t_vmapped:.2f}, "
        f"auto {CPU_TIMES[id(fn_auto)] / t_auto:.2f}",
        flush=True,
    )
    load = os.getloadavg()
    print(f"load after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)


if __name__ == "__main__":
    main()
