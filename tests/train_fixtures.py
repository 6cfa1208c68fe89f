"""A tiny problem for the training-engine tests, and a script that trains it in a subprocess.

Run as ``python tests/train_fixtures.py OUT [--resume] [--sleep S]``: trains :func:`toy_problem`
into run directory OUT with :data:`TOY_CONFIG`, sleeping S seconds after each chunk so that
a test can kill it part-way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from eos_jax import optim  # noqa: E402
from eos_jax import train as tr  # noqa: E402

TOY_LRS = (0.05, 0.3)
TOY_CONFIG = tr.EngineConfig(steps=120, chunk_steps=10, sharpness_every=20, sharpness_iters=8, checkpoint_every=30)


def toy_data(n: int = 24) -> dict[str, jax.Array]:
    """Fixed regression data: x (n, 3), y (n, 2), float32."""
    key = jax.random.key(123)
    x = jax.random.normal(jax.random.fold_in(key, 0), (n, 3), jnp.float32)
    y = jnp.sin(x[:, :2] * jnp.float32(2.0))
    return {"x": x, "y": y}


def toy_init(key: jax.Array) -> dict[str, jax.Array]:
    """A 3-4-2 tanh network (24 parameters: w1 12, b1 4, w2 8)."""
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (3, 4), jnp.float32) * jnp.float32(0.7),
        "b1": jnp.zeros((4,), jnp.float32),
        "w2": jax.random.normal(k2, (4, 2), jnp.float32) * jnp.float32(0.7),
    }


def toy_loss(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
    """Mean squared error of the tanh network."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"][None, :])
    return jnp.mean(jnp.square(h @ params["w2"] - batch["y"]))


def toy_optimizer(hp: tr.HParams):
    """Perturbed GD with the lane's traced lr, k and weight decay."""
    return optim.sgd(hp.learning_rate, k=hp.k, weight_decay=hp.weight_decay)


def toy_problem(n: int = 24, **kw) -> tr.Problem:
    return tr.Problem(toy_init, toy_loss, toy_optimizer, toy_data(n), name="toy", **kw)


def main() -> None:
    from eos_jax import io as eio
    from eos_jax import runtime

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args()
    runtime.configure()
    cfg = {"toy": True, "lrs": list(TOY_LRS)}
    run_dir = eio.open_run_dir(args.out, cfg, resume=args.resume)
    try:
        tr.train(
            toy_problem(),
            tr.make_lanes(list(TOY_LRS)),
            TOY_CONFIG,
            run_dir,
            resume=args.resume,
            quiet=True,
            on_chunk=(lambda s: time.sleep(args.sleep)) if args.sleep else None,
        )
    except tr.TrainingInterrupted as e:
        print(f"interrupted at {e.step}", flush=True)
        sys.exit(3)
    print("done", flush=True)


if __name__ == "__main__":
    main()
