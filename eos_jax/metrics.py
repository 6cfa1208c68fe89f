"""Distances between parameter pytrees, as the paper measures them.

* :func:`rel_l1`: the relative L1 difference of Section 4 (Figure 3, Figure 5 right),
  ``RelL1(a, b) = (2/N) * sum_i |a_i - b_i| / (|a_i| + |b_i|)`` over all N elements of
  all leaves, with 0/0 counted as 0. Jittable and vmappable.
* :func:`ulp_diff`: how many elements differ and by how many units in the last place.
* :func:`tree_digest`: SHA-256 of dtypes, shapes and raw bytes, for bit-for-bit
  comparisons of runs through their logs.
* :func:`layer_groups`: leaves grouped into layers by their key-path prefix (the layers of
  :func:`eos_jax.hessian.layer_sharpness` and of the per-layer RelL1 of ``experiments.sensitivity``).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.distributed import to_host
from eos_jax.errors import ConfigError


def _leaf_rel_l1_sum(a: jax.Array, b: jax.Array) -> jax.Array:
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    num = jnp.abs(a - b)
    den = jnp.abs(a) + jnp.abs(b)
    safe = jnp.where(den == 0, jnp.ones_like(den), den)
    return jnp.sum(jnp.where(den == 0, jnp.zeros_like(num), num / safe))


def rel_l1(a: Any, b: Any) -> jax.Array:
    """RelL1 = (2/N) sum |a_i - b_i| / (|a_i| + |b_i|) over every element of two pytrees.

    Elements where both are zero contribute 0. The result lies in [0, 2]; it is
    computed in the leaves' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.metrics import rel_l1
      >>> float(rel_l1(jnp.array([1.0, 1.0]), jnp.array([1.0, 3.0])))  # (2/2) * (0 + 2/4)
      0.5
      >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.0])}
      >>> b = {"w": jnp.array([1.0, 6.0]), "b": jnp.array([0.0])}
      >>> round(float(rel_l1(a, b)), 6)  # (2/3) * (0 + 4/8 + 0): 0/0 counts as 0
      0.333333
    """
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        raise ValueError(f"rel_l1: pytrees differ in structure: {ta} vs {tb}")
    if not la:
        raise ValueError("rel_l1: empty pytree")
    n = sum(int(np.size(x)) for x in la)
    total = sum(_leaf_rel_l1_sum(x, y) for x, y in zip(la, lb))
    return 2.0 * total / n


def rel_l1_per_leaf(a: Any, b: Any) -> Any:
    """:func:`rel_l1` of each pair of leaves; a pytree of scalars shaped like ``a``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.metrics import rel_l1_per_leaf
      >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.0])}
      >>> b = {"w": jnp.array([1.0, 6.0]), "b": jnp.array([0.0])}
      >>> {k: float(v) for k, v in rel_l1_per_leaf(a, b).items()}
      {'b': 0.0, 'w': 0.5}
    """
    return jax.tree_util.tree_map(lambda x, y: 2.0 * _leaf_rel_l1_sum(x, y) / max(int(np.size(x)), 1), a, b)


class UlpDiff(NamedTuple):
    """Result of :func:`ulp_diff`.

    Examples:
      >>> from eos_jax.metrics import UlpDiff
      >>> d = UlpDiff(n_diff=1, n_total=4, max_ulp=3)
      >>> d.max_ulp, d.fraction
      (3, 0.25)
    """

    n_diff: int  # elements whose bits differ
    n_total: int  # elements compared
    max_ulp: int  # largest distance in units in the last place (0 when equal)

    @property
    def fraction(self) -> float:
        return self.n_diff / self.n_total if self.n_total else 0.0


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _ordered(x: np.ndarray) -> list[int]:
    """Maps IEEE floats to integers whose differences count ulps (+0.0 and -0.0 both map to 0)."""
    sign = 1 << (8 * x.dtype.itemsize - 1)
    return [-(v & (sign - 1)) if v & sign else v for v in x.view(_UINT[x.dtype.itemsize]).tolist()]


def ulp_diff(a: Any, b: Any) -> UlpDiff:
    """Counts differing elements of two float pytrees and their largest ulp distance.

    Equality is bitwise: +0.0 vs -0.0 counts as a differing element at distance 0 ulps.
    Leaves must have equal dtypes and shapes.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.metrics import ulp_diff
      >>> x = np.array([1.0, 2.0, 3.0], np.float32)
      >>> y = x.copy(); y[1] = np.nextafter(np.nextafter(x[1], 3), 3)  # two ulps up
      >>> ulp_diff(x, y)
      UlpDiff(n_diff=1, n_total=3, max_ulp=2)
      >>> ulp_diff(np.float32([0.0]), np.float32([-0.0]))
      UlpDiff(n_diff=1, n_total=1, max_ulp=0)
    """
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        raise ValueError(f"ulp_diff: pytrees differ in structure: {ta} vs {tb}")
    n_diff = n_total = max_ulp = 0
    for x, y in zip(la, lb):
        x = np.asarray(x)
        y = np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            raise ValueError(f"ulp_diff: leaves differ: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"ulp_diff: dtype {x.dtype} is not a float type")
        n_total += x.size
        ux = x.reshape(-1).view(_UINT[x.dtype.itemsize])
        uy = y.reshape(-1).view(_UINT[y.dtype.itemsize])
        differ = ux != uy
        n_diff += int(differ.sum())
        if differ.any():
            ox = _ordered(x.reshape(-1)[differ])
            oy = _ordered(y.reshape(-1)[differ])
            max_ulp = max(max_ulp, max(abs(p - q) for p, q in zip(ox, oy)))
    return UlpDiff(n_diff=n_diff, n_total=n_total, max_ulp=max_ulp)


def tree_digest(tree: Any) -> str:
    """SHA-256 (hex) over each leaf's key path, dtype, shape and raw bytes, in tree order.

    The tree is brought to the host once (:func:`eos_jax.distributed.to_host`: with several
    processes, one collective for the whole tree, which every process must call).

    Examples:
      >>> import numpy as np
      >>> from eos_jax.metrics import tree_digest
      >>> d = tree_digest({"w": np.float32([1.0, 2.0])})
      >>> len(d), d == tree_digest({"w": np.float32([1.0, 2.0])})
      (64, True)
      >>> d == tree_digest({"w": np.float64([1.0, 2.0])})  # same values, other dtype
      False
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(to_host(tree))[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode())
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def layer_groups(tree: Any, level: int = 1) -> dict[str, list[int]]:
    """Leaf indices (in tree order) grouped by the first ``level`` entries of their key paths.

    A "layer" is the set of leaves that share a path prefix, e.g. the top-level modules
    ``{"Dense_0": {"kernel", "bias"}, ...}`` of a flax params dict with ``level=1``. Names are
    ``jax.tree_util.keystr`` of the prefix; groups come in the order of their first leaf.

    Args:
      tree: any pytree.
      level: path depth that defines a layer (>= 1); leaves with shorter paths form their own group.

    Returns:
      ``{layer name: [indices into jax.tree_util.tree_leaves(tree)]}``.

    Raises:
      ConfigError: ``level`` is not an integer >= 1.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.metrics import layer_groups
      >>> tree = {"conv": {"b": np.zeros(2), "w": np.zeros(3)}, "dense": {"w": np.zeros(1)}}
      >>> layer_groups(tree)
      {"['conv']": [0, 1], "['dense']": [2]}
      >>> layer_groups(tree, level=2)
      {"['conv']['b']": [0], "['conv']['w']": [1], "['dense']['w']": [2]}
    """
    if isinstance(level, bool) or not isinstance(level, int) or level < 1:
        raise ConfigError(f"layer_groups: level must be an integer >= 1, got {level!r}")
    groups: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        groups.setdefault(jax.tree_util.keystr(tuple(path[:level])), []).append(i)
    return groups
