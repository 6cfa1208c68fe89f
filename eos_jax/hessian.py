"""Curvature engine: Hessian-vector products, top eigenvalues and (normalized) sharpness.

The Edge-of-Stability side of the paper (Sec. 6, Figures 6 and 8) tracks the *sharpness*
``lambda_max(H)``, the largest ALGEBRAIC eigenvalue of the Hessian of the training loss, and the
normalized sharpness ``lr * lambda_max`` against its stability threshold (2 for gradient descent).

Everything here is a pure function of ``(loss_fn, params, batch, ...)`` and runs unchanged under
``jit``, ``vmap`` (fixed-iteration mode) and on several devices (``mesh=``):

* :func:`hvp`: forward-over-reverse ``jvp(grad)``; :func:`linearized_hvp`: one ``jax.linearize``
  reused for many products; :func:`make_hvp`: either of them, optionally summed over chunks of the
  batch; :func:`data_parallel_hvp`: the batch sharded over a device mesh, whose devices may belong
  to several processes (:func:`data_mesh`, :func:`eos_jax.distributed.shard_batch`).
* :func:`top_eigenvalue` (power iteration with a shift, or Lanczos) and :func:`top_eigenvalues`
  (Lanczos with full reorthogonalization), returning :class:`EigResult`.
* :func:`trace`: ``tr H`` by Hutchinson's estimator with Rademacher probes (:class:`TraceResult`);
  :func:`density`: the eigenvalue density by stochastic Lanczos quadrature (:class:`DensityResult`),
  the two spectrum summaries of PyHessian (Yao et al. 2020).
* :func:`preconditioned_top_eigenvalue` with :func:`adam_preconditioner`: ``lambda_max(P^-1 H)`` of
  Adam (Cohen et al. 2022), computed as the top eigenvalue of the symmetric ``P^-1/2 H P^-1/2``.
* :func:`layer_sharpness`: the top eigenvalue of each layer's diagonal Hessian block (Sec. 5.5:
  instabilities arise at one layer).
* :func:`stability_threshold`: 2, ``2 + 2 beta``, ``(2 + 2 beta) / (1 + 2 beta)`` and
  ``(2 + 2 b1) / (1 - b1)``.

Contract on ``loss_fn(params, batch) -> scalar``: ``batch`` is a pytree whose leaves share a
leading example axis. Chunking (``chunk_size=``) and several devices (``mesh=``) are EXACT (up to
summation order) only when the loss is a MEAN over examples of a per-example loss, with no coupling
between examples (no train-mode batch norm, no batch-size-dependent normalization): the Hessian of
the full batch is then the size-weighted mean of the chunks' (shards') Hessians, which is what is
computed. Without chunking and on one device any scalar loss is fine. Data is an argument, never
closed over, so that ``jit`` does not fold it into the program as a constant.

Eigen-solvers (:mod:`eos_jax.eigen`) run on a flat vector (``jax.flatten_util.ravel_pytree``) in the dtype of ``params``
(all floating leaves must share one dtype). Stopping: ``tol=None`` runs exactly ``num_iters``
Hessian-vector products in ``lax.fori_loop``/``lax.scan`` (no data-dependent control flow, so it
vmaps over lanes of a sweep); a float ``tol`` stops in ``lax.while_loop`` as soon as the stop rule
holds (at most ``num_iters`` products). ``stop="residual"`` (the default): the residual
``||H v - lambda v|| <= tol * |lambda|``; the eigenvalue error is then at most ``tol * |lambda|`` and
typically ``(tol * lambda)**2 / gap``. ``stop="eigenvalue"`` (Lanczos): the estimated error of the
eigenvalue itself, ``min(r, 4 r**2 / gap)`` with the gap from the Ritz values but never below ``r / 5``
(:func:`eos_jax.eigen.ritz_errors`), is at most ``tol * |lambda|``: the accuracy ``tol`` asks of the
eigenvalue, for fewer products (the eigenvector is then less accurate, its residual up to
``5 * tol * |lambda|``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec

from eos_jax.eigen import STOPS, lanczos_pairs, lanczos_quadrature, power_iteration, start_vector
from eos_jax.errors import ConfigError
from eos_jax.metrics import layer_groups

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

_METHODS = ("power", "lanczos")
_THRESHOLD_KINDS = ("gd", "heavy_ball", "nesterov", "adam")


class EigResult(NamedTuple):
    """Result of :func:`top_eigenvalue` (scalars) or :func:`top_eigenvalues` (leading axis k).

    Attributes:
      eigenvalue: the largest algebraic eigenvalue(s), in the dtype of params (descending for k).
      eigenvector: unit-norm eigenvector(s), a pytree like params (leaves with a leading k axis).
      num_hvps: number of Hessian-vector products used (int32).
      residual: ``||H v - eigenvalue * v||`` (2-norm over all leaves) for each returned pair.
      converged: bool, for each returned pair: the solver vouches that it is the top (largest
        algebraic) eigenpair to the tolerance, i.e. ``residual <= tol * |eigenvalue|``
        (``stop="residual"``) or the estimated eigenvalue error is (``stop="eigenvalue"``,
        :func:`eos_jax.eigen.ritz_errors`); in fixed-iteration mode ``tol`` is
        :data:`FIXED_MODE_TOL`. For power iteration, in addition, the last
        phase ran on a spectrum dominated by the top eigenvalue (never the unshifted iteration on
        a negative Rayleigh quotient, which converges to the most negative eigenvalue). False means
        the eigenvalue may not be the top one: use more ``num_iters`` or ``method="lanczos"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.hessian import EigResult
      >>> r = EigResult(eigenvalue=jnp.float32(4.0), eigenvector={"w": jnp.array([0.0, 1.0])},
      ...               num_hvps=jnp.int32(20), residual=jnp.float32(0.0), converged=jnp.bool_(True))
      >>> float(r.eigenvalue), bool(r.converged)
      (4.0, True)
    """

    eigenvalue: jax.Array
    eigenvector: PyTree
    num_hvps: jax.Array
    residual: jax.Array
    converged: jax.Array


# ----------------------------------------------------------------------------------------------
# Hessian-vector products.


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H(params) v`` by forward-over-reverse differentiation.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: point at which the Hessian is taken (pytree).
      batch: data passed to ``loss_fn`` (pytree).
      v: tangent, a pytree like ``params``.

    Returns:
      ``H v``, a pytree like ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> hv = jax.jit(lambda p, b, v: hessian.hvp(loss, p, b, v))  # one compiled program
      >>> hv(params, x, {"w": jnp.array([1.0, 1.0])})["w"].tolist()
      [1.0, 4.0]
    """
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))[1]


def linearized_hvp(loss_fn: LossFn, params: PyTree, batch: PyTree) -> Callable[[PyTree], PyTree]:
    """Returns ``v -> H v`` built on one ``jax.linearize`` of the gradient.

    The forward pass and the primal part of the backward pass are done once; each product then
    only runs the linear (tangent) program, which is cheaper than :func:`hvp` when many products
    are taken at the same point (power iteration, Lanczos). Memory: the linearization keeps the
    residuals of the whole batch alive; use :func:`make_hvp` with ``chunk_size`` for large batches.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: point at which the Hessian is taken.
      batch: data passed to ``loss_fn``.

    Returns:
      A function ``v -> H v`` on pytrees like ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> hv = jax.jit(hessian.linearized_hvp(loss, params, x))  # linearize once, then many products
      >>> hv({"w": jnp.array([1.0, 0.0])})["w"].tolist(), hv({"w": jnp.array([0.0, 1.0])})["w"].tolist()
      ([1.0, 0.0], [0.0, 4.0])
    """
    _, f_jvp = jax.linearize(lambda p: jax.grad(loss_fn)(p, batch), params)
    return f_jvp


def _batch_size(batch: PyTree) -> int:
    """The common leading-axis length of the batch's leaves."""
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree_util.tree_leaves(batch)}
    if not sizes:
        raise ConfigError("batch has no array leaves; chunking and sharding need a leading example axis")
    if len(sizes) != 1 or -1 in sizes:
        raise ConfigError(f"batch leaves must share one leading example axis; got leading sizes {sorted(sizes)}")
    return sizes.pop()


def _tree_axpy(a: float, x: PyTree, y: PyTree) -> PyTree:
    """``a * x + y`` leafwise (``a`` a Python float, so the leaf dtype is kept)."""
    return jax.tree_util.tree_map(lambda xi, yi: a * xi + yi, x, y)


def make_hvp(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    linearize: bool = False,
) -> Callable[[PyTree], PyTree]:
    """Returns ``v -> H v``, optionally summing the batch in chunks.

    With ``chunk_size``, the batch is cut into ``N // chunk_size`` chunks of ``chunk_size``
    examples (a ``lax.scan``) plus one remainder chunk, and ``H v = sum_c (n_c / N) H_c v`` where
    ``H_c`` is the Hessian of ``loss_fn`` on chunk ``c``. This equals the full-batch Hessian when
    ``loss_fn`` is a mean over examples (see the module docstring). Each product then recomputes
    the forward pass of every chunk (memory of one chunk instead of the whole batch).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: point at which the Hessian is taken.
      batch: data; with ``chunk_size``, leaves must share a leading example axis.
      chunk_size: examples per chunk, or None for the whole batch at once.
      linearize: without chunking, reuse one linearization (:func:`linearized_hvp`) instead of
        a fresh ``jvp(grad)`` per product (:func:`hvp`, the default). Which is cheaper depends on
        the model: ``jvp(grad)`` for the paper's shifted-slice CNN (a linearization keeps
        residuals that cost more to read than to recompute), one linearization for a dense tanh
        MLP (``benchmarks/bench_hessian.py`` prints both per product, in gradients).

    Returns:
      A function ``v -> H v`` on pytrees like ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> hv = jax.jit(lambda p, b, v: hessian.make_hvp(loss, p, b, chunk_size=1)(v))  # one example at a time
      >>> hv(params, x, {"w": jnp.array([1.0, 1.0])})["w"].tolist()  # the full batch's H v
      [1.0, 4.0]
    """
    if chunk_size is None:
        if linearize:
            return linearized_hvp(loss_fn, params, batch)
        return functools.partial(hvp, loss_fn, params, batch)
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = _batch_size(batch)
    chunk_size = int(min(chunk_size, n))
    n_chunks, rem = divmod(n, chunk_size)
    cut = n_chunks * chunk_size
    chunks = jax.tree_util.tree_map(lambda x: x[:cut].reshape((n_chunks, chunk_size) + x.shape[1:]), batch)
    tail = jax.tree_util.tree_map(lambda x: x[cut:], batch) if rem else None
    w_chunk = chunk_size / n  # weights of a mean over examples
    w_tail = rem / n

    def op(v: PyTree) -> PyTree:
        def body(acc, chunk):
            return _tree_axpy(w_chunk, hvp(loss_fn, params, chunk, v), acc), None

        acc = jax.tree_util.tree_map(jnp.zeros_like, v)
        acc, _ = lax.scan(body, acc, chunks)
        if tail is not None:
            acc = _tree_axpy(w_tail, hvp(loss_fn, params, tail, v), acc)
        return acc

    return op


def data_mesh(devices: Any = None, axis_name: str = "data") -> Mesh:
    """A one-axis mesh over ``devices`` for data parallelism; by default every process's devices.

    The default is ``jax.devices()``: in a single process these are its local devices
    (``jax.local_devices()``); with several processes joined by ``jax.distributed``
    (:mod:`eos_jax.distributed`) it spans the devices of all of them (by id: process 0's first on CPU),
    and :func:`eos_jax.distributed.shard_batch` puts each process's examples on that process's own
    devices. Pass ``jax.local_devices()`` for a mesh of this process alone.

    Examples:
      >>> import jax
      >>> from eos_jax.hessian import data_mesh
      >>> mesh = data_mesh()
      >>> mesh.axis_names, mesh.shape["data"] == len(jax.devices())
      (('data',), True)
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def _mesh_axis(mesh: Mesh) -> tuple[str, int]:
    """The single axis name of a data mesh and its size."""
    if len(mesh.axis_names) != 1:
        raise ConfigError(f"mesh must have exactly one (data) axis, got axes {tuple(mesh.axis_names)}")
    name = mesh.axis_names[0]
    return name, int(mesh.shape[name])


def _check_divisible(batch: PyTree, n_dev: int) -> None:
    """Raises unless the batch splits into equal shards over ``n_dev`` devices."""
    n = _batch_size(batch)
    if n % n_dev:
        raise ConfigError(f"batch size {n} is not divisible by the {n_dev} devices of the mesh")


def _sharded_op(loss_fn: LossFn, params: PyTree, batch: PyTree, n_dev: int, chunk_size, linearize):
    """``v -> H v`` inside ``shard_map`` (check_vma=True): local mean-loss HVP, summed over shards.

    ``params`` and ``v`` are replicated (unvarying) and the local loss is varying, so ``jax.grad``
    transposes the implicit ``pvary`` of the params into a ``psum``: the gradient, and hence its
    ``jvp``, already is the SUM over shards of the local-mean Hessians times ``v``. No ``psum`` or
    ``pmean`` is added (that would count each shard ``n_dev`` times); dividing by the number of
    (equal) shards turns the sum of shard means into the full-batch mean.
    """
    local = make_hvp(loss_fn, params, batch, chunk_size=chunk_size, linearize=linearize)
    inv = 1.0 / n_dev
    return lambda v: jax.tree_util.tree_map(lambda h: inv * h, local(v))


def data_parallel_hvp(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    v: PyTree,
    *,
    mesh: Mesh,
    chunk_size: int | None = None,
) -> PyTree:
    """``H v`` with the batch sharded over the devices of a one-axis ``mesh``, params replicated.

    What runs where: each device of the mesh computes the Hessian-vector product of the mean loss
    on its own equal shard of the batch; one all-reduce (the transpose of the params' broadcast
    inside ``jax.shard_map``, see :func:`_sharded_op`) sums them, and dividing by the number of
    shards gives the full batch's: for a loss that is a mean over examples split into ``S`` equal
    shards, ``H = (1/S) sum_s H_s`` (the full-batch Hessian of a mean loss is the mean of the equal
    shards' Hessians; module docstring). The batch size must be divisible by the number of devices.

    Several processes: with ``mesh=data_mesh()`` (every process's devices) and the batch built by
    :func:`eos_jax.distributed.shard_batch` from each process's own examples, every process calls
    this (jitted or not) with the same params and ``v``; the all-reduce crosses processes (gloo on
    CPU) and the result is replicated on every device of every process, readable anywhere
    (``np.asarray`` or :func:`eos_jax.distributed.to_host`). With two shards, 2 processes x 1 device
    and 1 process x 2 devices give the same bits (tests/test_dp_multiprocess.py).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over examples.
      params: point at which the Hessian is taken (replicated).
      batch: data, split along its leading axis.
      v: tangent, a pytree like ``params`` (replicated).
      mesh: a one-axis mesh, e.g. :func:`data_mesh`.
      chunk_size: optional chunking of each device's shard.

    Returns:
      ``H v``, replicated, a pytree like ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> mesh = hessian.data_mesh(jax.local_devices()[:1])  # the batch size must divide evenly
      >>> hv = jax.jit(lambda p, b, v: hessian.data_parallel_hvp(loss, p, b, v, mesh=mesh))
      >>> hv(params, x, {"w": jnp.array([1.0, 1.0])})["w"].tolist()
      [1.0, 4.0]
    """
    axis, n_dev = _mesh_axis(mesh)
    _check_divisible(batch, n_dev)

    def local(p, b, t):
        return _sharded_op(loss_fn, p, b, n_dev, chunk_size, False)(t)

    spec = PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec(axis), spec), out_specs=spec)(params, batch, v)


FIXED_MODE_TOL = 1e-3  # relative residual behind EigResult.converged when tol is None


# ----------------------------------------------------------------------------------------------
# Public eigenvalue API.


def _check_solver_args(method: str, num_iters: int, tol: float | None, stop: str = "residual") -> None:
    """Validates solver options with one-line messages."""
    if method not in _METHODS:
        raise ConfigError(f"method must be one of {_METHODS}, got {method!r}")
    if stop not in STOPS:
        raise ConfigError(f"stop must be one of {STOPS}, got {stop!r}")
    if stop == "eigenvalue" and method != "lanczos":
        raise ConfigError(
            f"stop='eigenvalue' needs method='lanczos' (its gap comes from the Ritz values), got {method!r}"
        )
    if not isinstance(num_iters, (int, np.integer)) or isinstance(num_iters, bool) or num_iters < 1:
        raise ConfigError(f"num_iters must be a positive int, got {num_iters!r}")
    if method == "power" and num_iters < 2:
        raise ConfigError(f"method='power' needs num_iters >= 2 (two phases), got {num_iters}")
    if tol is not None and not (isinstance(tol, (float, int)) and 0 < tol < 1):
        raise ConfigError(f"tol must be None (fixed iterations) or a float in (0, 1), got {tol!r}")


def _flat_dtype(params: PyTree):
    """The single floating dtype of all leaves of ``params``."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise ConfigError(f"params leaves must share one floating dtype, got {sorted(str(d) for d in dtypes)}")
    return dtypes.pop()


def _on_hessian(fn, loss3, params: PyTree, aux: PyTree, batch: PyTree, extra: PyTree, chunk_size, mesh, linearize):
    """``fn(op, flat_params, unravel, extra)`` with ``op: (n,) -> (n,)`` the raveled Hessian of ``loss3(params, aux, batch)`` in params.

    On one device ``op`` is :func:`make_hvp`'s; with ``mesh`` the whole of ``fn`` runs inside
    ``jax.shard_map`` with the batch sharded and params, ``aux`` and ``extra`` (start vectors,
    keys) replicated, each product the mean of the shards' (one all-reduce, :func:`_sharded_op`),
    and the result is replicated. ``aux`` is an undifferentiated argument of the loss, passed
    rather than closed over.
    """
    if mesh is not None:
        axis, n_dev = _mesh_axis(mesh)
        _check_divisible(batch, n_dev)

    def solve(p, a, b, extra_):
        loss = lambda pp, bb: loss3(pp, a, bb)  # noqa: E731
        if mesh is None:
            tree_op = make_hvp(loss, p, b, chunk_size=chunk_size, linearize=linearize)
        else:
            tree_op = _sharded_op(loss, p, b, n_dev, chunk_size, linearize)
        flat_p, unravel = ravel_pytree(p)
        op = lambda x: ravel_pytree(tree_op(unravel(x)))[0]  # noqa: E731
        return fn(op, flat_p, unravel, extra_)

    if mesh is None:
        return solve(params, aux, batch, extra)
    rep = PartitionSpec()
    return jax.shard_map(solve, mesh=mesh, in_specs=(rep, rep, PartitionSpec(axis), rep), out_specs=rep)(
        params, aux, batch, extra
    )


def _eig(
    loss3: Callable[[PyTree, PyTree, PyTree], jax.Array],
    params: PyTree,
    aux: PyTree,
    batch: PyTree,
    v0: PyTree | None,
    key: jax.Array | None,
    *,
    k: int | None,
    method: str,
    num_iters: int,
    tol: float | None,
    chunk_size: int | None,
    mesh: Mesh | None,
    linearize: bool,
    stop: str = "residual",
) -> EigResult:
    """The eigensolvers' driver: Hessian of ``loss3(params, aux, batch)`` in ``params``; ``aux`` is a replicated,
    undifferentiated argument (so nothing is closed over); one device or the whole solver in shard_map
    (:func:`_on_hessian`, which :func:`trace` and :func:`density` run on too).
    """
    _check_solver_args(method, num_iters, tol, stop)
    dtype = _flat_dtype(params)
    if key is None:
        key = jax.random.key(0)  # a fixed default start; pass a key (or v0) to choose another

    def solve(op, flat_p, unravel, start):
        v0_, key_ = start
        v0_flat = None if v0_ is None else ravel_pytree(v0_)[0]
        v_init = start_vector(v0_flat, jax.random.fold_in(key_, 0), flat_p.shape[0], dtype)
        rtol = FIXED_MODE_TOL if tol is None else tol
        if k is None and method == "power":
            st, top = power_iteration(op, v_init, num_iters, tol)
            return EigResult(st.lam, unravel(st.vec), st.n, st.res, top & (st.res <= rtol * jnp.abs(st.lam)))
        theta, vecs, res, err, n_hvp = lanczos_pairs(op, v_init, key_, num_iters, tol, 1 if k is None else k, stop=stop)
        conv = err <= rtol * jnp.abs(theta)  # Ritz values from the top end of the Krylov space
        if k is None:
            return EigResult(theta[0], unravel(vecs[0]), n_hvp, res[0], conv[0])
        return EigResult(theta, jax.vmap(unravel)(vecs), n_hvp, res, conv)

    return _on_hessian(solve, loss3, params, aux, batch, (v0, key), chunk_size, mesh, linearize)


def top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    method: str = "lanczos",
    num_iters: int = 20,
    tol: float | None = None,
    v0: PyTree | None = None,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    linearize: bool = False,
    stop: str = "residual",
) -> EigResult:
    """The largest ALGEBRAIC eigenvalue of the Hessian of ``loss_fn`` at ``params`` (the sharpness).

    Normalized sharpness in the paper's sense (Sec. 6, Figure 6) is ``lr * eigenvalue``; compare it
    with :func:`stability_threshold`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; a mean over examples when chunking/sharding.
      params: point at which the Hessian is taken; leaves share one floating dtype.
      batch: data passed to ``loss_fn``.
      method: ``"lanczos"`` (full reorthogonalization; robust to near-ties and to a dominant
        negative eigenvalue) or ``"power"`` (power iteration, shifted by the dominant eigenvalue when
        that one is negative, see :func:`eos_jax.eigen.power_iteration`).
      num_iters: Hessian-vector products in fixed mode; the maximum in tolerance mode.
      tol: None for exactly ``num_iters`` products (vmappable, no data-dependent loop), or the
        relative tolerance at which ``stop`` ends the solve.
      v0: warm start, e.g. the previous eigenvector (a pytree like params); a zero v0 means cold.
      key: PRNG key of the random start (when ``v0`` is None or zero) and of Lanczos restarts;
        defaults to ``jax.random.key(0)``.
      chunk_size: sum each product over chunks of this many examples (memory), see :func:`make_hvp`.
      mesh: a one-axis device mesh: the batch is sharded over it, params replicated, and the whole
        solver runs inside ``jax.shard_map``: every device runs the same iteration on the replicated
        vectors, and each product is the mean of the shards' Hessian-vector products (one
        all-reduce, see :func:`data_parallel_hvp`). Its devices may belong to several processes
        (:func:`data_mesh`, batch from :func:`eos_jax.distributed.shard_batch`): the result is then
        replicated on every device of every process, so ``float(r.eigenvalue)`` and the
        eigenvector can be read on each process.
      linearize: reuse one linearization for all products (without chunking); default ``False``:
        a fresh ``jvp(grad)`` per product (see :func:`make_hvp` for which is cheaper).
      stop: the stop rule of a tolerance-mode solve (module docstring): ``"residual"`` (default),
        ``||Hv - lambda v|| <= tol |lambda|``, or ``"eigenvalue"`` (Lanczos only), the estimated
        error of the eigenvalue ``<= tol |lambda|`` (:func:`eos_jax.eigen.ritz_errors`): fewer
        products for the same eigenvalue accuracy, a less accurate eigenvector.

    Returns:
      :class:`EigResult` with scalar eigenvalue and residual, the unit eigenvector as a pytree like
      params, and the number of products used.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> sharpness = jax.jit(lambda p, b: hessian.top_eigenvalue(loss, p, b, method="power", num_iters=20))
      >>> r = sharpness(params, x)
      >>> round(float(r.eigenvalue), 4), bool(r.converged), int(r.num_hvps)
      (4.0, True, 20)
      >>> [round(abs(c), 4) for c in r.eigenvector["w"].tolist()]
      [0.0, 1.0]
    """
    return _eig(
        lambda p, a, b: loss_fn(p, b),
        params,
        None,
        batch,
        v0,
        key,
        k=None,
        method=method,
        num_iters=num_iters,
        tol=tol,
        chunk_size=chunk_size,
        mesh=mesh,
        linearize=linearize,
        stop=stop,
    )


def top_eigenvalues(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    k: int,
    *,
    num_iters: int = 40,
    tol: float | None = None,
    v0: PyTree | None = None,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    linearize: bool = False,
    stop: str = "residual",
) -> EigResult:
    """The k largest algebraic Hessian eigenvalues by Lanczos with full reorthogonalization.

    A single-vector Krylov method sees one direction of a repeated eigenvalue until the Krylov space
    is exhausted (then it restarts orthogonally and finds the others); with ``num_iters`` smaller
    than the parameter count, a multiplicity may therefore be reported once. ``tol`` applies to all
    k pairs.

    Args:
      loss_fn, params, batch, num_iters, tol, v0, key, chunk_size, mesh, linearize, stop: as in
        :func:`top_eigenvalue` (``stop="eigenvalue"``: each pair's gap is to its nearest other Ritz value).
      k: number of eigenpairs (static, ``1 <= k <= min(num_iters, number of parameters)``).

    Returns:
      :class:`EigResult` with eigenvalues ``(k,)`` in descending order, eigenvectors as a pytree whose
      leaves have a leading k axis, the number of products, and residuals ``(k,)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> r = jax.jit(lambda p, b: hessian.top_eigenvalues(loss, p, b, k=2))(params, x)
      >>> [round(e, 4) for e in r.eigenvalue.tolist()], r.eigenvector["w"].shape, r.converged.tolist()
      ([4.0, 1.0], (2, 2), [True, True])
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive int, got {k!r}")
    return _eig(
        lambda p, a, b: loss_fn(p, b),
        params,
        None,
        batch,
        v0,
        key,
        k=int(k),
        method="lanczos",
        num_iters=num_iters,
        tol=tol,
        chunk_size=chunk_size,
        mesh=mesh,
        linearize=linearize,
        stop=stop,
    )


# ----------------------------------------------------------------------------------------------
# Spectrum: Hessian trace (Hutchinson) and eigenvalue density (stochastic Lanczos quadrature).


class TraceResult(NamedTuple):
    """Result of :func:`trace`: Hutchinson's estimate of ``tr H`` and its standard error.

    Attributes:
      estimate: the mean of the probes' ``z^T H z`` (scalar, dtype of params).
      stderr: their sample standard deviation (``ddof=1``) over ``sqrt(num_probes)``: the standard
        error of ``estimate`` (NaN for a single probe).
      samples: ``(num_probes,)`` each probe's ``z^T H z``.
      num_hvps: Hessian-vector products used, ``num_probes`` (int32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.hessian import TraceResult
      >>> r = TraceResult(estimate=jnp.float32(5.0), stderr=jnp.float32(0.0),
      ...                 samples=jnp.array([5.0, 5.0]), num_hvps=jnp.int32(2))
      >>> float(r.estimate), int(r.num_hvps)
      (5.0, 2)
    """

    estimate: jax.Array
    stderr: jax.Array
    samples: jax.Array
    num_hvps: jax.Array


class DensityResult(NamedTuple):
    """Result of :func:`density`: per-probe Gauss quadratures and the smoothed eigenvalue density.

    Attributes:
      ritz_values: ``(num_probes, m)`` each probe's quadrature nodes, descending (``m =
        min(num_steps, number of parameters)``); past ``krylov_dim`` they repeat the smallest node.
      weights: ``(num_probes, m)`` the Gauss weights, nonnegative, each row summing to 1; 0 past
        ``krylov_dim``.
      krylov_dim: ``(num_probes,)`` int32, each probe's Krylov dimension (``m`` unless invariant sooner).
      grid: ``(num_points,)`` the points where the density is evaluated.
      density: ``(num_points,)`` ``(1 / num_probes) sum_p sum_i w_pi N(x; theta_pi, sigma^2)``; it
        integrates to 1 over the real line, so to ~1 over the default grid (which pads by 5 sigma).
      sigma: the Gaussian's standard deviation (scalar).
      top_eigenvalues: ``(top_k,)`` descending: for each rank i, the largest over probes of the probe's
        i-th Ritz value (each a lower bound of ``lambda_i(H)`` by Cauchy interlacing).
      num_hvps: Hessian-vector products used, ``num_probes * m`` (int32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.hessian import DensityResult
      >>> r = DensityResult(ritz_values=jnp.array([[4.0, 1.0]]), weights=jnp.array([[0.5, 0.5]]),
      ...                   krylov_dim=jnp.array([2]), grid=jnp.linspace(0.0, 5.0, 3), density=jnp.zeros(3),
      ...                   sigma=jnp.float32(0.1), top_eigenvalues=jnp.array([4.0]), num_hvps=jnp.int32(2))
      >>> float((r.weights * r.ritz_values).sum())  # the probe's v^T H v
      2.5
    """

    ritz_values: jax.Array
    weights: jax.Array
    krylov_dim: jax.Array
    grid: jax.Array
    density: jax.Array
    sigma: jax.Array
    top_eigenvalues: jax.Array
    num_hvps: jax.Array


def _check_count(name: str, value: Any, allow_none: bool = False) -> None:
    """Raises unless ``value`` is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _flat_run(fn, loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array, chunk_size, mesh, linearize):
    """``fn(op, n, dtype, key)`` on the raveled Hessian ``op: (n,) -> (n,)`` (:func:`_on_hessian`, as :func:`_eig` runs a solver)."""
    dtype = _flat_dtype(params)
    return _on_hessian(
        lambda op, flat_p, unravel, key_: fn(op, flat_p.shape[0], dtype, key_),
        lambda p, a, b: loss_fn(p, b),
        params,
        None,
        batch,
        key,
        chunk_size,
        mesh,
        linearize,
    )


def _map_probes(f, num_probes: int, probe_chunk: int | None):
    """``f(i)`` for probes ``i = 0..num_probes-1``: one ``vmap``, or ``probe_chunk`` at a time (``lax.map``)."""
    idx = jnp.arange(num_probes, dtype=jnp.int32)
    if probe_chunk is None or probe_chunk >= num_probes:
        return jax.vmap(f)(idx)
    return lax.map(f, idx, batch_size=None if probe_chunk == 1 else int(probe_chunk))


def _probe(key: jax.Array, i: jax.Array, n: int, dtype) -> jax.Array:
    """Probe ``i``: a Rademacher vector (entries +-1) drawn from ``fold_in(key, i)``."""
    return jax.random.rademacher(jax.random.fold_in(key, i), (n,), dtype)


def trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    *,
    num_probes: int = 32,
    probe_chunk: int | None = None,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    linearize: bool = False,
) -> TraceResult:
    """Hessian trace ``tr H`` by Hutchinson's estimator with Rademacher probes.

    ``E[z^T H z] = tr H`` for any random ``z`` with ``E[z z^T] = I`` (Hutchinson 1989); Rademacher
    entries (+-1) give the smallest variance among such ``z``, ``Var = 2 (||H||_F^2 - sum_i H_ii^2)``
    (Avron & Toledo 2011), and make a diagonal ``H`` exact. PyHessian (Yao et al. 2020) tracks the
    trace this way. Probe ``i`` is ``jax.random.rademacher(jax.random.fold_in(key, i), (n,))`` on the
    raveled params (:func:`density` draws the same ones). One product per probe; the probes are
    vmapped, ``probe_chunk`` at a time (memory: that many tangents at once; a vmapped ``jvp(grad)``
    computes the primal once per chunk). Runs under ``jit`` and ``vmap`` (e.g. over lanes with a
    key per lane): fixed work, no data-dependent control flow.

    Args:
      loss_fn, params, batch, chunk_size, mesh, linearize: as in :func:`top_eigenvalue`.
      key: PRNG key of the probes.
      num_probes: number of probes (static).
      probe_chunk: probes vmapped together (static); None: all at once.

    Returns:
      :class:`TraceResult` (scalars and ``(num_probes,)`` samples).

    Examples:
      A diagonal Hessian ``diag(1, 4)``: every Rademacher probe gives ``z^T H z = 5`` exactly:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> tr = jax.jit(lambda p, b, key: hessian.trace(loss, p, b, key, num_probes=4))
      >>> r = tr(params, x, jax.random.key(0))
      >>> float(r.estimate), float(r.stderr), int(r.num_hvps)
      (5.0, 0.0, 4)
    """
    _check_count("num_probes", num_probes)
    _check_count("probe_chunk", probe_chunk, allow_none=True)

    def hutchinson(op, n, dtype, key_):
        def sample(i):
            z = _probe(key_, i, n, dtype)
            return jnp.dot(z, op(z), precision=lax.Precision.HIGHEST)

        samples = _map_probes(sample, num_probes, probe_chunk)
        stderr = jnp.std(samples, ddof=1) / np.sqrt(num_probes).astype(dtype)
        return TraceResult(jnp.mean(samples), stderr, samples, jnp.asarray(num_probes, jnp.int32))

    return _flat_run(hutchinson, loss_fn, params, batch, key, chunk_size, mesh, linearize)


def smoothed_density(
    nodes: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike,
    grid: jax.typing.ArrayLike | None = None,
    num_points: int = 1000,
    sigma: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(grid, density, sigma)``: Gauss quadratures ``(probes, m)`` smoothed by a Gaussian and averaged over probes.

    The density is ``(1 / probes) sum_p sum_i w_pi N(x; theta_pi, sigma^2)`` (what :func:`density`
    returns; also how a plot redraws stored nodes and weights on a grid of its own). ``sigma``
    None: 1% of the nodes' span; ``grid`` None: ``num_points`` from the smallest to the largest
    node, padded by 5 sigma.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.hessian import smoothed_density
      >>> grid, dens, sigma = smoothed_density(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.5]]))
      >>> round(float(sigma), 4), round(float(jnp.sum(dens) * (grid[1] - grid[0])), 3)
      (0.01, 1.0)
    """
    nodes, weights = jnp.asarray(nodes), jnp.asarray(weights)
    dtype = nodes.dtype
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:  # 1% of the span of the Ritz values (of |hi|, or 1, when that is 0)
        span = jnp.where(hi > lo, hi - lo, jnp.where(hi != 0, jnp.abs(hi), jnp.ones_like(hi)))
        sigma = 0.01 * span
    else:
        sigma = jnp.asarray(sigma, dtype)
    if grid is None:
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=dtype)
    else:
        grid = jnp.asarray(grid, dtype)
    z = (grid[:, None] - nodes.reshape(1, -1)) / sigma
    gauss = jnp.exp(-0.5 * z * z) / (sigma * np.sqrt(2 * np.pi).astype(dtype))
    dens = jnp.dot(gauss, weights.reshape(-1).astype(dtype), precision=lax.Precision.HIGHEST) / nodes.shape[0]
    return grid, dens, sigma


def density(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    *,
    num_probes: int,
    num_steps: int,
    num_points: int = 1000,
    sigma: float | None = None,
    grid: jax.typing.ArrayLike | None = None,
    top_k: int = 1,
    probe_chunk: int | None = None,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    linearize: bool = False,
) -> DensityResult:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature (SLQ).

    The density ``phi(x) = (1/n) sum_j delta(x - lambda_j)`` is the average over unit probes ``v`` of
    their spectral measures ``sum_j (u_j . v)^2 delta(x - lambda_j)`` (``E[v v^T] = I / n``). Each
    probe's measure is replaced by its ``m``-point Gauss quadrature from ``m = min(num_steps, n)``
    Lanczos steps with full reorthogonalization (:func:`eos_jax.eigen.lanczos_quadrature`: nodes =
    Ritz values, weights = squared first components of the tridiagonal's eigenvectors), exact for
    polynomials of degree ``<= 2m - 1``, and smoothed by a Gaussian of width ``sigma`` (Ghorbani,
    Krishnan & Xiao 2019, google/spectral-density; PyHessian, Yao et al. 2020). Probe ``i`` is the
    Rademacher vector of :func:`trace` (same key, same draws) divided by ``sqrt(n)``: unit norm. A
    probe whose Krylov space becomes invariant before ``m`` steps (``m >= n``, repeated eigenvalues)
    keeps only that space's nodes: later rows get weight 0, so the quadrature stays exact. Fixed
    work (``num_probes * m`` products), no data-dependent control flow: runs under ``jit`` and
    ``vmap`` (over lanes with a key per lane; each lane gets its own default grid).

    Args:
      loss_fn, params, batch, chunk_size, mesh, linearize: as in :func:`top_eigenvalue`.
      key: PRNG key of the probes (and of Lanczos restarts after a breakdown).
      num_probes: probes (static).
      num_steps: Lanczos steps per probe (static); capped at the number of parameters.
      num_points: points of the default grid: from the smallest to the largest Ritz value, padded by
        5 sigma on each side. Keep its spacing below ``sigma`` for the density to integrate to ~1.
      sigma: Gaussian width; None: 1% of the span of all Ritz values.
      grid: points where to evaluate the density instead (1-D; ``num_points`` then unused).
      top_k: how many of the largest Ritz values to report (``<= m``).
      probe_chunk: probes vmapped together (static); None: all at once (each holds an ``(m, n)`` basis).

    Returns:
      :class:`DensityResult`.

    Examples:
      ``H = diag(1, 4)``: both Gauss nodes are the eigenvalues, each with weight 1/2:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> slq = jax.jit(lambda p, b, key: hessian.density(loss, p, b, key, num_probes=1, num_steps=2))
      >>> r = slq(params, x, jax.random.key(0))
      >>> [round(t, 4) for t in r.ritz_values[0].tolist()], [round(w, 4) for w in r.weights[0].tolist()]
      ([4.0, 1.0], [0.5, 0.5])
      >>> round(float(r.top_eigenvalues[0]), 4), int(r.num_hvps), r.density.shape
      (4.0, 2, (1000,))
      >>> round(float(jnp.sum(r.density) * (r.grid[1] - r.grid[0])), 3)  # integrates to 1
      1.0
    """
    _check_count("num_probes", num_probes)
    _check_count("num_steps", num_steps)
    _check_count("top_k", top_k)
    _check_count("probe_chunk", probe_chunk, allow_none=True)
    _check_count("num_points", num_points)
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ConfigError(f"sigma must be a positive float or None, got {sigma!r}")
    if grid is not None and jnp.ndim(grid) != 1:
        raise ConfigError(f"grid must be 1-D, got shape {np.shape(grid)}")

    def slq(op, n, dtype, key_):
        if top_k > min(num_steps, n):
            raise ConfigError(f"top_k={top_k} needs num_steps >= top_k and as many parameters; n={n}")

        def one(i):
            v = _probe(key_, i, n, dtype) / np.sqrt(n).astype(dtype)
            return lanczos_quadrature(op, v, jax.random.fold_in(key_, i), num_steps, top_k=top_k)

        q = _map_probes(one, num_probes, probe_chunk)
        g, dens, sig = smoothed_density(q.nodes, q.weights, grid, num_points, sigma)
        n_hvps = jnp.asarray(num_probes * min(num_steps, n), jnp.int32)
        return DensityResult(q.nodes, q.weights, q.krylov_dim, g, dens, sig, jnp.max(q.top, axis=0), n_hvps)

    return _flat_run(slq, loss_fn, params, batch, key, chunk_size, mesh, linearize)


# ----------------------------------------------------------------------------------------------
# Adam's preconditioned sharpness and per-layer sharpness.


def adam_preconditioner(
    nu: PyTree, count: jax.typing.ArrayLike, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> PyTree:
    """Diagonal preconditioner ``P`` of Adam (Cohen et al. 2022, Sec. 2), a pytree like ``nu``.

    Adam's step ``-lr * m_hat / (sqrt(nu_hat) + eps)`` with the bias-corrected moments
    ``m_hat = m / (1 - b1^t)``, ``nu_hat = nu / (1 - b2^t)`` is written ``-lr * P^-1 m`` with the raw
    EMA ``m`` and ``P = (1 - b1^t) * (sqrt(nu_hat) + eps)``: the first moment's bias correction is
    folded into P, as in Cohen et al. (2022); the threshold ``(2 + 2 b1) / (1 - b1)`` refers to the
    EMA ``m``. ``nu`` and ``count`` are those of the optimizer state after ``t = count`` updates
    (optax ``ScaleByAdamState.nu`` / ``.count``), i.e. the preconditioner of the last step taken.

    Args:
      nu: second-moment EMA (pytree).
      count: number of updates taken, ``t >= 1``.
      b1, b2, eps: Adam's hyperparameters (as in ``eos_jax.optim.adam``).

    Returns:
      ``P`` (pytree like ``nu``), positive.

    Examples:
      After one step, ``nu_hat = nu / (1 - b2)`` and ``P = (1 - b1) * sqrt(nu_hat)`` (eps = 0):

      >>> import jax.numpy as jnp
      >>> from eos_jax.hessian import adam_preconditioner
      >>> p = adam_preconditioner({"w": jnp.array([4.0, 1.0])}, 1, b1=0.5, b2=0.75, eps=0.0)
      >>> p["w"].tolist()  # 0.5 * sqrt([16, 4])
      [2.0, 1.0]
    """

    def leaf(x):
        t = jnp.asarray(count).astype(x.dtype)
        one = jnp.ones((), x.dtype)
        nu_hat = x / (one - jnp.asarray(b2, x.dtype) ** t)
        return (one - jnp.asarray(b1, x.dtype) ** t) * (jnp.sqrt(nu_hat) + jnp.asarray(eps, x.dtype))

    return jax.tree_util.tree_map(leaf, nu)


def _reparam_loss(loss_fn: LossFn):
    """Loss of ``u`` at ``params + s * u`` with ``aux = (params, s)``: its Hessian in u is ``S H S``."""

    def loss3(u, aux, batch):
        p0, s = aux
        return loss_fn(jax.tree_util.tree_map(lambda p, si, ui: p + si * ui, p0, s, u), batch)

    return loss3


def preconditioned_top_eigenvalue(
    loss_fn: LossFn, params: PyTree, batch: PyTree, precond: PyTree, **kwargs: Any
) -> EigResult:
    """Preconditioned sharpness ``lambda_max(P^-1 H)`` for a diagonal positive ``P`` (Adam).

    ``P^-1 H`` is similar to the symmetric ``P^-1/2 H P^-1/2``, whose top eigenvalue is computed as
    the Hessian at ``u = 0`` of ``u -> loss(params + P^-1/2 u)`` (an exact linear
    reparametrization). Compare ``lr * eigenvalue`` with ``stability_threshold("adam", beta=b1)``.

    Args:
      loss_fn, params, batch: as in :func:`top_eigenvalue`.
      precond: ``P`` (pytree like params, positive), e.g. from :func:`adam_preconditioner`.
      **kwargs: options of :func:`top_eigenvalue` (method, num_iters, tol, stop, v0, key, ...); a warm
        start ``v0`` lives in the u coordinates (pass the previous result's eigenvector).

    Returns:
      :class:`EigResult` whose eigenvector ``u`` is that of ``P^-1/2 H P^-1/2``; the eigenvector of
      ``P^-1 H`` is ``P^-1/2 u`` (unnormalized).

    Examples:
      With ``H = diag(1, 4)`` and ``P = diag(0.5, 8)``, ``P^-1 H = diag(2, 0.5)``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import hessian
      >>> def loss(params, x):  # a mean over examples: H = 2/N sum_i x_i x_i^T = diag(1, 4)
      ...     return jnp.mean((x @ params["w"]) ** 2)
      >>> params, x = {"w": jnp.array([0.5, -1.0])}, jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> precond = {"w": jnp.array([0.5, 8.0])}
      >>> sharpness = jax.jit(lambda p, b: hessian.preconditioned_top_eigenvalue(
      ...     loss, p, b, precond, method="power", num_iters=20))
      >>> round(float(sharpness(params, x).eigenvalue), 4)
      2.0
    """
    s = jax.tree_util.tree_map(lambda p: 1 / jnp.sqrt(p), precond)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    opts = dict(
        method="lanczos",
        num_iters=20,
        tol=None,
        v0=None,
        key=None,
        chunk_size=None,
        mesh=None,
        linearize=False,
        stop="residual",
    )
    unknown = set(kwargs) - set(opts)
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)}; allowed: {sorted(opts)}")
    opts.update(kwargs)
    v0, key = opts.pop("v0"), opts.pop("key")
    return _eig(_reparam_loss(loss_fn), zeros, (params, s), batch, v0, key, k=None, **opts)


def _block_loss(loss_fn: LossFn, treedef, idx: tuple[int, ...]):
    """Loss of one block of leaves with the other leaves passed as ``aux`` (a full leaf list)."""

    def loss3(block, leaves, batch):
        new = list(leaves)
        for i, x in zip(idx, block):
            new[i] = x
        return loss_fn(jax.tree_util.tree_unflatten(treedef, new), batch)

    return loss3


def layer_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    level: int = 1,
    v0: Mapping[str, PyTree] | None = None,
    **kwargs: Any,
) -> dict[str, EigResult]:
    """Top eigenvalue of each layer's diagonal Hessian block (paper Sec. 5.5: one layer goes unstable).

    Layers are the groups of leaves sharing the first ``level`` keys of their paths, e.g. the
    top-level modules ``{"Dense_0": {"kernel", "bias"}, ...}`` of a flax params dict with level=1.
    The block ``H_ll`` is the Hessian of the loss in that layer's leaves with the others fixed
    (equivalently ``H v`` with ``v`` zero outside the block, restricted to the block).

    Args:
      loss_fn, params, batch: as in :func:`top_eigenvalue`.
      level: path depth that defines a layer.
      v0: optional warm starts, a mapping from layer name (as returned) to a list of that layer's
        leaves (the previous result's ``eigenvector``).
      **kwargs: options of :func:`top_eigenvalue` except v0.

    Returns:
      ``{layer name (jax.tree_util.keystr of its path prefix): EigResult}``, in tree order; each
      eigenvector is the list of that layer's leaves.

    Examples:
      Two layers whose diagonal blocks are ``diag(1, 4)`` and ``diag(1, 4) / 4``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.hessian import layer_sharpness
      >>> def loss(p, x):
      ...     return jnp.mean((x @ p["a"]["w"]) ** 2) + jnp.mean((x @ p["b"]["w"]) ** 2) / 4
      >>> params = {"a": {"w": jnp.array([0.5, -1.0])}, "b": {"w": jnp.array([0.5, -1.0])}}
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> r = jax.jit(lambda p, b: layer_sharpness(loss, p, b, method="power", num_iters=20))(params, x)
      >>> {name: round(float(e.eigenvalue), 4) for name, e in r.items()}
      {"['a']": 4.0, "['b']": 1.0}
    """
    opts = dict(
        method="lanczos", num_iters=20, tol=None, key=None, chunk_size=None, mesh=None, linearize=False, stop="residual"
    )
    unknown = set(kwargs) - set(opts)
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)}; allowed: {sorted(opts)} and v0")
    opts.update(kwargs)
    key = opts.pop("key")
    key = jax.random.key(0) if key is None else key
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out: dict[str, EigResult] = {}
    for g, (name, idx) in enumerate(layer_groups(params, level).items()):
        block = [leaves[i] for i in idx]
        start = None if v0 is None else v0.get(name)
        out[name] = _eig(
            _block_loss(loss_fn, treedef, tuple(idx)),
            block,
            leaves,
            batch,
            start,
            jax.random.fold_in(key, g),
            k=None,
            **opts,
        )
    return out


# ----------------------------------------------------------------------------------------------
# Stability thresholds.


def stability_threshold(kind: str, *, beta: float = 0.0) -> float:
    """Largest stable ``lr * lambda_max`` of an optimizer on a quadratic (Cohen et al. 2021, 2022).

    ``gd``: 2; ``heavy_ball`` (momentum ``beta``): ``2 + 2 beta``; ``nesterov``:
    ``(2 + 2 beta) / (1 + 2 beta)``; ``adam`` (``beta`` = b1, on the preconditioned sharpness of
    :func:`preconditioned_top_eigenvalue`, EMA first moment): ``(2 + 2 beta) / (1 - beta)``
    (38 for b1 = 0.9). ``normalized sharpness / threshold`` crosses 1 at the Edge of Stability.

    Args:
      kind: one of "gd", "heavy_ball", "nesterov", "adam".
      beta: momentum coefficient (b1 for Adam), in [0, 1).

    Returns:
      The threshold as a Python float.

    Examples:
      >>> from eos_jax.hessian import stability_threshold
      >>> stability_threshold("gd"), stability_threshold("heavy_ball", beta=0.5)
      (2.0, 3.0)
      >>> round(stability_threshold("adam", beta=0.9), 6)
      38.0
      >>> stability_threshold("gd", beta=0.9)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: kind='gd' takes no momentum, got beta=0.9
    """
    if kind not in _THRESHOLD_KINDS:
        raise ConfigError(f"kind must be one of {_THRESHOLD_KINDS}, got {kind!r}")
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"beta must be in [0, 1), got {beta!r}")
    if kind == "gd":
        if beta != 0.0:
            raise ConfigError(f"kind='gd' takes no momentum, got beta={beta!r}")
        return 2.0
    if kind == "heavy_ball":
        return 2.0 + 2.0 * beta
    if kind == "nesterov":
        return (2.0 + 2.0 * beta) / (1.0 + 2.0 * beta)
    return (2.0 + 2.0 * beta) / (1.0 - beta)
