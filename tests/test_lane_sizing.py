"""Lane groups sized to memory: the estimate against a measured peak, the grouping it
chooses against the same groups set by hand (bitwise), and a resumed run that keeps its grouping
when the free memory has changed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eos_jax import io as eio
from eos_jax import optim
from eos_jax import train as tr
from eos_jax.errors import ConfigError
from eos_jax.train import core, sizing

REPO = Path(__file__).resolve().parents[1]


def _problem(n: int = 256, d: int = 32, h: int = 64) -> tr.Problem:
    x = jax.random.normal(jax.random.key(0), (n * d,), jnp.float32).reshape(n, d)
    batch = {"x": x, "y": (x[:, :1] > 0).astype(jnp.float32)}

    def init(key):
        return {
            "w1": 0.3 * jax.random.normal(key, (d * h,), jnp.float32).reshape(d, h),
            "w2": jnp.zeros((h, 1), jnp.float32),
        }

    def loss(p, b):
        return jnp.mean(jnp.square(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]))

    return tr.Problem(init, loss, lambda hp: optim.sgd(hp.learning_rate, k=hp.k), batch)


def test_fit_lanes_arithmetic_multiples_cap_and_the_smallest_width():
    # 1000 B shared + 250 B per lane, 5000 B usable: 16 lanes fit.
    est = sizing.fit_lanes(
        {"chunk": (2000, 1000)}, 4, 1, (10_000, "t"), fraction=0.5, cap=64, num_lanes=100, multiple=1
    )
    assert (est.per_lane_bytes, est.shared_bytes, est.fit, est.width) == (250, 1000, 16, 16)
    assert est.bytes_for(16) == 1000 + 16 * 250 <= 5000 < est.bytes_for(17)
    # The larger program decides; widths are multiples of lcm(devices, multiple) = 6.
    est = sizing.fit_lanes(
        {"chunk": (2000, 1000), "sharpness": (3000, 1000)}, 4, 2, (10_000, "t"), fraction=0.5, cap=64,
        num_lanes=100, multiple=3,
    )  # fmt: skip
    assert est.deciding == "sharpness" and est.per_lane_bytes == 1000 and est.fit == 8 and est.width == 6
    # The cap, and the lanes there are, bound it; nothing fits: one multiple anyway.
    assert sizing.fit_lanes({"c": (2000, 1000)}, 4, 1, (1e9, "t"), fraction=1.0, cap=8, num_lanes=100).width == 8
    assert sizing.fit_lanes({"c": (2000, 1000)}, 4, 1, (1e9, "t"), fraction=1.0, cap=64, num_lanes=5).width == 5
    tiny = sizing.fit_lanes({"c": (2000, 1000)}, 4, 1, (100, "t"), fraction=1.0, cap=64, num_lanes=5, multiple=2)
    assert tiny.fit == 0 and tiny.width == 2


def test_memory_sized_groups_equal_the_same_groups_by_hand_bitwise(monkeypatch):
    problem = _problem()
    lanes = tr.make_lanes([0.05, 0.1, 0.2], ks=[1, 3])  # 6 lanes
    cfg = tr.EngineConfig(steps=6, sharpness_every=3, sharpness_iters=3, sharpness_method="power", chunk_steps=3)
    roomy = tr.fit(problem, lanes, 6, config=cfg)
    est = roomy.lane_groups["estimate"]
    assert roomy.groups == (tuple(range(6)),) and est["width"] == 6 and est["probed_lanes"] == 6
    assert set(est["programs"]) == {"chunk", "sharpness"} and est["per_lane_bytes"] > 0
    assert "lane groups: 6 lanes in 1 group of at most 6" in roomy.lane_groups["line"]

    def room(n_lanes):  # free memory for the shared data and n_lanes lanes of the larger program
        return int((est["shared_bytes"] + n_lanes * est["per_lane_bytes"]) / cfg.lane_memory_fraction)

    monkeypatch.setattr(core, "available_bytes", lambda device: (room(2.5), "test"))
    tight = tr.fit(problem, lanes, 6, config=cfg)
    assert tight.groups == ((0, 1), (2, 3), (4, 5)) and tight.lane_groups["estimate"]["fit"] == 2
    assert "(memory)" in tight.lane_groups["line"]
    # Sizing is its own step: its result is the config with the grouping as numbers, which a run
    # takes as given (nothing measured); Plan.build refuses a grouping not yet sized.
    sized = core.size_lanes(problem, lanes, cfg)
    assert (sized.config.max_lanes, sized.config.lane_batch, sized.requested_max_lanes) == (2, None, None)
    with pytest.raises(ConfigError, match="size it first"):
        core.Plan.build(problem, lanes, cfg)
    with pytest.raises(ConfigError, match="give the step count once"):
        tr.fit(problem, lanes, 5, config=cfg)
    by_hand = tr.fit(problem, lanes, config=sized.config)
    assert by_hand.groups == tight.groups and by_hand.lane_groups["estimate"] is None
    for a, b in zip(jax.tree_util.tree_leaves(tight.params), jax.tree_util.tree_leaves(by_hand.params)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert np.array_equal(tight.loss.view(np.uint32), by_hand.loss.view(np.uint32))
    # lane_multiple keeps the k of a learning rate together: room for 5 lanes gives groups of 4.
    paired = sizing.fit_lanes(
        {n: (t, est["shared_bytes"]) for n, t in est["programs"].items()}, 6, 1, (room(5.5), "test"),
        fraction=cfg.lane_memory_fraction, cap=64, num_lanes=6, multiple=2,
    )  # fmt: skip
    assert (paired.fit, paired.width) == (5, 4) and core.group_lanes(6, paired.width) == [[0, 1, 2, 3], [4, 5]]


def test_measuring_compiles_nothing_twice():
    """The programs measured for the estimate are the ones the run calls: sizing to memory costs
    no extra compilation (counted with jax.monitoring; each fit has shapes of its own, so nothing
    comes from another one's cache)."""
    events: list[float] = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    cfg = tr.EngineConfig(steps=2, sharpness_every=2, sharpness_iters=2, sharpness_method="power", chunk_steps=2)
    lanes = tr.make_lanes([0.05, 0.1, 0.2])
    tr.fit(
        _problem(n=32, d=12, h=8), lanes, 2, config=dataclasses.replace(cfg, max_lanes=3)
    )  # the small shared programs
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        auto = tr.fit(_problem(n=40, d=12, h=8), lanes, 2, config=cfg)
        n_auto, events[:] = len(events), []
        by_hand = tr.fit(_problem(n=48, d=12, h=8), lanes, 2, config=dataclasses.replace(cfg, max_lanes=3))
        n_hand = len(events)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert auto.lane_groups["estimate"] is not None and by_hand.lane_groups["estimate"] is None
    assert auto.groups == by_hand.groups == ((0, 1, 2),)
    assert n_auto == n_hand > 0, (n_auto, n_hand)


def test_resume_keeps_the_recorded_grouping_when_memory_changed(tmp_path, monkeypatch, capsys):
    problem = _problem()
    lanes = tr.make_lanes([0.05, 0.1, 0.2, 0.4])
    cfg = tr.EngineConfig(steps=6, sharpness_every=None, chunk_steps=3, checkpoint_every=3)
    est = core.size_lanes(problem, lanes, cfg).estimate
    avail = int((est.shared_bytes + 2.5 * est.per_lane_bytes) / cfg.lane_memory_fraction)
    monkeypatch.setattr(core, "available_bytes", lambda device: (avail, "test"))
    full = eio.open_run_dir(tmp_path / "full", {"t": 1})
    res = tr.train(problem, lanes, cfg, full, quiet=True)
    assert res["lane_groups"]["groups"] == [2, 2] and res["lane_groups"]["width"] == 2
    rec = json.loads((full / "checkpoints" / "lane_groups.json").read_text())
    assert rec["width"] == 2 and rec["estimate"]["available_bytes"] == avail
    # Interrupted after step 3 of every group: keep only the step-3 checkpoints, then resume with
    # plenty of memory, which would now put all four lanes in one group.
    part = eio.open_run_dir(tmp_path / "part", {"t": 1})
    tr.train(problem, lanes, dataclasses.replace(cfg, steps=3), part, quiet=True)
    monkeypatch.setattr(core, "available_bytes", lambda device: (10 * avail, "test"))
    assert core.size_lanes(problem, lanes, cfg).config.max_lanes == 4
    capsys.readouterr()
    res2 = tr.train(problem, lanes, cfg, part, resume=True, progress_stream=sys.stdout)
    out = capsys.readouterr().out
    assert "lane groups: 4 lanes in 2 groups of at most 2 (max_lanes=2)" in out, out
    assert res2["lane_groups"]["groups"] == [2, 2]
    assert [l["params_digest"] for l in res2["lanes"]] == [l["params_digest"] for l in res["lanes"]]


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from eos_jax import optim, train as tr
    from eos_jax.train import core

    n, d, h = 4096, 256, 1024
    x = jax.random.normal(jax.random.key(0), (n * d,), jnp.float32).reshape(n, d)
    batch = {"x": x, "y": (x[:, :1] > 0).astype(jnp.float32)}
    init = lambda key: {"w1": 0.05 * jax.random.normal(key, (d * h,), jnp.float32).reshape(d, h),
                        "w2": jnp.zeros((h, 1), jnp.float32)}
    loss = lambda p, b: jnp.mean(jnp.square(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]))
    problem = tr.Problem(init, loss, lambda hp: optim.sgd(hp.learning_rate, k=hp.k), batch)
    lanes = tr.make_lanes([0.01 * (i + 1) for i in range(6)])
    sizing = core.size_lanes(problem, lanes, tr.EngineConfig(steps=2, sharpness_every=None, chunk_steps=2))
    plan = core.Plan.build(problem, lanes, sizing.config, sizing=sizing)
    est = sizing.estimate
    gi = plan.inputs(0)
    state = jax.block_until_ready(plan.init_fn(gi.hp))
    resident = core.tree_bytes(state) + core.tree_bytes(plan.data)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    rss0 = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    out = jax.block_until_ready(plan.chunk_fn(state, gi.hp, plan.data, jnp.int32(2), gi.twin))
    peak = status("VmHWM:")
    print(json.dumps({"estimate": est.programs["chunk"], "measured": peak - rss0 + resident,
                      "width": est.width, "probed": est.probed_lanes}))
    """
)


@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_estimate_is_within_a_factor_of_two_of_the_measured_peak(tmp_path):
    """XLA's memory analysis of the chunk program against the process's peak resident memory while
    it runs (arguments already resident + the rise of the peak during the call), for a program of
    ~0.3 GB: the estimate must be within a factor of 2 of the measurement (the README states it)."""
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    # Large blocks come from fresh mmap'd pages, so the peak sees them (not reused heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["width"] == got["probed"] == 6
    ratio = got["estimate"] / got["measured"]
    assert 0.5 <= ratio <= 2.0, got
    assert got["estimate"] > 200 * 2**20, got  # large enough that the process's own noise is small


def test_choose_lane_batch_rule():
    """lane_batch="auto": all at once while the largest program's temporaries fit under the ceiling
    a CPU call keeps between calls, else as many lanes as fit (at least one)."""
    c = sizing.HOST_TEMP_CEILING
    assert c == 2**31 - 1  # mallopt's M_TRIM_THRESHOLD is a C int (eos_jax.runtime.retain_host_memory)
    assert sizing.choose_lane_batch({"chunk": c}, 16).lane_batch is None  # at the ceiling: all at once
    assert sizing.choose_lane_batch({"chunk": c + 1}, 16).lane_batch == 15
    gib = 2**30
    # The main job's 16-lane sweep at 12,000 images: ~0.86 GiB of temporaries per lane -> 2 at a time.
    assert sizing.choose_lane_batch({"chunk": int(16 * 0.86 * gib)}, 16).lane_batch == 2
    # The larger program decides, and its name is in the reason.
    both = sizing.choose_lane_batch({"chunk": 3 * gib, "sharpness": 6 * gib}, 6)
    assert both.lane_batch == 1 and "(sharpness)" in both.reason and "6.0 GiB" in both.reason
    assert both.describe().startswith("lane batch: 1 lane at a time (auto: 6 lanes need 6.0 GiB")
    assert sizing.choose_lane_batch({"chunk": 100 * gib}, 1).lane_batch is None  # one lane: nothing to batch
    assert sizing.choose_lane_batch({"chunk": 100 * gib}, 4, ceiling=50 * gib).lane_batch == 2


def test_auto_lane_batch_equals_the_same_batch_by_hand_and_resumes_with_its_choice(tmp_path, monkeypatch, capsys):
    """With a ceiling below the all-at-once temporaries, "auto" trains 2 lanes at a time: bitwise the
    run with lane_batch=2 by hand (the same programs), recorded in lane_groups.json. A run
    interrupted at step 3 and resumed after the ceiling went up (auto would now pick all at once)
    keeps its recorded batch and ends bitwise equal to the uninterrupted run."""
    problem = _problem()
    lanes = tr.make_lanes([0.05, 0.1, 0.2], ks=[1, 3])  # 6 lanes, one group
    cfg = tr.EngineConfig(steps=6, sharpness_every=3, sharpness_iters=3, sharpness_method="power", chunk_steps=3)
    assert cfg.lane_batch == "auto"
    probe = core.size_lanes(problem, lanes, cfg).lane_batch_choice
    assert probe.lane_batch is None and set(probe.temp_bytes) == {"chunk", "sharpness"} and probe.lanes == 6
    worst = max(probe.temp_bytes.values())
    monkeypatch.setattr(sizing, "HOST_TEMP_CEILING", int(2.5 * worst / 6))
    full = eio.open_run_dir(tmp_path / "full", {"t": 1})
    capsys.readouterr()
    res = tr.train(problem, lanes, cfg, full, progress_stream=sys.stdout)
    assert "lane batch: 2 lanes at a time (auto: 6 lanes need" in capsys.readouterr().out
    rec = json.loads((full / "checkpoints" / "lane_groups.json").read_text())
    assert rec["lane_batch"] == 2 and rec["lane_batch_auto"]["lane_batch"] == 2
    assert res["lane_groups"]["lane_batch"] == 2
    by_hand = tr.train(
        problem,
        lanes,
        dataclasses.replace(cfg, lane_batch=2),
        eio.open_run_dir(tmp_path / "hand", {"t": 1}),
        quiet=True,
    )
    digests = [l["params_digest"] for l in res["lanes"]]
    assert [l["params_digest"] for l in by_hand["lanes"]] == digests
    assert by_hand["lane_groups"]["lane_batch_auto"] is None
    part = eio.open_run_dir(tmp_path / "part", {"t": 1})
    tr.train(problem, lanes, dataclasses.replace(cfg, steps=3), part, quiet=True)
    monkeypatch.setattr(sizing, "HOST_TEMP_CEILING", 10 * worst)
    assert core.size_lanes(problem, lanes, cfg).config.lane_batch is None  # what a fresh run would pick now
    res2 = tr.train(problem, lanes, cfg, part, resume=True, quiet=True)
    assert res2["lane_groups"]["lane_batch"] == 2
    assert [l["params_digest"] for l in res2["lanes"]] == digests
