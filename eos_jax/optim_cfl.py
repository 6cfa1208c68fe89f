"""A step size that respects the per-layer stability bounds: the ``cfl_scale`` optax transform.

The paper's conclusion asks for "adaptive learning rate / optimization schemes tailored to
have small rates in these local regions to ensure stability, while maintaining speed".
:func:`cfl_scale` caps each layer's step at a fraction of its locally estimated stable step,
the CFL-type bound ``lr lambda_max(H_ll) < threshold`` of each layer seen as a one-layer
network (Section 5.5, Theorem 5.7; :func:`eos_jax.predict.layer_bounds`). The per-layer
sharpness ``lambda_max(H_ll)`` is tracked by a power iteration on each diagonal Hessian block,
warm-started from the previous step's vector and amortized over steps: ``iters_per_step``
block Hessian-vector products per layer and step (one by default), so the estimate refines as
training goes instead of being re-solved from scratch.

Placed after the optimizer (``optax.chain(optim.sgd(lr, k=k), cfl_scale(loss_fn, None, lr))``; the
training engine passes each step's batch to the update, ``update(..., batch=batch)``),
it multiplies layer ``l``'s update by ``min(1, fraction * threshold / (lr * lambda_l))``: the
nominal step where it is stable with margin, the capped one where it is not. With
``per_layer=False`` the whole network is one block: the global rule ``lr <= c / lambda_max``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eos_jax import hessian
from eos_jax.errors import ConfigError
from eos_jax.metrics import layer_groups

PyTree = Any


class CflScaleState(NamedTuple):
    """State of :func:`cfl_scale`.

    Attributes:
      count: int32 number of updates so far.
      sharpness: ``(layers,)`` the latest per-layer estimates of ``lambda_max(H_ll)`` (the
        Rayleigh quotient of the power iteration), in the parameters' dtype.
      vectors: the power iteration's unit vectors, one per layer, as a pytree like the
        parameters (each layer's leaves hold its own vector).
      factor: ``(layers,)`` the factors applied at the last update.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.optim_cfl import cfl_scale
      >>> state = cfl_scale(lambda p, b: (p["w"] ** 2).sum(), None, 0.1).init({"w": jnp.ones(3)})
      >>> int(state.count), state.sharpness.tolist(), round(float(jnp.linalg.norm(state.vectors["w"])), 6)
      (0, [0.0], 1.0)
    """

    count: jax.Array
    sharpness: jax.Array
    vectors: PyTree
    factor: jax.Array


def _groups(params: PyTree, per_layer: bool, level: int) -> list[list[int]]:
    """Leaf indices of each block: the layers (``layer_groups``) or the whole tree."""
    n = len(jax.tree_util.tree_leaves(params))
    return list(layer_groups(params, level).values()) if per_layer else [list(range(n))]


def _normalize(leaves: list[jax.Array], groups: list[list[int]]) -> list[jax.Array]:
    """Each block's leaves scaled to a unit vector (a zero block stays zero)."""
    out = list(leaves)
    for idx in groups:
        norm = jnp.sqrt(sum(jnp.vdot(leaves[i], leaves[i]) for i in idx))
        for i in idx:
            out[i] = leaves[i] / jnp.where(norm > 0, norm, jnp.ones_like(norm))
    return out


def cfl_scale(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    batch: Any,
    learning_rate: float | jax.Array,
    *,
    fraction: float = 0.5,
    threshold: float = 2.0,
    iters_per_step: int = 1,
    per_layer: bool = True,
    level: int = 1,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Caps each layer's step at ``fraction`` of its stable step ``threshold / lambda_max(H_ll)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the objective whose blocks are tracked
        (include the L2 term if the optimizer's weight decay is part of it).
      batch: the data the blocks are taken on when the update is not given ``batch=``; None
        where every update is (as :func:`eos_jax.train.fit` and ``train`` give each step's
        batch, an argument of the compiled step rather than a constant held in it).
      learning_rate: the nominal step ``lr`` of the optimizer before this transform (a
        float or a traced scalar, e.g. a vmapped lane's).
      fraction: the cap as a fraction of the stable step, in (0, 1].
      threshold: ``lr lambda_max`` at which the step becomes unstable (2 for gradient
        descent; :func:`eos_jax.hessian.stability_threshold`).
      iters_per_step: power-iteration steps (block Hessian-vector products) per layer and update.
      per_layer: False: the whole network as one block (the global ``lr <= c / lambda_max``).
      level: path depth that defines a layer (:func:`eos_jax.metrics.layer_groups`).
      key: PRNG key of the first vectors (default ``jax.random.key(0)``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`CflScaleState`; its update
      needs ``params`` and takes the keyword ``batch`` (default: the ``batch`` given here).

    Examples:
      A quadratic with ``H = diag(1, 40)`` in two layers: at ``lr = 0.1`` the second layer
      (``lr lambda = 4``) steps with ``0.5 * 2 / 40 = lr / 4``, the first is left alone:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.optim_cfl import cfl_scale
      >>> loss = lambda p, b: 0.5 * (p["a"] ** 2 + 40.0 * p["b"] ** 2).sum()
      >>> params = {"a": jnp.ones(1), "b": jnp.ones(1)}
      >>> opt = cfl_scale(loss, None, 0.1, iters_per_step=2)
      >>> u, state = jax.jit(opt.update)({"a": -0.1 * jnp.ones(1), "b": -4.0 * jnp.ones(1)}, opt.init(params), params)
      >>> [round(float(x), 4) for x in state.sharpness], [round(float(f), 4) for f in state.factor]
      ([1.0, 40.0], [1.0, 0.25])
      >>> round(float(u["b"][0]), 4)
      -1.0
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction!r}; expected 0 < fraction <= 1")
    if not (isinstance(iters_per_step, int) and iters_per_step >= 1):
        raise ConfigError(f"iters_per_step={iters_per_step!r}; expected an integer >= 1")
    if not threshold > 0:
        raise ConfigError(f"threshold={threshold!r}; expected a positive float")
    start = jax.random.key(0) if key is None else key

    def init_fn(params: PyTree) -> CflScaleState:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        groups = _groups(params, per_layer, level)
        draws = [jax.random.normal(jax.random.fold_in(start, i), x.shape, x.dtype) for i, x in enumerate(leaves)]
        dtype = leaves[0].dtype
        return CflScaleState(
            count=jnp.zeros((), jnp.int32),
            sharpness=jnp.zeros((len(groups),), dtype),
            vectors=jax.tree_util.tree_unflatten(treedef, _normalize(draws, groups)),
            factor=jnp.ones((len(groups),), dtype),
        )

    fixed_batch = batch

    def update_fn(
        updates: PyTree, state: CflScaleState, params: PyTree | None = None, *, batch: Any = None, **extra_args: Any
    ) -> tuple[PyTree, CflScaleState]:
        del extra_args  # other transforms' keywords, passed along by optax.chain
        if params is None:
            raise ConfigError("cfl_scale needs params in update (the Hessian blocks are taken there)")
        data = fixed_batch if batch is None else batch
        leaves, treedef = jax.tree_util.tree_flatten(params)
        groups = _groups(params, per_layer, level)
        vecs = jax.tree_util.tree_leaves(state.vectors)
        lams = []
        for idx in groups:
            v = vecs
            for _ in range(iters_per_step):  # power iteration on the block H_ll, warm-started
                masked = [v[i] if i in idx else jnp.zeros_like(v[i]) for i in range(len(v))]
                hv = jax.tree_util.tree_leaves(
                    hessian.hvp(loss_fn, params, data, jax.tree_util.tree_unflatten(treedef, masked))
                )
                lam = sum(jnp.vdot(v[i], hv[i]) for i in idx)
                v = _normalize([hv[i] if i in idx else v[i] for i in range(len(v))], [idx])
            vecs = [v[i] if i in idx else vecs[i] for i in range(len(vecs))]
            lams.append(lam)
        dtype = leaves[0].dtype
        lam_arr = jnp.stack([jnp.asarray(x, dtype) for x in lams])
        lr = jnp.asarray(learning_rate, dtype)
        cap = jnp.asarray(fraction * threshold, dtype)
        step = lr * jnp.maximum(lam_arr, jnp.zeros_like(lam_arr))
        factor = jnp.where(step > cap, cap / jnp.where(step > 0, step, jnp.ones_like(step)), jnp.ones_like(step))
        u = jax.tree_util.tree_leaves(updates)
        for g, idx in enumerate(groups):
            for i in idx:
                u[i] = u[i] * factor[g].astype(u[i].dtype)
        new_state = CflScaleState(
            count=state.count + 1,
            sharpness=lam_arr,
            vectors=jax.tree_util.tree_unflatten(treedef, vecs),
            factor=factor,
        )
        return jax.tree_util.tree_unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
