"""Lane groups sized to memory: one lane's bytes read from the compiled programs, the device's free bytes.

A group of ``W`` lanes runs as one vmapped program on ``D`` devices (``W / D`` lanes each).
XLA's memory analysis of a compiled program gives, per device, the bytes of its arguments,
outputs (less those aliased to arguments) and temporaries. The training data is replicated
on every device and does not grow with the lanes; everything else (parameters, optimizer
state, eigenvector, activations of the vmapped step, per-step metrics) does. So a program
compiled for ``W`` lanes gives the linear model, per device,

    bytes(L lanes on the device) = shared + L * per_lane,
    shared = the bytes of the data arguments,  per_lane = (total(W) - shared) / (W / D),

and the group width is the largest multiple of the device count (and of
``EngineConfig.lane_multiple``) whose ``bytes`` fit in ``lane_memory_fraction`` of the free
memory, at most ``auto_lane_cap``. The programs measured are the training chunk and, when
the run tracks sharpness, the sharpness program (Lanczos keeps its Krylov basis: often the
larger of the two); the larger requirement decides.

Free memory: ``device.memory_stats()`` (``bytes_limit - bytes_in_use``) on accelerators; on
CPU, where JAX reports none, the host's ``MemAvailable`` (``/proc/meminfo``; physical pages
times ``os.sysconf`` elsewhere) shared equally by the process's CPU devices.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax

from eos_jax.errors import ConfigError

__all__ = [
    "AUTO_LANE_BATCH",
    "HOST_TEMP_CEILING",
    "LaneBatchChoice",
    "LaneEstimate",
    "available_bytes",
    "choose_lane_batch",
    "fit_lanes",
    "format_bytes",
    "program_bytes",
    "program_temp_bytes",
]


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1.

    Examples:
      >>> format_bytes(512), format_bytes(3 * 2**20), format_bytes(1.5 * 2**30)
      ('512 B', '3.0 MiB', '1.5 GiB')
    """
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def program_bytes(compiled: Any) -> int:
    """Bytes one device holds while a compiled program runs: arguments + outputs - aliased + temporaries.

    ``compiled`` is a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = jax.jit(lambda x: x @ x.T).lower(jax.ShapeDtypeStruct((100, 50), jnp.float32)).compile()
      >>> program_bytes(c) >= 100 * 50 * 4 + 100 * 100 * 4  # the argument and the output at least
      True
    """
    m = compiled.memory_analysis()
    if m is None:
        raise ConfigError("XLA gave no memory analysis for this backend: set max_lanes by hand")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _host_available() -> tuple[int, str]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free physical pages"


def available_bytes(device: Any) -> tuple[int, str]:
    """Free bytes of ``device`` and where the number came from.

    Accelerators: ``memory_stats()["bytes_limit"] - ["bytes_in_use"]``. CPU devices (no
    memory statistics): the host's available memory divided by the number of this
    process's CPU devices, which share it.

    Examples:
      >>> import jax
      >>> n, source = available_bytes(jax.devices("cpu")[0])
      >>> n > 0, source.startswith(("MemAvailable", "free physical pages"))
      (True, True)
    """
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{device.platform} memory_stats"
    avail, source = _host_available()
    n = max(1, sum(1 for d in jax.local_devices() if d.platform == device.platform))
    if n > 1:
        return avail // n, f"{source} / {n} {device.platform} devices"
    return avail, source


@dataclasses.dataclass(frozen=True)
class LaneEstimate:
    """The memory estimate behind an automatic lane grouping (all byte counts per device).

    Attributes:
      probed_lanes: lanes (with padding) of the group whose programs were compiled and measured.
      devices: devices a group is spread over.
      programs: per measured program its bytes at ``probed_lanes``.
      shared_bytes: the data arguments (replicated; independent of the lanes), for the deciding program.
      per_lane_bytes: bytes each further lane on a device adds, for the deciding program.
      deciding: the program that limits the width.
      available_bytes: free memory of one device, and ``source`` where it came from.
      fraction: the share of it the groups may use.
      fit: lanes (over all devices) that fit; ``width``: the width chosen (the cap, the lane
        count and the multiples applied); ``cap``: the automatic width's upper bound.

    Examples:
      >>> est = fit_lanes({"chunk": (3 * 2**20, 2**20)}, 2, 1, (8 * 2**20, "test"), fraction=0.5, cap=64, num_lanes=9)
      >>> est.per_lane_bytes == 2**20, est.fit, est.width, est.bytes_for(3) == 4 * 2**20
      (True, 3, 3, True)
      >>> est.describe(9, 3)
      'lane groups: 9 lanes in 3 groups of at most 3 (memory); estimate per device: 1.0 MiB per lane + 1.0 MiB shared (chunk), 4.0 MiB for a group of 3 on 1 device; 8.0 MiB free (test), 50% usable: 3 lanes fit'
    """

    probed_lanes: int
    devices: int
    programs: dict[str, int]
    shared_bytes: int
    per_lane_bytes: int
    deciding: str
    available_bytes: int
    source: str
    fraction: float
    fit: int
    width: int
    cap: int

    def bytes_for(self, lanes: int) -> int:
        """Estimated bytes per device of a group of ``lanes`` lanes (spread over the devices)."""
        return self.shared_bytes + math.ceil(lanes / self.devices) * self.per_lane_bytes

    def describe(self, num_lanes: int, num_groups: int) -> str:
        """One line: the grouping and the estimate behind it."""
        dev = f"{self.devices} devices" if self.devices > 1 else "1 device"
        limit = "memory" if self.fit < min(self.cap, num_lanes) else f"at most {self.cap} by default"
        return (
            f"lane groups: {num_lanes} lane{'s' if num_lanes != 1 else ''} in {num_groups} "
            f"group{'s' if num_groups != 1 else ''} of at most {self.width} ({limit}); estimate per device: "
            f"{format_bytes(self.per_lane_bytes)} per lane + {format_bytes(self.shared_bytes)} shared "
            f"({self.deciding}), {format_bytes(self.bytes_for(self.width))} for a group of {self.width} on {dev}; "
            f"{format_bytes(self.available_bytes)} free ({self.source}), {self.fraction:.0%} usable: "
            f"{self.fit} lane{'s' if self.fit != 1 else ''} fit"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fit_lanes(
    programs: dict[str, tuple[int, int]],
    probed_lanes: int,
    devices: int,
    available: tuple[int, str],
    *,
    fraction: float,
    cap: int,
    num_lanes: int,
    multiple: int = 1,
) -> LaneEstimate:
    """The lane estimate from measured programs: ``{name: (total bytes, shared bytes)}`` at ``probed_lanes``.

    The width is the largest multiple of ``lcm(devices, multiple)`` whose estimate fits in
    ``fraction`` of the available bytes, at most ``max(cap, that multiple)`` and not above
    the lanes there are (rounded up to the multiple); at least one multiple, even when
    that does not fit (the run then may fail for memory; the estimate says so).

    Examples:
      >>> est = fit_lanes({"chunk": (1000 + 4 * 250, 1000)}, 4, 1, (10_000, "test"), fraction=0.5,
      ...                 cap=64, num_lanes=100)
      >>> est.per_lane_bytes, est.fit, est.width  # (5000 - 1000) // 250 lanes fit
      (250, 16, 16)
      >>> fit_lanes({"chunk": (2000, 1000)}, 4, 2, (10_000, "test"), fraction=0.5, cap=64, num_lanes=3).width
      4
    """
    step = math.lcm(devices, multiple)
    budget = int(available[0] * fraction)
    per_device_lanes = math.ceil(probed_lanes / devices)
    best = None
    for name, (total, shared) in programs.items():
        per_lane = max(1, math.ceil(max(0, total - shared) / per_device_lanes))
        fit_dev = max(0, (budget - shared) // per_lane)
        if best is None or fit_dev < best[0]:
            best = (fit_dev, name, shared, per_lane)
    assert best is not None
    fit_dev, deciding, shared, per_lane = best
    fit = int(fit_dev * devices)
    want = math.ceil(num_lanes / step) * step
    width = min(fit // step * step, max(cap // step * step, step), want)
    width = max(width, step)
    return LaneEstimate(
        probed_lanes=probed_lanes,
        devices=devices,
        programs={n: t for n, (t, _) in programs.items()},
        shared_bytes=int(shared),
        per_lane_bytes=int(per_lane),
        deciding=deciding,
        available_bytes=int(available[0]),
        source=available[1],
        fraction=fraction,
        fit=fit,
        width=int(width),
        cap=cap,
    )


#: ``EngineConfig.lane_batch`` value that picks the lanes per batch from the compiled programs.
AUTO_LANE_BATCH = "auto"

#: Temporaries one CPU program call may need without faulting fresh pages in: XLA:CPU allocates
#: a program's temporaries at each call and frees them after it, and the heap top that
#: :func:`eos_jax.runtime.retain_host_memory` keeps is at most ``mallopt``'s ``M_TRIM_THRESHOLD``,
#: a C int (2 GiB - 1). Above it glibc hands the freed pages back and the next call faults them in
#: again (measured, the main job's 16-lane sweep at 12,000 images: 0.9-3.6 M faults per chunk).
HOST_TEMP_CEILING = (1 << 31) - 1


def program_temp_bytes(compiled: Any) -> int:
    """The temporaries XLA allocates for one call of a compiled program (per device).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> c = jax.jit(lambda x: jnp.sin(x @ x.T).sum()).lower(jax.ShapeDtypeStruct((100, 50), jnp.float32)).compile()
      >>> program_temp_bytes(c) >= 0
      True
    """
    m = compiled.memory_analysis()
    if m is None:
        raise ConfigError("XLA gave no memory analysis for this backend: set lane_batch by hand")
    return int(m.temp_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class LaneBatchChoice:
    """How ``lane_batch="auto"`` chose the lanes per batch of a group's programs.

    Attributes:
      lane_batch: the choice (``None``: all the group's lanes at once).
      reason: why, in words.
      lanes: lanes of the group on one device.
      temp_bytes: per measured program, its temporaries with all ``lanes`` at once (empty
        when nothing was measured).
      ceiling: the temporaries a call may have (:data:`HOST_TEMP_CEILING`).

    Examples:
      >>> c = choose_lane_batch({"chunk": 3 * 2**30, "sharpness": 2**30}, 16)
      >>> c.lane_batch, c.describe()
      (10, 'lane batch: 10 lanes at a time (auto: 16 lanes need 3.0 GiB of temporaries per call (chunk), more than the 2.0 GiB a CPU call keeps between calls)')
      >>> choose_lane_batch({"chunk": 2**30}, 16).lane_batch is None
      True
    """

    lane_batch: int | None
    reason: str
    lanes: int
    temp_bytes: dict[str, int]
    ceiling: int

    def describe(self) -> str:
        """One line: the choice and its reason."""
        what = (
            "all lanes at once"
            if self.lane_batch is None
            else f"{self.lane_batch} lane{'s' if self.lane_batch != 1 else ''} at a time"
        )
        return f"lane batch: {what} (auto: {self.reason})"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_lane_batch(temp_bytes: dict[str, int], lanes: int, ceiling: int | None = None) -> LaneBatchChoice:
    """``lane_batch="auto"`` on one CPU device, from the temporaries of the all-at-once programs.

    The lanes of a vmapped program need ``lanes`` times one lane's temporaries. When the
    largest program's (``temp_bytes``, measured with all ``lanes`` at once) exceed ``ceiling``
    (``None``: :data:`HOST_TEMP_CEILING`), the lanes run in batches of ``floor(ceiling /
    per-lane temporaries)`` (at least 1), one batch after another
    (:func:`eos_jax.train.step.lane_map`), so that no call faults its memory in again; otherwise
    all at once (``None``), the programs measured. A lane's bits depend on the choice; a
    resumed run keeps the one recorded in its checkpoints.

    Examples:
      >>> choose_lane_batch({"chunk": 16 * 900 * 2**20}, 16).lane_batch  # the main job, 12,000 images
      2
      >>> choose_lane_batch({"chunk": 16 * 3 * 2**30}, 16).lane_batch  # one lane over the ceiling: 1
      1
    """
    ceiling = HOST_TEMP_CEILING if ceiling is None else ceiling
    name, worst = max(temp_bytes.items(), key=lambda kv: kv[1])
    need = f"{lanes} lanes need {format_bytes(worst)} of temporaries per call ({name})"
    if lanes <= 1 or worst <= ceiling:
        return LaneBatchChoice(
            None,
            f"{need}, within the {format_bytes(ceiling)} a CPU call keeps between calls",
            lanes,
            dict(temp_bytes),
            ceiling,
        )
    per_lane = max(1, math.ceil(worst / lanes))
    batch = max(1, min(lanes - 1, ceiling // per_lane))
    return LaneBatchChoice(
        int(batch),
        f"{need}, more than the {format_bytes(ceiling)} a CPU call keeps between calls",
        lanes,
        dict(temp_bytes),
        ceiling,
    )
