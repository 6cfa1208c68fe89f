"""Sweeps as one vmapped program vs sequential runs, and the cost of sharpness tracking.

Run (2-core CPU: about 2-4 minutes; ``--quick``: about a minute)::

    python benchmarks/bench_sweep.py [--quick] [--examples 1000] [--steps 20]

Prints, measured in this one run, on the default EoS problem (3-layer single-channel 3x3
Swish CNN, binary cross-entropy, full-batch GD; Fashion-MNIST 0/1 or the first available
of the default chain, first ``--examples`` images):

* the time of ``--steps`` GD steps of 16 learning rates as ONE vmapped program (one
  ``lax.scan`` chunk, lanes vmapped) vs 16 sequential runs of the same chunk function
  with one lane each, and the ratio sequential / vmapped (compile time excluded: each
  program is run once before timing);
* the cost of sharpness tracking with the default schedule (20 warm-started Lanczos
  iterations every 20 steps, one lane): seconds per evaluation and per step, and the
  fraction of the training time it adds.

Measured once (shared 2-core CPU, load ~1.6, 1000 images, 20 steps): vmapped 3.70 s vs
sequential 3.06 s (ratio 0.83: on this CPU vmapping 16 lanes of the shifted-slice
convolution does not pay; it saves compilations and is the layout that shards lanes over
devices); sharpness 0.91 s per evaluation = 95 GD steps, i.e. +476 % of the training
time (83 % of the total) at every 20 steps.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from eos_jax import runtime


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 examples, 10 steps")
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lanes", type=int, default=16)
    args = p.parse_args()
    if args.quick:
        args.examples, args.steps = 256, 10
    runtime.configure()
    from eos_jax import train as tr
    from experiments import eos

    cfg = eos.default_config("cnn", num_examples=args.examples, steps=args.steps)
    data, info = eos.load_data(cfg)
    problem, model_info = eos.build_problem(cfg, data)
    print(
        f"problem: cnn 3 layers ({model_info['conv_impl']} conv), {info['name']} x {info['num_examples_used']}, "
        f"{args.steps} full-batch GD steps; backend {jax.default_backend()}, {jax.device_count()} device(s)"
    )

    lrs = [0.5 + 0.25 * i for i in range(args.lanes)]
    init = jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))
    chunk = tr.make_chunk_fn(problem, None, chunk_steps=args.steps)
    n = jnp.int32(args.steps)

    hp_all = tr.stack_hparams(tr.make_lanes(lrs))
    s_all = init(hp_all)
    _, t_compile_v = _timed(chunk, s_all, hp_all, problem.data, n)
    _, t_vmapped = _timed(chunk, s_all, hp_all, problem.data, n)

    hps = [tr.stack_hparams([tr.Lane(lr)]) for lr in lrs]
    states = [init(h) for h in hps]
    _, t_compile_1 = _timed(chunk, states[0], hps[0], problem.data, n)
    t_seq = 0.0
    for s, h in zip(states, hps):
        _, dt = _timed(chunk, s, h, problem.data, n)
        t_seq += dt
    print(
        f"{args.lanes} learning rates x {args.steps} steps: one vmapped program {t_vmapped:.2f} s "
        f"(compile+first {t_compile_v:.1f} s); {args.lanes} sequential runs {t_seq:.2f} s "
        f"(compile+first {t_compile_1:.1f} s)"
    )
    print(f"  ratio sequential / vmapped = {t_seq / t_vmapped:.2f}")

    # Sharpness tracking cost, one lane, default schedule (every 10 steps, 20 Lanczos iterations).
    every = cfg.sharpness_every
    sharp = tr.make_sharpness_fn(problem, tr.make_eig_fn(cfg.sharpness_iters, cfg.sharpness_method))
    s1, _ = chunk(states[0], hps[0], problem.data, n)
    (s1, lam), t_compile_s = _timed(sharp, s1, hps[0], problem.data)
    reps = 3
    t_sharp = 0.0
    for _ in range(reps):
        (s1, lam), dt = _timed(sharp, s1, hps[0], problem.data)
        t_sharp += dt
    t_sharp /= reps
    t_step = t_seq / args.lanes / args.steps
    frac = (t_sharp / every) / t_step
    print(
        f"sharpness ({cfg.sharpness_iters} {cfg.sharpness_method} iterations, warm-started): "
        f"{t_sharp:.3f} s per evaluation (compile+first {t_compile_s:.1f} s), lambda_max = {float(lam[0]):.4g}"
    )
    print(
        f"  one GD step {t_step * 1e3:.1f} ms; tracking every {every} steps adds {frac:.0%} to the training time "
        f"({frac / (1 + frac):.0%} of the total)"
    )


if __name__ == "__main__":
    main()
