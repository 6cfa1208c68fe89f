"""One run over several processes (and hosts): ``jax.distributed`` set-up and host views of global arrays.

With ``jax.distributed.initialize`` the devices of every process form one list
(``jax.devices()``); the engine shards a group's lanes over all of them, so each process
computes its own lanes and XLA's collectives (gloo on CPU) join them. What changes for the
host side of a run:

* values a process did not compute live on other hosts: :func:`to_host` gathers a pytree of
  global arrays into NumPy on every process (a collective: every process calls it, in the
  same order, which the engine's lock-step loop guarantees);
* files are written once: by process 0 (:func:`is_primary`); the others wait at
  :func:`barrier` where they must see what it wrote; orbax checkpoints are the exception,
  every process writing its own shards;
* a batch can be split over processes too: each process loads (or slices out with
  :func:`process_slice`) its own examples and :func:`shard_batch` makes one global array of
  them, sharded over the devices of all processes, for :func:`eos_jax.hessian.data_parallel_hvp`
  and the sharpness solvers with ``mesh=``;
* a process that dies is noticed by the coordination service's heartbeat: the others stop
  with an error within ``heartbeat_s`` seconds instead of waiting in a collective forever.

Settings come from flags (``--coordinator HOST:PORT --num-processes N --process-id I``)
or, when those are absent, from ``EOS_JAX_COORDINATOR``, ``EOS_JAX_NUM_PROCESSES`` and
``EOS_JAX_PROCESS_ID``; with none of them the run is a single process, as before. A
cluster launcher that JAX detects by itself (SLURM, Open MPI, ...) is used with
``--coordinator auto``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from eos_jax import runtime
from eos_jax.errors import ConfigError

__all__ = [
    "DistributedConfig",
    "any_process",
    "barrier",
    "check_joined",
    "initialize",
    "is_primary",
    "join",
    "min_over_processes",
    "process_slice",
    "shard_batch",
    "to_host",
]

ENV = {
    "coordinator": "EOS_JAX_COORDINATOR",
    "num_processes": "EOS_JAX_NUM_PROCESSES",
    "process_id": "EOS_JAX_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where the processes of a run meet.

    Attributes:
      coordinator: ``HOST:PORT`` of process 0's coordination service, ``"auto"`` (a cluster
        launcher JAX detects), or ``None`` (one process).
      num_processes: how many processes join (``None`` with ``auto``).
      process_id: this process's index in ``0 .. num_processes - 1`` (``None`` with ``auto``).
      timeout_s: how long to wait for every process to join.
      heartbeat_s: after how long without a heartbeat a process counts as dead and the
        others stop.

    Examples:
      >>> DistributedConfig.from_values("127.0.0.1:12355", 2, 1).validate()
      >>> DistributedConfig.from_values(None, None, None).single
      True
      >>> DistributedConfig.from_values("127.0.0.1:12355", 2, 2).validate()
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: process_id=2 is not allowed; expected 0 .. 1 for num_processes=2
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 60
    heartbeat_s: int = 10

    @classmethod
    def from_values(
        cls,
        coordinator: str | None,
        num_processes: int | None,
        process_id: int | None,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> DistributedConfig:
        """Flags first, then the ``EOS_JAX_*`` environment variables for those not given."""
        env = os.environ if env is None else env
        vals: dict[str, Any] = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
        for name, var in ENV.items():
            if vals[name] is None and env.get(var):
                raw = env[var]
                if name == "coordinator":
                    vals[name] = raw
                else:
                    try:
                        vals[name] = int(raw)
                    except ValueError:
                        raise ConfigError(f"{var}={raw!r} is not allowed; expected an integer") from None
        return cls(**vals, **kw)

    @property
    def single(self) -> bool:
        """True when no coordinator is set: one process, no ``jax.distributed``."""
        return self.coordinator is None and self.num_processes in (None, 1) and self.process_id in (None, 0)

    def validate(self) -> None:
        """Raises ConfigError naming the first bad setting (the address's form, not whether it answers)."""
        if self.single:
            return
        if self.coordinator is None:
            raise ConfigError(
                f"num_processes={self.num_processes}, process_id={self.process_id} without a coordinator; "
                "expected coordinator=HOST:PORT as well"
            )
        if self.coordinator == "auto":
            return
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(
                f"coordinator={self.coordinator!r} is not allowed; expected HOST:PORT with PORT in 1..65535"
            )
        n, i = self.num_processes, self.process_id
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_processes={n!r} is not allowed; expected an integer >= 1")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ConfigError(f"process_id={i!r} is not allowed; expected 0 .. {n - 1} for num_processes={n}")
        for name in ("timeout_s", "heartbeat_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is not allowed; expected an integer >= 1")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if host in ("0.0.0.0", "[::]") else host, port))
        except OSError:
            return False
    return True


def initialize(cfg: DistributedConfig) -> None:
    """Joins this process to the run's others (nothing for a single process).

    Call it before anything touches a device. On CPU, collectives go through gloo.

    Raises:
      ConfigError: bad settings; process 0's port already in use; nothing answering at the
        coordinator's address within ``timeout_s``; JAX refusing to join.

    Examples:
      >>> initialize(DistributedConfig())  # one process: nothing to join
      >>> initialize(DistributedConfig("127.0.0.1:0", 2, 0))
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: coordinator='127.0.0.1:0' is not allowed; expected HOST:PORT with PORT in 1..65535
    """
    cfg.validate()
    if cfg.single:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator == "auto":
        try:
            jax.distributed.initialize(initialization_timeout=cfg.timeout_s, heartbeat_timeout_seconds=cfg.heartbeat_s)
        except Exception as e:  # noqa: BLE001 - whatever JAX raises becomes one line
            raise ConfigError(f"coordinator='auto': no cluster launcher JAX can read ({_first_line(e)})") from None
        return
    host, _, port = cfg.coordinator.rpartition(":")
    if cfg.process_id == 0 and not _port_free(host, int(port)):
        raise ConfigError(f"coordinator={cfg.coordinator!r}: port {port} is already in use on this host")
    if cfg.process_id != 0 and not _reachable(host, int(port), cfg.timeout_s):
        # JAX's client aborts the process (no Python exception) when it cannot register, so
        # the address is tried here first, for a one-line error instead of a C++ stack trace.
        raise ConfigError(
            f"coordinator={cfg.coordinator!r}: nothing answered within {cfg.timeout_s} s; start process 0 "
            "there first, or check the address"
        )
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=cfg.timeout_s,
            heartbeat_timeout_seconds=cfg.heartbeat_s,
        )
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"coordinator={cfg.coordinator!r}: process {cfg.process_id} of {cfg.num_processes} could not join within "
            f"{cfg.timeout_s} s ({_first_line(e)}); check the address, that every process was started with the same "
            "num_processes, and that process 0 is running"
        ) from None


def check_joined(cfg: DistributedConfig) -> None:
    """Checks that every process that joined was started with the same ``num_processes`` (a collective).

    JAX takes process 0's count and ignores the others', so a process started with another
    count would run (or wait) under a wrong assumption; here every process compares the
    counts all of them declared, and all of them stop with the same one-line error. Call it
    after :func:`initialize` and after the backend is configured (it runs a small program).

    Raises:
      ConfigError: the declared counts differ, or differ from the processes that joined.

    Examples:
      >>> check_joined(DistributedConfig())  # one process: nothing to compare
    """
    if cfg.single or cfg.coordinator == "auto":
        return
    declared = np.asarray(multihost_utils.process_allgather(np.array([cfg.num_processes], np.int64))).ravel()
    if jax.process_count() != cfg.num_processes or np.any(declared != cfg.num_processes):
        counts = ", ".join(f"process {i}: {int(n)}" for i, n in enumerate(declared))
        raise ConfigError(
            f"num_processes={cfg.num_processes} is not what every process was started with ({counts}; "
            f"{jax.process_count()} joined): start every process with the same num_processes"
        )


def join(dist: DistributedConfig) -> None:
    """Prepares this process and joins the others: first thing in a CLI, before anything touches a device.

    Keeps freed host memory (:func:`eos_jax.runtime.retain_host_memory`, which must precede the
    backend's threads) and, with several processes, calls :func:`initialize`. After
    :func:`eos_jax.runtime.configure`, call :func:`check_joined`.

    Raises:
      ConfigError: process 0's port is in use, or the coordinator does not answer in time.

    Examples:
      >>> join(DistributedConfig())  # one process: nobody to join (freed memory kept if no backend started)
    """
    runtime.retain_host_memory()  # before the backend's threads exist (speed only)
    initialize(dist)  # before anything touches a device (runtime.configure reads the devices)


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__).rstrip(".")


def is_primary() -> bool:
    """True in the process that writes files (process 0; a single process always).

    Examples:
      >>> is_primary()
      True
    """
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing for a single process).

    Examples:
      >>> barrier("example")  # one process: returns at once
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@functools.lru_cache(maxsize=16)
def _replicator(mesh: jax.sharding.Mesh) -> Any:
    """One jitted identity whose outputs are replicated on every device of ``mesh``: an all-gather."""
    return jax.jit(lambda leaves: leaves, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def to_host(tree: Any) -> Any:
    """A pytree of (possibly global) arrays as NumPy arrays, the same on every process.

    One process: ``jax.device_get``. Several: the leaves with shards on other processes are
    gathered by one program (a collective every process must call; one per call, not one per
    leaf: gloo collectives cost milliseconds each), replicated ones read locally.

    Examples:
      >>> import jax.numpy as jnp
      >>> to_host({"a": jnp.arange(3)})["a"].tolist()
      [0, 1, 2]
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out: list[Any] = [None] * len(leaves)
    by_mesh: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            out[i] = np.asarray(jax.device_get(x))
        elif x.is_fully_replicated:
            out[i] = np.asarray(x.addressable_data(0))
        elif isinstance(x.sharding, jax.sharding.NamedSharding):
            by_mesh.setdefault(x.sharding.mesh, []).append(i)
        else:
            out[i] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    for mesh, idx in by_mesh.items():
        gathered = _replicator(mesh)([leaves[i] for i in idx])
        for i, g in zip(idx, gathered):
            out[i] = np.asarray(g.addressable_data(0))
    return jax.tree_util.tree_unflatten(treedef, out)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true in any process (a collective with several; the flag itself with one).

    Examples:
      >>> any_process(False), any_process(True)
      (False, True)
    """
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def min_over_processes(value: int) -> int:
    """The smallest of ``value`` over the processes (e.g. a lane width every process can hold).

    Examples:
      >>> min_over_processes(7)
      7
    """
    if jax.process_count() == 1:
        return int(value)
    return int(np.min(multihost_utils.process_allgather(np.array([int(value)], np.int64))))


def _data_axis(mesh: jax.sharding.Mesh, axis: str | None) -> str:
    """The mesh axis a batch is split along: ``axis``, or the mesh's only axis."""
    names = tuple(mesh.axis_names)
    if axis is None:
        if len(names) != 1:
            raise ConfigError(f"mesh has axes {names}; pass axis= one of them to shard the batch along")
        return names[0]
    if axis not in names:
        raise ConfigError(f"axis={axis!r} is not allowed; expected one of the mesh's axes {names}")
    return axis


def _local_positions(mesh: jax.sharding.Mesh, axis: str) -> tuple[int, int]:
    """First position along ``axis`` of this process's devices, and how many positions they hold.

    Raises unless those positions are contiguous (each process then holds one contiguous block of
    the examples).
    """
    devs = np.asarray(mesh.devices)
    along = list(mesh.axis_names).index(axis)
    me = jax.process_index()
    pos = sorted({int(ix[along]) for ix in np.ndindex(devs.shape) if devs[ix].process_index == me})
    if not pos:
        raise ConfigError(f"the mesh has no device of process {me}; expected a mesh over every process's devices")
    if pos != list(range(pos[0], pos[-1] + 1)):
        raise ConfigError(
            f"process {me}'s devices sit at positions {pos} of mesh axis {axis!r}; expected contiguous positions "
            "(order the mesh's devices by process, as jax.devices() and eos_jax.hessian.data_mesh() do)"
        )
    return pos[0], len(pos)


def process_slice(n: int, mesh: jax.sharding.Mesh | None = None, axis: str | None = None) -> slice:
    """This process's contiguous share of a batch of ``n`` examples sharded over ``mesh``.

    ``mesh`` defaults to :func:`eos_jax.hessian.data_mesh` (every process's devices). The examples
    are split into equal blocks, one per position along the mesh's data axis; this process gets the
    blocks of its own devices. Feeding ``batch[process_slice(n, mesh)]`` of every process to
    :func:`shard_batch` rebuilds the full batch, in order, as one global array. No collective.

    Raises:
      ConfigError: ``n`` is not divisible by the devices along the data axis.

    Examples:
      >>> import jax
      >>> from eos_jax.hessian import data_mesh
      >>> mesh = data_mesh(jax.devices()[:1])
      >>> process_slice(6, mesh)  # one process holds everything
      slice(0, 6, None)
    """
    if mesh is None:  # eos_jax.hessian.data_mesh() (a higher layer, not imported here)
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    axis = _data_axis(mesh, axis)
    total = int(mesh.shape[axis])
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or n % total:
        raise ConfigError(
            f"batch size n={n!r} is not allowed; expected a positive multiple of the {total} devices of mesh axis {axis!r}"
        )
    first, count = _local_positions(mesh, axis)
    per = int(n) // total
    return slice(first * per, (first + count) * per)


def shard_batch(local_batch: Any, mesh: jax.sharding.Mesh, axis: str | None = None) -> Any:
    """Global arrays of a batch from each process's own examples, sharded along the mesh's data axis.

    Every process calls it (a collective with several processes: the local sizes are compared)
    with the same ``mesh`` and its own ``local_batch``: a pytree of NumPy or JAX arrays whose
    leading axis holds this process's examples (e.g. ``batch[process_slice(n, mesh)]``). The result
    is a pytree of global ``jax.Array`` (``jax.make_array_from_process_local_data`` with
    ``NamedSharding(mesh, PartitionSpec(axis))``) whose rows are process 0's examples, then
    process 1's, ..., each process's rows split equally over its devices. With one process it is a
    ``device_put`` of the batch onto the mesh. Pass it with ``mesh=mesh`` to
    :func:`eos_jax.hessian.data_parallel_hvp`, :func:`eos_jax.hessian.top_eigenvalue` or
    :func:`eos_jax.hessian.top_eigenvalues`: each device then computes the Hessian of the mean loss
    on its equal shard, and the full batch's Hessian is the mean of those.

    Raises:
      ConfigError: the leaves do not share one leading axis; the local size is not divisible by
        this process's devices on the axis; the number of examples per device differs between
        processes (raised on every process alike).

    Examples:
      >>> import jax, numpy as np
      >>> from eos_jax.hessian import data_mesh
      >>> mesh = data_mesh(jax.devices()[:1])
      >>> x = shard_batch({"x": np.arange(6.0).reshape(3, 2)}, mesh)["x"]
      >>> x.shape, tuple(x.sharding.spec)
      ((3, 2), ('data',))
    """
    axis = _data_axis(mesh, axis)
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree_util.tree_leaves(local_batch)}
    if not sizes or len(sizes) != 1 or -1 in sizes:
        raise ConfigError(
            f"local_batch leaves must share one leading example axis; got leading sizes {sorted(sizes)} "
            "(-1: a scalar leaf)"
        )
    n, (_, d) = sizes.pop(), _local_positions(mesh, axis)
    if jax.process_count() > 1:  # every process sees every size, so all of them raise alike
        got = np.asarray(multihost_utils.process_allgather(np.array([n, d], np.int64))).reshape(-1, 2)
    else:
        got = np.array([[n, d]], np.int64)
    for i, (ni, di) in enumerate(got):
        if ni % di:
            raise ConfigError(
                f"local batch size {int(ni)} of process {i} is not allowed; expected a multiple of its {int(di)} "
                f"devices on mesh axis {axis!r}"
            )
    if len({int(ni) // int(di) for ni, di in got}) > 1:
        sizes_txt = ", ".join(
            f"process {i}: {int(ni)} over {int(di)} device{'s' if di != 1 else ''}" for i, (ni, di) in enumerate(got)
        )
        raise ConfigError(
            f"local batch sizes differ between processes ({sizes_txt}); expected the same number of examples per "
            "device on every process"
        )
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    return jax.make_array_from_process_local_data(sharding, local_batch)
