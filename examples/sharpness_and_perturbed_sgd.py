"""Worked example: the sharpness of your own flax model, and perturbed SGD (k=3) in your own optax loop.

Run (a few seconds on a CPU)::

    python examples/sharpness_and_perturbed_sgd.py

Nothing here comes from ``eos_jax.models`` or the training engine: the model is a small
``flax.linen`` MLP defined below, the batch is made up, and the training loop is a plain
``optax`` loop. eos-jax supplies three pieces:

* :func:`eos_jax.hessian.top_eigenvalue`: the sharpness (largest algebraic Hessian
  eigenvalue of the loss, Section 6 of the paper), by Lanczos on Hessian-vector products;
  ``lr * sharpness`` above 2 is past gradient descent's classical stability bound.
* :func:`eos_jax.optim.sgd` with ``k=3``: the paper's perturbed SGD (Section 4.1),
  ``theta - (lr / k) * (k * g)``, equal to ``theta - lr * g`` in exact arithmetic but
  rounded differently in the last bits; an ``optax.GradientTransformation``.
* :func:`eos_jax.metrics.ulp_diff`: how many parameters of the k=3 and k=1 runs differ,
  and by how many units in the last place.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from eos_jax import hessian, metrics, optim


class MLP(nn.Module):
    """The user's own model: one tanh hidden layer, a scalar output."""

    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(1)(nn.tanh(nn.Dense(self.width)(x)))


MODEL = MLP()


def make_batch(key: jax.Array, n: int = 32, d: int = 4) -> dict[str, jax.Array]:
    """A made-up regression batch: ``y = sin(x_0) + x_1 / 2``."""
    x = jax.random.normal(key, (n, d), jnp.float32)
    return {"x": x, "y": jnp.sin(x[:, :1]) + x[:, 1:2] * jnp.float32(0.5)}


def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean squared error of the MLP on ``batch``."""
    pred = MODEL.apply({"params": params}, batch["x"])
    return jnp.mean(jnp.square(pred - batch["y"]))


@functools.partial(jax.jit, static_argnames="num_iters")
def sharpness(params: Any, batch: dict[str, jax.Array], num_iters: int = 20) -> jax.Array:
    """The largest Hessian eigenvalue of ``loss_fn`` at ``params`` (Lanczos, ``num_iters`` products).

    Jitted: one compiled program instead of ``num_iters`` rounds of op-by-op dispatch.
    """
    return hessian.top_eigenvalue(loss_fn, params, batch, num_iters=num_iters).eigenvalue


def train(params: Any, batch: dict[str, jax.Array], lr: float, k: int, steps: int) -> tuple[Any, list[float]]:
    """Full-batch perturbed GD in a plain optax loop; returns the final parameters and the losses."""
    opt = optim.sgd(lr, k=k)

    @jax.jit
    def step(params, opt_state, batch):  # the batch is an argument, not a constant closed over
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return params, losses


def main(steps: int = 50, lr: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Sharpness at initialization, then ``steps`` steps with k=1 and k=3 from the same start."""
    key_data, key_init = jax.random.split(jax.random.key(seed))
    batch = make_batch(key_data)
    params = MODEL.init(key_init, batch["x"])["params"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    lam = float(sharpness(params, batch))
    print(
        f"{n_params} parameters; sharpness at init {lam:.6g}, lr * sharpness = {lr * lam:.4g} "
        f"({'above' if lr * lam > 2 else 'below'} the GD stability bound 2)"
    )
    p1, loss1 = train(params, batch, lr, 1, steps)
    p3, loss3 = train(params, batch, lr, 3, steps)
    d = metrics.ulp_diff(p3, p1)
    rel = float(metrics.rel_l1(p3, p1))
    print(
        f"after {steps} steps at lr={lr}: loss k=1 {loss1[-1]:.6g}, k=3 {loss3[-1]:.6g}; "
        f"{d.n_diff} of {d.n_total} parameters differ, by up to {d.max_ulp} ulps (RelL1 {rel:.3g})"
    )
    return {
        "params": params,
        "batch": batch,
        "sharpness": lam,
        "p1": p1,
        "p3": p3,
        "loss1": loss1,
        "loss3": loss3,
        "ulp": d,
        "rel_l1": rel,
    }


if __name__ == "__main__":
    main()
