"""A sweep as the engine runs it, end to end, against the same lanes run one after another.

Run (2-core CPU, 12,000 images: about 8 minutes; ``--quick``: under a minute)::

    python benchmarks/bench_sweep.py [--quick] [--examples 12000] [--steps 40] [--lanes 16] [--all-at-once]

The main job's problem (``experiments.eos``: 3-layer single-channel 3x3 Swish CNN, mean pooling,
binary cross-entropy, full-batch GD; Fashion-MNIST 0/1 or the first available of the default
chain, first ``--examples`` images) with its default engine schedule (``EosConfig.engine_config``:
chunks of 50 steps, warm-started Lanczos sharpness every 20 steps) for ``--steps`` steps, through
:func:`eos_jax.train.fit` (the engine of :func:`eos_jax.train.train` without files):

* ``sweep``: the ``--lanes`` learning rates as one call, grouped and batched as the engine
  decides by default (``max_lanes`` sized to memory, ``lane_batch="auto"``; the line says what
  it chose), and with ``--all-at-once`` also with every lane of the group at once
  (``lane_batch=None``, the default before ``auto``: at 12,000 images its 16 lanes need 13.9 GiB
  of temporaries, and after the other modes the process was once killed for memory on a 23 GiB VM);
* ``sequential``: the same learning rates as ``--lanes`` calls of one lane each.

Every call of ``fit`` builds and compiles its programs, as every run of the CLI does, so each mode
is timed whole (the fastest of ``--repeats`` calls) and the seconds XLA spent compiling in it
(``jax.monitoring``'s backend-compile events) are printed beside: the ratio of the wall times is
what a user waits for, the ratio of the times less compiling compares the running programs (as
``bench_main.py``'s sweep line does). Also printed: how many lanes end bitwise equal to their
separate run (none is promised: a lane's bits depend on how many lanes shared its program) and
the largest relative difference of their final losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from eos_jax import runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 examples, 4 lanes, 10 steps, 1 repeat, all modes")
    p.add_argument("--examples", type=int, default=12000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lanes", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--all-at-once", action="store_true", help="also time every lane at once (much memory)")
    args = p.parse_args()
    if args.quick:
        args.examples, args.steps, args.lanes, args.repeats, args.all_at_once = 256, 10, 4, 1, True
    runtime.configure()
    from eos_jax import train as tr
    from experiments import eos

    cfg = eos.default_config("cnn", num_examples=args.examples, steps=args.steps)
    data, info = eos.load_data(cfg)
    problem, model_info = eos.build_problem(cfg, data)
    # The lanes here are k = 1 learning rates (no twins), swept one at a time and vmapped alike.
    ecfg = dataclasses.replace(cfg.engine_config(), sharpness_twin_start=False)
    print(
        f"problem: cnn 3 layers ({model_info['conv_impl']} conv), {info['name']} x {info['num_examples_used']}, "
        f"{args.steps} full-batch GD steps, sharpness every {ecfg.sharpness_every} ({ecfg.sharpness_method}, "
        f"tol {ecfg.sharpness_tol}); backend {jax.default_backend()}, {jax.device_count()} device(s)",
        flush=True,
    )
    lrs = [0.5 + 0.25 * i for i in range(args.lanes)]

    def timed(fn):
        best = (float("inf"), 0.0)
        for _ in range(args.repeats):
            spent: dict[str, float] = {}
            t0 = time.perf_counter()
            with runtime.compile_seconds(spent, events=(runtime.BACKEND_COMPILE_EVENT,)):
                out = fn()
            best = min(best, (time.perf_counter() - t0, spent["compile_seconds"]))
        return out, best

    def sweep(lane_batch):
        return tr.fit(problem, tr.make_lanes(lrs), args.steps, config=dataclasses.replace(ecfg, lane_batch=lane_batch))

    def sequential():
        return [tr.fit(problem, tr.make_lanes([lr]), args.steps, config=ecfg) for lr in lrs]

    seq, (t_seq, c_seq) = timed(sequential)
    print(f"sequential: {args.lanes} runs of one lane {t_seq:.2f} s, of which compiling {c_seq:.2f} s", flush=True)
    modes = [("sweep auto", "auto")] + ([("sweep all at once", None)] if args.all_at_once else [])
    for name, lane_batch in modes:
        hist, (t, c) = timed(lambda b=lane_batch: sweep(b))
        lg = hist.lane_groups
        same = sum(
            all(
                np.array_equal(np.asarray(a)[i], np.asarray(b)[0])
                for a, b in zip(jax.tree_util.tree_leaves(hist.params), jax.tree_util.tree_leaves(one.params))
            )
            for i, one in enumerate(seq)
        )
        final = np.array([h.lane_summaries[0]["final_loss"] for h in seq])
        mine = np.array([s["final_loss"] for s in hist.lane_summaries])
        rel = float(np.max(np.abs(mine - final) / np.abs(final)))
        chosen = "all at once" if lg["lane_batch"] is None else f"{lg['lane_batch']} at a time"
        print(
            f"{name}: {t:.2f} s, of which compiling {c:.2f} s; groups {lg['groups']}, lanes per batch: {chosen}; "
            f"sequential / sweep = {t_seq / t:.2f} wall, {(t_seq - c_seq) / (t - c):.2f} less XLA compile time; "
            f"{same} of {args.lanes} lanes bitwise equal to their separate runs, final losses within {rel:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
