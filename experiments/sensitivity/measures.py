"""Measures of Section 4.2: RelL1 between k=1 and k weights (Figure 3, left), gradient fluctuations (footnote 5).

* :func:`rel_l1_layers`: ``RelL1(theta, theta')`` of Section 4.2, "Divergence in Optimization
  Paths", for the whole network and for each layer (leaves grouped by key-path prefix,
  :func:`eos_jax.metrics.layer_groups`), and each leaf; :func:`rel_l1_to_k1` for every other k.
* :func:`gradient_fluctuation`: the relative difference of two gradient pytrees, as footnote 5
  defines it (the mean over components of ``|x_i - y_i| / |x_i|``) and as a norm ratio
  ``||x - y||_2 / ||x||_2``, in float64. :func:`batch_selection_fluctuation` takes footnote 5's
  ``x`` (the mean gradient of B batches) and ``y`` (one more batch's gradient);
  :func:`float_fluctuation` compares the k=1 and k updates of the same state;
  :func:`median_over_epochs` is footnote 5's "median over epochs".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from eos_jax.metrics import layer_groups, rel_l1, rel_l1_per_leaf


@functools.partial(jax.jit, static_argnames="level")
def _rel_l1_all(a: Any, b: Any, level: int) -> dict[str, Any]:
    # One compiled program per parameter structure: eagerly every op of every leaf would compile
    # separately (eos_jax/train/stats.py jits rel_l1 for the same reason).
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    layers = {name: rel_l1([la[i] for i in idx], [lb[i] for i in idx]) for name, idx in layer_groups(a, level).items()}
    per_leaf = rel_l1_per_leaf(a, b)
    leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(per_leaf)[0]}
    return {"network": rel_l1(a, b), "layers": layers, "leaves": leaves}


def rel_l1_layers(a: Any, b: Any, level: int = 1) -> dict[str, Any]:
    """RelL1 of Section 4.2 (Figure 3, left) for the whole network, per layer and per leaf.

    ``RelL1(theta, theta') = (2/N) sum_i |theta_i - theta'_i| / (|theta_i| + |theta'_i|)``
    (:func:`eos_jax.metrics.rel_l1`, 0/0 counted as 0), with N the number of elements of the
    whole network, of one layer (the leaves sharing the first ``level`` keys of their path,
    :func:`eos_jax.metrics.layer_groups`) or of one leaf. A layer's value is ``rel_l1`` of its
    leaves (not a mean of leaf values), so a one-layer tree gives exactly the network's value.
    Computed in the leaves' dtype, in one jitted program.

    Args:
      a, b: parameter pytrees of equal structure (e.g. ``variables["params"]`` of k=1 and k=3).
      level: path depth that defines a layer (1: the top-level modules of a flax params dict).

    Returns:
      ``{"network": float, "layers": {name: float}, "leaves": {name: float}}``; names are
      ``jax.tree_util.keystr`` of the path, in tree order.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.measures import rel_l1_layers
      >>> a = {"conv": {"w": np.float32([1.0, 2.0]), "b": np.float32([0.0])}, "fc": {"w": np.float32([1.0])}}
      >>> b = {"conv": {"w": np.float32([1.0, 6.0]), "b": np.float32([0.0])}, "fc": {"w": np.float32([3.0])}}
      >>> r = rel_l1_layers(a, b)
      >>> round(r["network"], 6), {k: round(v, 6) for k, v in r["layers"].items()}
      (0.5, {"['conv']": 0.333333, "['fc']": 1.0})
      >>> r["leaves"]
      {"['conv']['b']": 0.0, "['conv']['w']": 0.5, "['fc']['w']": 1.0}
    """
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if ta != tb:
        raise ValueError(f"rel_l1_layers: pytrees differ in structure: {ta} vs {tb}")
    out = jax.device_get(_rel_l1_all(a, b, level))
    # A dict returned from jit comes back with sorted keys; give the names in tree order
    # ("[10]" sorts before "[2]" for list-structured params).
    leaf_names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    return {
        "network": float(out["network"]),
        "layers": {k: float(out["layers"][k]) for k in layer_groups(a, level)},
        "leaves": {k: float(out["leaves"][k]) for k in leaf_names},
    }


def rel_l1_to_k1(params_by_k: Mapping[Any, Any], level: int = 1) -> dict[Any, dict[str, Any]]:
    """:func:`rel_l1_layers` between the k=1 weights and those of each other k (Figure 3, left).

    Args:
      params_by_k: ``{k: params}``, holding ``k=1``, all from the same seed and epoch.
      level: as in :func:`rel_l1_layers`.

    Returns:
      ``{k: rel_l1_layers(params_by_k[1], params_by_k[k])}`` for every k other than 1, in order.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.measures import rel_l1_to_k1
      >>> w = np.float32([1.0, 2.0])
      >>> r = rel_l1_to_k1({1: {"w": w}, 2: {"w": w}, 3: {"w": np.float32([1.0, 6.0])}})
      >>> {k: v["network"] for k, v in r.items()}
      {2: 0.0, 3: 0.5}
    """
    if 1 not in params_by_k:
        raise ValueError(f"rel_l1_to_k1: no k=1 among k = {list(params_by_k)}")
    return {k: rel_l1_layers(params_by_k[1], p, level) for k, p in params_by_k.items() if k != 1}


@dataclasses.dataclass(frozen=True)
class Fluctuation:
    """Relative difference of a gradient ``y`` from a reference ``x`` (:func:`gradient_fluctuation`).

    Attributes:
      mean_rel: footnote 5's ``(1/M) sum_i |x_i - y_i| / |x_i|`` over the M components with x_i != 0.
      norm_rel: ``||x - y||_2 / ||x||_2`` over all components (NaN when x is zero).
      n_used: M, the components with ``x_i != 0``.
      n_total: all components.

    Examples:
      >>> from experiments.sensitivity.measures import Fluctuation
      >>> Fluctuation(mean_rel=0.5, norm_rel=0.25, n_used=3, n_total=4).n_zero
      1
    """

    mean_rel: float
    norm_rel: float
    n_used: int
    n_total: int

    @property
    def n_zero(self) -> int:
        """Components with ``x_i == 0``, left out of ``mean_rel`` (footnote 5 divides by ``|x_i|``)."""
        return self.n_total - self.n_used


def _flat64(tree: Any) -> np.ndarray:
    leaves = [np.asarray(jax.device_get(x), dtype=np.float64).reshape(-1) for x in jax.tree_util.tree_leaves(tree)]
    if not leaves:
        raise ValueError("gradient_fluctuation: empty pytree")
    return np.concatenate(leaves)


def gradient_fluctuation(x: Any, y: Any) -> Fluctuation:
    """Relative gradient fluctuation of footnote 5 (Section 4.2), and the norm ratio, in float64.

    Footnote 5: "The relative gradient fluctuation at an epoch is (1/M) sum_i |x_i - y_i| / |x_i|
    where M is the number of parameters and x_i is the i-th component." Components with
    ``x_i = 0`` would divide by zero; the paper does not say what it does with them: here they
    are left out of the mean (M counts the others) and counted in ``n_zero``. Also
    ``||x - y||_2 / ||x||_2``, the same comparison as a norm ratio. Every leaf is converted to
    float64 before subtracting, so the result does not depend on the gradients' dtype beyond
    their values.

    Args:
      x: reference gradient pytree (footnote 5: the mean gradient over B batches; for the
        floating-point error: the k=1 update).
      y: gradient pytree of the same structure (one batch's gradient; the k update).

    Returns:
      A :class:`Fluctuation`.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.measures import gradient_fluctuation
      >>> f = gradient_fluctuation({"w": np.array([1.0, -2.0, 0.0])}, {"w": np.array([1.5, -2.0, 0.0])})
      >>> f.mean_rel, round(f.norm_rel, 6), f.n_used, f.n_total  # (0.5 + 0) / 2; 0.5 / sqrt(5)
      (0.25, 0.223607, 2, 3)
    """
    ta, tb = jax.tree_util.tree_structure(x), jax.tree_util.tree_structure(y)
    if ta != tb:
        raise ValueError(f"gradient_fluctuation: pytrees differ in structure: {ta} vs {tb}")
    fx, fy = _flat64(x), _flat64(y)
    if fx.shape != fy.shape:
        raise ValueError(f"gradient_fluctuation: {fx.size} vs {fy.size} components")
    if not (np.all(np.isfinite(fx)) and np.all(np.isfinite(fy))):
        raise ValueError("gradient_fluctuation: non-finite gradient components")
    used = fx != 0
    d = fx - fy
    mean_rel = float(np.mean(np.abs(d[used]) / np.abs(fx[used]))) if used.any() else float("nan")
    nx = float(np.linalg.norm(fx))
    norm_rel = float(np.linalg.norm(d)) / nx if nx > 0 else float("nan")
    return Fluctuation(mean_rel=mean_rel, norm_rel=norm_rel, n_used=int(used.sum()), n_total=int(fx.size))


def batch_selection_fluctuation(batch_grads: Sequence[Any], sample_grad: Any) -> Fluctuation:
    """Footnote 5: one batch's gradient against the mean gradient of B batches.

    "We sample B batches and compute x to be the average batch gradient over the B batches.
    We then randomly sample a batch and let y be the batch gradient." ``x`` is averaged in float64.

    Args:
      batch_grads: the B batch-gradient pytrees (same structure), B >= 1.
      sample_grad: the gradient pytree of the further sampled batch.

    Returns:
      :func:`gradient_fluctuation` ``(x, y)``.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.measures import batch_selection_fluctuation
      >>> gs = [{"w": np.float32([1.0, 2.0])}, {"w": np.float32([3.0, 2.0])}]  # x = [2, 2]
      >>> batch_selection_fluctuation(gs, {"w": np.float32([1.0, 3.0])}).mean_rel  # (1/2 + 1/2) / 2
      0.5
    """
    if len(batch_grads) == 0:
        raise ValueError("batch_selection_fluctuation: no batch gradients (B must be >= 1)")
    structs = {jax.tree_util.tree_structure(g) for g in batch_grads}
    if len(structs) != 1:
        raise ValueError(f"batch_selection_fluctuation: batch gradients differ in structure: {structs}")
    x = jax.tree_util.tree_map(lambda *ls: np.mean([np.asarray(v, np.float64) for v in ls], axis=0), *batch_grads)
    return gradient_fluctuation(x, sample_grad)


def float_fluctuation(update_k1: Any, update_k: Any) -> Fluctuation:
    """Floating-point error of (PERTURBED SGD), Section 4.1: the k update against the k=1 update.

    Section 4.1: "RelativeError(x, y) := |x - y| / |x| < 2^-(s-1) where x = fl(eta g_t),
    y = fl(eta/k) x fl(k g_t)"; averaged over components as in footnote 5 (``mean_rel``) and as a
    norm ratio. Pass the updates the optimizer computed from the SAME state and gradient (e.g.
    :func:`eos_jax.optim.perturbed_scale` with k=1 and with k), not the gradients of two
    diverged runs.

    Examples:
      >>> import numpy as np
      >>> from experiments.sensitivity.measures import float_fluctuation
      >>> g, lr, k = np.float32([0.3, -0.7, 1.1]), np.float32(0.1), np.float32(3)
      >>> f = float_fluctuation(lr * g, (lr / k) * (k * g))
      >>> 0 < f.mean_rel < 2.0**-22, f.n_used
      (True, 3)
    """
    return gradient_fluctuation(update_k1, update_k)


def median_over_epochs(values: Sequence[Fluctuation]) -> Fluctuation:
    """Footnote 5: "We then take the median over epochs as the relative gradient fluctuation."

    Medians of ``mean_rel`` and ``norm_rel`` taken separately (NumPy's median: the mean of the
    two middle values for an even count); ``n_used`` and ``n_total`` are the smallest seen.

    Examples:
      >>> from experiments.sensitivity.measures import Fluctuation, median_over_epochs
      >>> fs = [Fluctuation(0.1, 0.2, 4, 4), Fluctuation(0.3, 0.1, 3, 4), Fluctuation(0.2, 0.4, 4, 4)]
      >>> median_over_epochs(fs)
      Fluctuation(mean_rel=0.2, norm_rel=0.2, n_used=3, n_total=4)
    """
    if not values:
        raise ValueError("median_over_epochs: no epochs")
    return Fluctuation(
        mean_rel=float(np.median([v.mean_rel for v in values])),
        norm_rel=float(np.median([v.norm_rel for v in values])),
        n_used=min(v.n_used for v in values),
        n_total=min(v.n_total for v in values),
    )
