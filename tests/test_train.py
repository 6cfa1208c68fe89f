"""Training engine: scan vs Python loop, chunk-length independence, divergent lanes, sharpness,
checkpoints (corruption fallback), and kill/SIGTERM-and-resume bitwise equality in subprocesses."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, assert_tree_equal_bits
from jax.flatten_util import ravel_pytree
from train_fixtures import TOY_CONFIG, TOY_LRS, toy_loss, toy_problem

from eos_jax import optim
from eos_jax import train as tr
from eos_jax.checkpoint import CheckpointStore, CorruptCheckpointWarning
from eos_jax.errors import ConfigError
from eos_jax.metrics import tree_digest
from eos_jax.train.memory import series_from_lines
from eos_jax.train.stats import lane_series, lane_summary

REPO = Path(__file__).resolve().parents[1]
FIXTURE_SCRIPT = Path(__file__).resolve().parent / "train_fixtures.py"


def _dense_top_eig(objective, params, batch, v0, key):
    """Stand-in eigensolver for tests: dense Hessian + eigh (exact, tiny nets only)."""
    del v0, key
    flat, unravel = ravel_pytree(params)
    hess = jax.hessian(lambda f: objective(unravel(f), batch))(flat)
    w, vecs = jnp.linalg.eigh(hess)
    return w[-1], unravel(vecs[:, -1])


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The uninterrupted toy run with TOY_CONFIG (the reference for resume tests)."""
    out = tmp_path_factory.mktemp("baseline")
    res = tr.train(toy_problem(), tr.make_lanes(list(TOY_LRS)), TOY_CONFIG, out, quiet=True)
    return out, res


# ----------------------------------------------------------------------------- pure pieces


def test_make_lanes_product_and_errors():
    lanes = tr.make_lanes([0.1, 0.2], ks=[1, 3], seeds=[0], weight_decays=[0.0, 1e-3])
    assert len(lanes) == 8 and lanes[0] == tr.Lane(0.1, 1, 0, 0.0) and lanes[-1] == tr.Lane(0.2, 3, 0, 1e-3)
    for bad, match in [
        (dict(learning_rates=[-1.0]), "learning rate -1.0"),
        (dict(learning_rates=[float("nan")]), "learning rate nan"),
        (dict(learning_rates=[0.1], ks=[0]), "k=0"),
        (dict(learning_rates=[0.1], seeds=[-2]), "seed -2"),
        (dict(learning_rates=[0.1], weight_decays=[-1e-4]), "weight decay"),
        (dict(learning_rates=[0.1, 0.1]), "duplicates"),
        (dict(learning_rates=[]), "empty"),
    ]:
        with pytest.raises(ConfigError, match=match):
            tr.make_lanes(**bad)
    with pytest.raises(ConfigError, match="steps=0"):
        tr.EngineConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="sharpness_method"):
        tr.EngineConfig(steps=1, sharpness_method="qr").validate()


def _lane(tree, i: int):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


_TOY = toy_problem()
# One compiled init for the init-seed tests (5 lanes each, so they share it).
_VINIT = jax.jit(jax.vmap(lambda h: tr.init_state(_TOY, h)))


def _init_states(lanes):
    """Step-0 states of ``lanes`` as one vmapped program (like with like: every lane in the same program)."""
    hp = tr.stack_hparams(lanes)
    return hp, _VINIT(hp)


def test_init_seed_fixes_the_parameters_and_seed_the_batch_order():
    # Three batch orders from one initialization (Table 1 of the paper), next to a lane of seed 7
    # and no init seed, whose init key is fold_in(fold_in(key(0), 7), 0) as well, and one of init seed 8.
    lanes = tr.make_lanes([0.1], seeds=[0, 1, 2], init_seeds=7) + [tr.Lane(0.1, seed=7), tr.Lane(0.1, init_seed=8)]
    seeds = [(l.seed, l.init_seed, l.used_init_seed) for l in lanes]
    assert seeds == [(0, 7, 7), (1, 7, 7), (2, 7, 7), (7, None, 7), (0, 8, 8)]
    hp, state = _init_states(lanes)
    assert hp.init_seed.tolist() == [7, 7, 7, 7, 8] and hp.seed.tolist() == [0, 1, 2, 7, 0]
    for i in range(1, 4):
        assert_tree_equal_bits(_lane(state, i).params, _lane(state, 0).params)
    # Another init seed, another initialization: all 20 random weights differ (b1 starts at zero).
    a, b = (np.asarray(ravel_pytree(_lane(state, i).params)[0]) for i in (0, 4))
    assert a.size == 24 and int(np.sum(a != b)) == 20
    # The data keys (batch order) stay the seed's: lanes 0 and 4 (seed 0) share the order of epoch 0,
    # the four seeds 0, 1, 2, 7 have four different ones.
    order = jax.jit(jax.vmap(lambda key: tr.step.select_batch(_TOY.data, key, jnp.int32(0), 24)["x"][:, 0]))
    firsts = np.asarray(order(state.key))
    assert np.array_equal(firsts[0], firsts[4])
    for i in range(4):
        for j in range(i):
            assert not np.array_equal(firsts[i], firsts[j]), (i, j)


def test_init_seed_none_keeps_the_bits_of_runs_made_before_it():
    # Lanes without init seed, with init_seed == seed, and HParams built positionally without the
    # field (as every caller did before it existed): the whole step-0 state is bitwise the same.
    lrs = [0.05, 0.1, 0.2, 0.3, 0.4]
    lanes = tr.make_lanes(lrs, seeds=3)
    assert all(l.init_seed is None for l in lanes)
    hp, state = _init_states(lanes)
    _, state_explicit = _init_states(tr.make_lanes(lrs, seeds=3, init_seeds=3))
    old = tr.HParams(hp.learning_rate, hp.k, hp.weight_decay, hp.seed)
    assert old.init_seed is None
    assert_tree_equal_bits(state_explicit, state)
    assert_tree_equal_bits(_VINIT(old), state)
    # ... and the key tree of the module docstring: init key fold_in(fold_in(key(0), 3), 0).
    ref = jax.jit(lambda: _TOY.init_params(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 3), 0)))()
    assert_tree_equal_bits(_lane(state, 1).params, ref)


def test_init_seed_twins_and_errors():
    lanes = [tr.Lane(0.1, 1, 0), tr.Lane(0.1, 3, 0, init_seed=5), tr.Lane(0.1, 1, 0, init_seed=5), tr.Lane(0.1, 3, 0)]
    twins = tr.core.find_twins(lanes, [[0, 1, 2, 3]])
    assert [t["lane"] for t in twins] == [0, 2, 2, 0]  # the twin shares the init seed, not just the seed
    alone = tr.core.find_twins([tr.Lane(0.1, 1, 0, init_seed=4), tr.Lane(0.1, 3, 0, init_seed=5)], [[0, 1]])
    assert alone[1]["lane"] is None and "init seed" in alone[1]["missing"]
    # Lane(seed=2) and Lane(seed=2, init_seed=2) start alike and are twins.
    assert tr.core.find_twins([tr.Lane(0.1, 1, 2, init_seed=2), tr.Lane(0.1, 3, 2)], [[0, 1]])[1]["lane"] == 0
    assert tr.Lane(0.1, seed=2).asdict()["init_seed"] == 2
    assert len(tr.make_lanes([0.1], seeds=[0, 1], init_seeds=[3, 4], ks=[1, 3])) == 8
    for bad in (-1, 2**31, 1.5, "3", True, None, [0, -2]):
        arg = [bad] if bad is None else bad
        with pytest.raises(ConfigError) as err:
            tr.make_lanes([0.1], init_seeds=arg)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("init seed ") and "[0, 2147483647]" in msg, msg
    assert "init seed -2 " in _error(lambda: tr.make_lanes([0.1], init_seeds=[0, -2]))
    with pytest.raises(ConfigError, match="init seed: empty list"):
        tr.make_lanes([0.1], init_seeds=[])


def _error(fn) -> str:
    with pytest.raises(ConfigError) as err:
        fn()
    return str(err.value)


def test_group_lanes_respects_max_and_devices():
    assert tr.core.group_lanes(5, 2) == [[0, 1], [2, 3], [4]]
    assert tr.core.group_lanes(10, 6, num_devices=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_minibatch_selection_is_a_pure_function_of_key_and_step():
    data = {"x": jnp.arange(10, dtype=jnp.float32)[:, None], "y": jnp.arange(10, dtype=jnp.int32)}
    key = jax.random.key_data(jax.random.key(3))
    seen = [np.asarray(tr.step.select_batch(data, key, jnp.int32(s), 3)["y"]) for s in range(6)]
    # Epoch 0 = steps 0..2 (one remainder example dropped): 9 distinct examples.
    assert len(set(np.concatenate(seen[:3]).tolist())) == 9
    again = np.asarray(jax.jit(tr.step.select_batch, static_argnums=3)(data, key, jnp.int32(4), 3)["y"])
    np.testing.assert_array_equal(again, seen[4])
    assert tr.step.select_batch(data, key, jnp.int32(0), None) is data


def test_sharpness_key_is_not_the_batch_order_key_when_step_equals_epoch():
    """One batch per epoch, so epoch == step: the eigensolver key the engine hands to eig_fn at step t
    must not reproduce the batch order of epoch t (without the stream tags both would be
    fold_in(data key, t))."""
    n = 64
    data = {"i": jnp.arange(n, dtype=jnp.int32)}

    def perm_of_key(objective, params, batch, v0, key):  # the "eigenvalue" is the permutation its key draws
        del objective, params, batch
        return jax.random.permutation(key, n).astype(jnp.int32), v0

    prob = tr.Problem(
        lambda key: {"w": jnp.zeros((2,), jnp.float32)},
        lambda p, b: jnp.sum(p["w"]),
        lambda hp: optim.sgd(hp.learning_rate),
        data,
        eig_fn=perm_of_key,
    )
    hp = tr.stack_hparams(tr.make_lanes([0.1], seeds=[0, 7]))
    state0 = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)
    sharp = tr.make_sharpness_fn(prob, perm_of_key)
    order_of = jax.jit(
        jax.vmap(lambda key, t: tr.step.select_batch(data, key, t, n)["i"], in_axes=(0, None))
    )  # epoch t
    keys_of = jax.jit(
        jax.vmap(
            lambda key, t: (
                jax.random.key_data(tr.state.sharpness_key(key, t)),
                jax.random.key_data(jax.random.fold_in(tr.state.batch_order_key(key), t)),
            ),
            in_axes=(0, None),
        )
    )
    for t in (0, 3):
        state = state0._replace(step=jnp.full((2,), t, jnp.int32))
        _, perms = sharp(state, hp, data)
        orders = order_of(state.key, jnp.int32(t))
        for lane in range(2):
            assert not np.array_equal(np.asarray(perms[lane]), np.asarray(orders[lane])), (t, lane)
        sk, bk = keys_of(state.key, jnp.int32(t))  # the two streams' keys themselves
        for lane in range(2):
            assert not np.array_equal(np.asarray(sk[lane]), np.asarray(bk[lane])), (t, lane)


def test_scan_chunks_equal_python_loop_bitwise():
    """K steps inside one lax.scan == K calls of the jitted step (both lane-vmapped), bit for bit."""
    prob = toy_problem()
    hp = tr.stack_hparams(tr.make_lanes([0.05, 0.3], ks=[1, 3]))
    init = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)
    step = jax.jit(jax.vmap(tr.make_train_step(prob), in_axes=(0, 0, None)))
    state, losses = init, []
    for _ in range(12):
        state, met = step(state, hp, prob.data)
        losses.append(np.asarray(met["loss"]))
    chunk = tr.make_chunk_fn(prob, None, chunk_steps=8)
    s2, m1 = chunk(init, hp, prob.data, jnp.int32(8))
    s2, m2 = chunk(s2, hp, prob.data, jnp.int32(4))  # a partial chunk: iterations 4..7 skipped
    assert int(s2.step[0]) == 12
    # The step itself does not touch the chunk's bookkeeping (loss statistics, RelL1 buffer).
    engine_only = dict(loss_stats=state.loss_stats, rel_buf=state.rel_buf, rel_count=state.rel_count)
    assert_tree_equal_bits(state, s2._replace(**engine_only), "scan chunks vs Python loop")
    scanned = np.concatenate([np.asarray(m1["loss"]), np.asarray(m2["loss"])[:, :4]], axis=1)
    np.testing.assert_array_equal(np.stack(losses, axis=1), scanned)


def test_lane_batch_runs_the_same_lanes_deterministically():
    """lane_batch trains a sweep's lanes a few at a time inside one program. The lanes are the
    same functions of their hyperparameters: lane_batch=1 agrees with each lane run alone (the
    vectorized program of one lane) to float32 rounding (training chunk and warm-started
    sharpness), lane_batch=2 (3 lanes: a remainder batch) with lane_batch=1 (training chunk), and
    the same lane_batch twice is bitwise equal. No
    bitwise promise across lane_batch values: XLA compiles a loop body apart from the same code
    at top level (measured here: parameters equal, eigenvectors up to 10 ulps apart). The main
    job's CNN (2 layers: a cheaper compile) on small random images."""
    from experiments import eos

    rs = np.random.RandomState(0)
    x, y = rs.rand(16, 8, 8, 1).astype(np.float32), rs.randint(0, 2, 16).astype(np.int32)
    # PyTorch's init: at these rates the N(0, 1) kernels' lanes are past the edge, where 3 steps amplify
    # rounding differences beyond float32 rounding (what this test compares is the plumbing, not the dynamics).
    cfg = eos.default_config("cnn", layers=2, lr=(5.0,), num_examples=None, conv_impl="shifted", init="pytorch")
    prob, _ = eos.build_problem(cfg, {"x": x, "y": y, "num_classes": 2})
    lrs = [1.0, 5.0, 20.0]
    init = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))
    eig = tr.make_eig_fn(20, "lanczos", 1e-3)
    n = jnp.int32(3)
    fns = {
        b: (tr.make_chunk_fn(prob, None, chunk_steps=3, lane_batch=b), tr.make_sharpness_fn(prob, eig, lane_batch=b))
        for b in (None, 1, 2)
    }  # built once: each compiles once (None: one lane; lane_batch=2: the chunk only)

    def sweep(hp, lane_batch):
        chunk, sharp = fns[lane_batch]
        s, _ = chunk(init(hp), hp, prob.data, n)
        return sharp(s, hp, prob.data)

    hp_all = tr.stack_hparams(tr.make_lanes(lrs))
    s1, lam1 = sweep(hp_all, 1)
    again, lam_again = sweep(hp_all, 1)
    assert_tree_equal_bits((s1, lam1), (again, lam_again), "lane_batch=1 twice")
    for i, lr in enumerate(lrs):
        alone, lam_alone = sweep(tr.stack_hparams(tr.make_lanes([lr])), None)
        lane = jax.tree_util.tree_map(lambda a, i=i: a[i : i + 1], s1)
        assert_tree_allclose(lane.params, alone.params, rtol=1e-6, atol=1e-8, msg=f"lane {i} params")
        np.testing.assert_allclose(np.asarray(lam1)[i : i + 1], np.asarray(lam_alone), rtol=1e-5)
    s2, _ = fns[2][0](init(hp_all), hp_all, prob.data, n)  # the training chunk, 2 lanes then 1
    assert_tree_allclose(s2.params, s1.params, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="lane_batch=0"):
        tr.EngineConfig(steps=1, lane_batch=0).validate()


def test_step_matches_optax_reference():
    """One lane of the engine equals a hand-written optax loop (k=1, wd=0: plain GD)."""
    prob = toy_problem()
    hp = tr.stack_hparams(tr.make_lanes([0.1]))
    state = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    s, _ = tr.make_chunk_fn(prob, None, 5)(state, hp, prob.data, jnp.int32(5))

    @jax.jit
    def ref_step(p):
        g = jax.grad(toy_loss)(p, prob.data)
        return jax.tree_util.tree_map(lambda a, b: a - jnp.float32(0.1) * b, p, g)

    for _ in range(5):
        params = ref_step(params)
    assert_tree_allclose(jax.tree_util.tree_map(lambda a: a[0], s.params), params, rtol=1e-6, atol=1e-7)


_W0 = np.array([0.7, -1.3, 2.9, 0.05, -0.61, 1.7], np.float64)
_C = np.array([0.3, 1.1, -0.77, 2.3, 0.013, -5.1], np.float64)


def _linear64_problem() -> tr.Problem:
    """loss = sum(c * w) in float64: its gradient is c exactly, so the update is the optimizer's alone."""
    return tr.Problem(
        lambda key: {"w": jnp.asarray(_W0)},
        lambda p, b: jnp.sum(b["c"][0] * p["w"]),
        lambda hp: optim.sgd(hp.learning_rate, k=hp.k),
        {"c": jnp.asarray(_C)[None, :]},
        name="lin64",
    )


def test_float64_parameters_get_the_float64_learning_rate(tmp_path):
    """A float64 step with lr = 0.1, k = 3 equals NumPy's float64 -(fl(lr/3) * fl(3 c)) added to w, bit for bit:
    lr is float64(0.1), not float64(float32(0.1))."""
    cfg = tr.EngineConfig(steps=2, chunk_steps=2, sharpness_every=None, checkpoint_every=None)
    res = tr.train(_linear64_problem(), tr.make_lanes([0.1], ks=[3]), cfg, tmp_path, quiet=True)
    lr, k = np.float64(0.1), np.float64(3)
    w = _W0.copy()
    for _ in range(2):
        w = w + (-((lr / k) * (k * _C)))
    w32 = _W0.copy()  # what float32-rounded hyperparameters give: the test can tell them apart
    for _ in range(2):
        w32 = w32 + (-((np.float64(np.float32(0.1)) / k) * (k * _C)))
    assert int(np.sum(w32 != w)) > 0
    assert res["lanes"][0]["params_digest"] == tree_digest({"w": w})
    # Hyperparameters of another dtype than the parameters are refused, not rounded silently.
    hp32 = tr.stack_hparams(tr.make_lanes([0.1]), np.float32)
    with pytest.raises(ConfigError, match="float32.*float64"):
        tr.init_state(_linear64_problem(), jax.tree_util.tree_map(lambda a: a[0], hp32))


# ----------------------------------------------------------------------------- whole runs


def test_chunk_length_and_checkpoint_schedule_do_not_change_bits(baseline, tmp_path):
    """Final digests and metrics.jsonl are identical for chunk lengths 1, 7 and 10 (CPU); the
    parameters' bits are the same without sharpness tracking (the estimates never feed the step)."""
    base_dir, base = baseline
    digests = [l["params_digest"] for l in base["lanes"]]
    for i, (cs, ce) in enumerate([(7, None), (1, 45)]):
        cfg = dataclasses.replace(TOY_CONFIG, chunk_steps=cs, checkpoint_every=ce)
        out = tmp_path / f"r{i}"
        res = tr.train(toy_problem(), tr.make_lanes(list(TOY_LRS)), cfg, out, quiet=True)
        assert [l["params_digest"] for l in res["lanes"]] == digests, (cs, ce)
        assert (out / "metrics.jsonl").read_bytes() == (base_dir / "metrics.jsonl").read_bytes(), (cs, ce)
    assert TOY_CONFIG.sharpness_every
    cfg = dataclasses.replace(TOY_CONFIG, sharpness_every=None)
    res = tr.train(toy_problem(), tr.make_lanes(list(TOY_LRS)), cfg, tmp_path / "untracked", quiet=True)
    assert [l["params_digest"] for l in res["lanes"]] == digests


@pytest.mark.slow
def test_minibatch_sgd_resumable_schedule_and_sharpness_subset(tmp_path):
    """Minibatch SGD (per-epoch permutations from the lane key): chunk length does not change bits,
    and sharpness on a fixed subset of examples is tracked."""
    cfg = tr.EngineConfig(
        steps=30,
        batch_size=5,
        chunk_steps=10,
        sharpness_every=15,
        sharpness_iters=4,
        sharpness_method="power",
        sharpness_examples=8,
        checkpoint_every=None,
    )
    prob = toy_problem(n=23)  # 4 minibatches per epoch, 3 examples dropped each epoch
    lanes = tr.make_lanes([0.1], seeds=[0, 1])
    a = tr.train(prob, lanes, cfg, tmp_path / "a", quiet=True)
    b = tr.train(prob, lanes, dataclasses.replace(cfg, chunk_steps=4), tmp_path / "b", quiet=True)
    assert [l["params_digest"] for l in a["lanes"]] == [l["params_digest"] for l in b["lanes"]]
    assert a["lanes"][0]["params_digest"] != a["lanes"][1]["params_digest"]  # seeds differ
    lines = _lines(tmp_path / "a")
    assert sorted({r["step"] for r in lines if "sharpness" in r}) == [0, 15, 30]
    # The logged loss of step t is the minibatch loss of step t.
    hp = tr.stack_hparams(lanes)
    state = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)
    batch0 = tr.step.select_batch(prob.data, state.key[0], jnp.int32(0), 5)
    ref = float(jax.jit(toy_loss)(jax.tree_util.tree_map(lambda x: x[0], state.params), batch0))
    assert lines[0]["loss"] == pytest.approx(ref, rel=1e-6)  # a lone lane vs a vmapped one: not bitwise


def test_run_files_metrics_and_sharpness(baseline):
    out, res = baseline
    assert {"metrics.jsonl", "results.json", "checkpoints"} <= set(os.listdir(out))
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    lines = _lines(out)
    steps = TOY_CONFIG.steps
    # one line per step and lane, plus the final evaluation at step == steps
    assert len(lines) == len(TOY_LRS) * (steps + 1)
    sharp = [r for r in lines if "sharpness" in r]
    assert sorted({r["step"] for r in sharp}) == list(range(0, steps + 1, TOY_CONFIG.sharpness_every))
    for r in sharp:
        assert r["normalized_sharpness"] == pytest.approx(r["learning_rate"] * r["sharpness"], rel=1e-12)
        assert r["threshold_ratio"] == pytest.approx(r["normalized_sharpness"] / 2.0, rel=1e-12)
    # checkpoints every 30 steps, the newest 3 kept
    assert CheckpointStore(out / "checkpoints" / "group_000").all_steps() == [60, 90, 120]
    for lane in res["lanes"]:
        assert lane["finite"] and lane["steps"] == steps and len(lane["params_digest"]) == 64
        assert lane["init_seed"] == lane["seed"] == 0  # no init seed given: the seed's initialization
    assert all(r["init_seed"] == r["seed"] == 0 for r in lines)


def test_tracked_sharpness_matches_dense_hessian():
    """Warm-started Lanczos (the default eigensolver) vs eigh of the dense Hessian of loss + wd/2 |p|^2."""
    prob = toy_problem()
    lanes = tr.make_lanes([0.05, 0.3], weight_decays=[0.0, 0.01])
    hp = tr.stack_hparams(lanes)
    state = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)
    state, _ = tr.make_chunk_fn(prob, None, 30)(state, hp, prob.data, jnp.int32(30))
    sharp = tr.make_sharpness_fn(prob, tr.make_eig_fn(num_iters=24, method="lanczos"))  # 24 = #params: the whole space
    new_state, lam = sharp(state, hp, prob.data)
    for i, lane in enumerate(lanes):
        p = jax.tree_util.tree_map(lambda a: a[i], state.params)
        flat, unravel = ravel_pytree(p)
        h = jax.jit(jax.hessian(lambda f, b: toy_loss(unravel(f), b)))(flat, prob.data).astype(jnp.float64)
        h = h + lane.weight_decay * jnp.eye(h.shape[0], dtype=jnp.float64)
        top = float(jnp.linalg.eigvalsh(h)[-1])
        assert float(lam[i]) == pytest.approx(top, rel=2e-5), lane
        vec = ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], new_state.eigvec))[0].astype(jnp.float64)
        assert float(jnp.linalg.norm(h @ vec - top * vec)) < 1e-3 * top


def test_divergent_lanes_are_flagged_frozen_and_do_not_disturb_the_others(tmp_path):
    stable, unstable = [0.05, 0.3], [30.0, 60.0]
    cfg = tr.EngineConfig(steps=60, chunk_steps=20, sharpness_every=None, checkpoint_every=None)
    prob = toy_problem(eig_fn=_dense_top_eig)
    res = tr.train(prob, tr.make_lanes(stable + unstable), cfg, tmp_path / "all", quiet=True)
    ref = tr.train(prob, tr.make_lanes(stable), cfg, tmp_path / "stable", quiet=True)
    by_lr = {l["learning_rate"]: l for l in res["lanes"]}
    # Reference: a plain loop of the same 4-lane vmapped step (bitwise equal to the scan, see above).
    hp = tr.stack_hparams(tr.make_lanes(stable + unstable))
    s = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)
    step = jax.jit(jax.vmap(tr.make_train_step(prob), in_axes=(0, 0, None)))
    first: dict[int, int] = {}
    frozen: dict[int, dict] = {}
    for t in range(60):
        before = jax.device_get(s.params)
        s, _ = step(s, hp, prob.data)
        for i in range(4):
            if i not in first and not bool(s.finite[i]):
                first[i] = t
                frozen[i] = jax.tree_util.tree_map(lambda a: np.asarray(a)[i], before)
    assert sorted(first) == [2, 3]
    for i, lr in zip((2, 3), unstable):
        lane = by_lr[lr]
        assert not lane["finite"] and lane["first_nonfinite_step"] == first[i] > 0
        assert lane["params_digest"] == tree_digest(frozen[i])  # frozen at its last finite state
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(frozen[i]))
    # The stable lanes are finite and agree with a sweep of only them (vmapped width differs: tolerance).
    for lane, r in zip([by_lr[lr] for lr in stable], ref["lanes"]):
        assert lane["finite"] and r["finite"]
        assert lane["final_loss"] == pytest.approx(r["final_loss"], rel=1e-5)
    final = {}
    for name, n in (("all", 4), ("stable", 2)):
        hp_n = tr.stack_hparams(tr.make_lanes((stable + unstable)[:n]))
        template = jax.eval_shape(jax.vmap(lambda h: tr.init_state(prob, h)), hp_n)
        step_n, final[name] = CheckpointStore(tmp_path / name / "checkpoints" / "group_000").restore_latest(template)
        assert step_n == 60
    for i in range(2):
        assert_tree_allclose(
            jax.tree_util.tree_map(lambda a: np.asarray(a)[i], final["all"].params),
            jax.tree_util.tree_map(lambda a: np.asarray(a)[i], final["stable"].params),
            rtol=1e-5,
            atol=1e-6,
        )
    summ = res["summary"]
    assert summ["num_finite"] == 2 and {d["learning_rate"] for d in summ["diverged"]} == set(unstable)
    assert np.isfinite(summ["final_loss_min"]) and np.isfinite(summ["final_loss_max"])
    json.loads((tmp_path / "all" / "results.json").read_text())  # strict JSON: no NaN literals


# ----------------------------------------------------------------------------- checkpoints


# orbax's asyncio machinery prints "Event loop is closed" from a callback after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_roundtrip_and_corruption_fallback(tmp_path):
    prob = toy_problem()
    hp = tr.stack_hparams(tr.make_lanes([0.1, 0.2]))
    init = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))
    template = jax.eval_shape(init, hp)
    store = CheckpointStore(tmp_path / "ck")
    states = {}
    state = init(hp)
    for s in (1, 2, 3):
        state = state._replace(step=state.step + 1, params=jax.tree_util.tree_map(lambda a: a * 2, state.params))
        states[s] = state
        store.save(s, state)
    store.wait()
    assert store.all_steps() == [1, 2, 3]
    step, got = store.restore_latest(template)
    assert step == 3
    assert_tree_equal_bits(got, states[3])
    # Garble every data file of step 3 (same length): orbax may decode it, the digest must not match.
    for f in (tmp_path / "ck" / "3").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(bytes(b ^ 0x5A for b in f.read_bytes()))
    # Truncate the data files of step 2 (a torn write).
    for f in (tmp_path / "ck" / "2").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    # A half-written save (orbax's temporary directory) must be ignored.
    (tmp_path / "ck" / "4.orbax-checkpoint-tmp-0").mkdir()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step, got = store.restore_latest(template)
    assert step == 1
    assert_tree_equal_bits(got, states[1])
    msgs = [str(x.message) for x in w if issubclass(x.category, CorruptCheckpointWarning)]
    assert len(msgs) == 2 and "step 3" in msgs[0] and "step 2" in msgs[1]
    assert store.all_steps() == [1]
    store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_skips_a_corrupted_latest_checkpoint(baseline, tmp_path):
    """A finished run whose final checkpoint is garbled resumes from the previous one, same bits."""
    import shutil

    base_dir, base = baseline
    out = tmp_path / "run"
    shutil.copytree(base_dir, out)
    (out / "results.json").unlink()
    for f in (out / "checkpoints" / "group_000" / "120").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(f.read_bytes()[:7])
    with pytest.warns(CorruptCheckpointWarning, match="step 120"):
        res = tr.train(toy_problem(), tr.make_lanes(list(TOY_LRS)), TOY_CONFIG, out, resume=True, quiet=True)
    assert [l["params_digest"] for l in res["lanes"]] == [l["params_digest"] for l in base["lanes"]]
    assert (out / "metrics.jsonl").read_bytes() == (base_dir / "metrics.jsonl").read_bytes()
    # results.json comes from the History: the resumed run's first part from its metrics lines, the
    # rest from memory; every lane record and the summary equal the uninterrupted run's.
    assert res["lanes"] == base["lanes"] and res["summary"] == base["summary"]


def _tree_bytes(d: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under ``d``, by relative path."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_resume_with_another_grouping_or_model_is_an_error_and_moves_nothing(baseline, tmp_path):
    """Checkpoints written with 2 lanes per group, resumed with max_lanes=1 (or another lane_batch, or another model):
    one-line CheckpointMismatchError naming the group and what differs; no checkpoint is declared
    corrupt or moved, nothing under the run directory changes."""
    import shutil

    from eos_jax.errors import CheckpointMismatchError

    base_dir, _ = baseline
    out = tmp_path / "run"
    shutil.copytree(base_dir, out)
    (out / "results.json").unlink()
    before = _tree_bytes(out)
    lanes = tr.make_lanes(list(TOY_LRS))

    def wider_init(key):  # another model: hidden width 5 instead of 4
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (3, 5), jnp.float32),
            "b1": jnp.zeros((5,), jnp.float32),
            "w2": jax.random.normal(k2, (5, 2), jnp.float32),
        }

    cases = [
        (
            toy_problem(),
            dataclasses.replace(TOY_CONFIG, max_lanes=1),
            [
                "checkpoints/group_000",
                "holds 2 lanes",
                "put 1 there",
                "max_lanes=1",
                "same max_lanes and number of devices",
            ],
        ),
        (
            dataclasses.replace(toy_problem(), init_params=wider_init),
            TOY_CONFIG,
            ["checkpoints/group_000", "another model", "(2, 4) float32", "(2, 5) float32"],
        ),
        (  # the same groups, trained another number of lanes at a time (another lane's bits)
            toy_problem(),
            dataclasses.replace(TOY_CONFIG, lane_batch=1),
            ["lane_batch=None", "lane_batch=1", "resume with the lane_batch that started it"],
        ),
        (  # another model AND another grouping: the model is named (the lane count alone would not
            # resume it); before, the leading axis of the first array was read as the lane count.
            dataclasses.replace(toy_problem(), init_params=wider_init),
            dataclasses.replace(TOY_CONFIG, max_lanes=1),
            ["checkpoints/group_000", "another model"],
        ),
    ]
    for prob, cfg, needles in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CorruptCheckpointWarning)  # no "corrupt" fallback either
            with pytest.raises(CheckpointMismatchError) as e:
                tr.train(prob, lanes, cfg, out, resume=True, quiet=True)
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg
        assert _tree_bytes(out) == before


# ----------------------------------------------------------------------------- subprocesses


def _spawn(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(FIXTURE_SCRIPT), str(out), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, newer_than: int = 0, timeout: float = 120.0) -> int:
    """Polls until a committed checkpoint step > newer_than exists; returns it."""
    ck = out / "checkpoints" / "group_000"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ck.is_dir():
            steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()]
            if steps and max(steps) > newer_than:
                return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"child ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.subprocess
def test_sigterm_then_sigkill_then_resume_is_bitwise_equal(baseline, tmp_path):
    """SIGTERM (checkpoint, exit) -> resume -> SIGKILL mid-run -> resume: same bits as uninterrupted."""
    base_dir, base = baseline
    out = tmp_path / "run"
    p = _spawn(out, "--sleep", "0.15")
    _wait_for_checkpoint(out, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 3 and "interrupted at" in stdout, stderr[-2000:]
    stopped_at = int(stdout.split("interrupted at")[1].split()[0])
    assert stopped_at < TOY_CONFIG.steps
    p = _spawn(out, "--resume", "--sleep", "0.15")
    _wait_for_checkpoint(out, p, newer_than=stopped_at)
    p.kill()  # SIGKILL: no handler runs
    p.wait(timeout=60)
    assert not (out / "results.json").exists()
    p = _spawn(out, "--resume")
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert [l["params_digest"] for l in res["lanes"]] == [l["params_digest"] for l in base["lanes"]]
    assert (out / "metrics.jsonl").read_bytes() == (base_dir / "metrics.jsonl").read_bytes()


_MULTI_DEVICE_SCRIPT = r"""
import dataclasses, json, os, sys, tempfile
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from eos_jax import runtime
runtime.configure()
import jax
from train_fixtures import TOY_CONFIG, toy_problem, tr
assert len(jax.devices()) == 4, jax.devices()
lanes = tr.make_lanes([0.05, 0.1, 0.3], seeds=[0, 1])  # 6 lanes: groups of 4 and 2 (+2 padding lanes)
cfg = tr.EngineConfig(steps=40, chunk_steps=10, sharpness_every=20, sharpness_iters=6, sharpness_method="power",
                      checkpoint_every=20, max_lanes=4)
out = {}
# Four devices: groups of 4 and 2 (+2 padding lanes), one program. The one-device reference runs
# groups of 2 (one program too: groups of 4 and 2 would be two), compared to float tolerance anyway.
for name, devs, max_lanes in (("four", jax.devices(), 4), ("one", jax.devices()[:1], 2)):
    res = tr.train(toy_problem(), lanes, dataclasses.replace(cfg, max_lanes=max_lanes), tempfile.mkdtemp(),
                   quiet=True, devices=devs)
    out[name] = res["lanes"]
    out[name + "_auto"] = res["lane_groups"]["lane_batch_auto"]
print(json.dumps(out))
"""


@pytest.mark.subprocess
def test_lanes_sharded_over_four_devices_match_one_device():
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["four"]) == len(out["one"]) == 6
    # lane_batch="auto": several devices keep their lanes at once without measuring; one CPU device
    # measures its programs (the toy's temporaries are far below the 2 GiB ceiling).
    assert out["four_auto"]["lane_batch"] is None and out["four_auto"]["reason"] == "4 devices: all at once"
    assert out["four_auto"]["temp_bytes"] == {}
    assert out["one_auto"]["lane_batch"] is None and set(out["one_auto"]["temp_bytes"]) == {"chunk", "sharpness"}
    for a, b in zip(out["four"], out["one"]):
        assert (a["learning_rate"], a["seed"]) == (b["learning_rate"], b["seed"])
        assert a["finite"] and b["finite"] and a["steps"] == b["steps"] == 40
        # Different vmapped widths per program: equal to float tolerance, not bitwise.
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
        assert a["final_sharpness"] == pytest.approx(b["final_sharpness"], rel=1e-4)


def test_progress_bar_plain_lines_rate_limited_and_quiet():
    import io

    from eos_jax.progress import ProgressBar

    buf = io.StringIO()
    bar = ProgressBar(100, stream=buf, min_interval=3600.0, label="toy ")
    bar.update(10, 0.5, 1.25)
    bar.update(20, 0.4, 1.5)  # within min_interval on a non-terminal: not printed
    bar.update(100, 0.3, float("nan"))  # the last step always is
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in buf.getvalue()
    assert lines[0].startswith("toy [##") and "step 10/100" in lines[0] and "loss 0.5" in lines[0]
    assert "sharpness 1.25" in lines[0] and "sharpness nan" in lines[1] and "step 100/100" in lines[1]
    quiet = io.StringIO()
    q = ProgressBar(100, enabled=False, stream=quiet)
    q.update(100, 0.1, 0.2)
    q.message("hello")
    assert quiet.getvalue() == ""


def test_perturbed_lanes_are_compared_to_their_k1_twin(tmp_path):
    """results.json: k=2, 4 lanes are bitwise their k=1 twin (Table 5); k=3 differs, with RelL1 and ulps."""
    cfg = dataclasses.replace(TOY_CONFIG, steps=40, sharpness_every=None, checkpoint_every=None)
    res = tr.train(toy_problem(), tr.make_lanes([0.3], ks=[1, 2, 3, 4]), cfg, tmp_path, quiet=True)
    by_k = {lane["k"]: lane for lane in res["lanes"]}
    assert "rel_l1_to_k1" not in by_k[1]
    for k in (2, 4):
        assert by_k[k]["params_digest"] == by_k[1]["params_digest"]
        assert (by_k[k]["rel_l1_to_k1"], by_k[k]["n_diff_to_k1"], by_k[k]["max_ulp_to_k1"]) == (0.0, 0, 0)
    assert by_k[3]["params_digest"] != by_k[1]["params_digest"]
    assert by_k[3]["n_diff_to_k1"] > 0 and by_k[3]["max_ulp_to_k1"] > 0 and by_k[3]["rel_l1_to_k1"] > 0


# ----------------------------------------------------------------------------- RelL1 series, every-step stats


def _rel_series(lines: list[dict], lane: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rs = sorted((r for r in lines if r["lane"] == lane), key=lambda r: r["step"])
    return (
        np.array([r["step"] for r in rs]),
        np.array([r["rel_l1_to_k1"] for r in rs]),
        np.array([r[f"rel_l1_to_k1_ma{tr.stats.REL_L1_WINDOW}"] for r in rs]),
    )


def test_rel_l1_series_to_the_k1_twin_every_step(tmp_path):
    """metrics.jsonl: RelL1 to the k=1 twin (same vmapped program) at every step: exactly 0 for k=2, 4
    (the perturbation is exact), nonzero for k=3; the 100-step moving average equals a NumPy trailing
    mean of the raw series; the series does not depend on the chunk length (bitwise)."""
    cfg = dataclasses.replace(TOY_CONFIG, steps=130, sharpness_every=None, checkpoint_every=None)
    lanes = tr.make_lanes([0.3], ks=[1, 2, 3, 4])
    res = tr.train(toy_problem(), lanes, cfg, tmp_path / "a", quiet=True)
    lines = _lines(tmp_path / "a")
    assert not any("rel_l1_to_k1" in r for r in lines if r["k"] == 1)
    for k in (2, 4):
        steps, raw, ma = _rel_series(lines, k - 1)
        assert list(steps) == list(range(131))
        assert np.array_equal(raw, np.zeros_like(raw)) and np.array_equal(ma, np.zeros_like(ma)), k
    steps, raw, ma = _rel_series(lines, 2)  # k = 3
    assert raw[0] == 0.0 and raw[-1] > 0 and int(np.argmax(raw > 0)) > 0
    # NumPy reference of the trailing mean over min(t + 1, 100) values (float32 sums in the engine:
    # a relative tolerance, not a bitwise claim).
    ref = np.array(
        [raw[max(0, t - tr.stats.REL_L1_WINDOW + 1) : t + 1].astype(np.float64).mean() for t in range(len(raw))]
    )
    np.testing.assert_allclose(ma, ref, rtol=1e-5, atol=0)
    assert ma[-1] != pytest.approx(raw[-1], rel=1e-3)  # the average is not the last value
    # The end-of-run RelL1 of results.json is the last point of the series.
    k3 = next(l for l in res["lanes"] if l["k"] == 3)
    assert k3["rel_l1_to_k1"] == pytest.approx(raw[-1], rel=1e-6)
    # Chunk-length independence, bit for bit (the whole metrics file).
    tr.train(toy_problem(), lanes, dataclasses.replace(cfg, chunk_steps=7), tmp_path / "b", quiet=True)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()


def test_twin_in_another_lane_group_is_flagged_not_compared(tmp_path):
    """A k=3 lane whose k=1 twin ran in another vmapped program gets no RelL1, and a field says why."""
    cfg = dataclasses.replace(TOY_CONFIG, steps=6, sharpness_every=None, checkpoint_every=None, max_lanes=3)
    lanes = tr.make_lanes([0.1, 0.3], ks=[1, 3])  # groups [0, 1, 2] and [3]: lane 3's twin (2) is in group 0
    res = tr.train(toy_problem(), lanes, cfg, tmp_path, quiet=True)
    by = {l["lane"]: l for l in res["lanes"]}
    assert "rel_l1_to_k1" in by[1] and "rel_l1_to_k1_missing" not in by[1]
    assert "rel_l1_to_k1" not in by[3] and "different widths (3 vs 1 lanes)" in by[3]["rel_l1_to_k1_missing"]
    lines = _lines(tmp_path)
    assert all("rel_l1_to_k1" in r for r in lines if r["lane"] == 1)
    assert not any("rel_l1_to_k1" in r for r in lines if r["lane"] == 3)
    twins = tr.core.find_twins(lanes, tr.core.group_lanes(4, 3))
    assert [t["in_group"] for t in twins] == [False, True, False, False] and twins[3]["lane"] == 2
    lone = tr.core.find_twins(tr.make_lanes([0.1], ks=[3]), [[0]])
    assert "no k=1 lane" in lone[0]["missing"]
    # fit() runs the same two programs (compiled once, in train above): lane 1's RelL1 series is train's bit
    # for bit and grows from 0; lane 3 gets NaN and train's reason.
    hist = tr.fit(toy_problem(), lanes, cfg.steps, config=cfg)
    assert hist.groups == ((0, 1, 2), (3,))
    assert np.isnan(hist.rel_l1[[0, 2, 3]]).all() and hist.rel_l1[1, 0] == 0 and hist.rel_l1[1, -1] > 0
    assert "different widths (3 vs 1 lanes)" in hist.lane_summaries[3]["rel_l1_to_k1_missing"]
    assert np.isnan(hist.sharpness).all()  # sharpness_every=None
    _assert_fit_is_train(hist, lines, res)


def _zigzag_problem() -> tr.Problem:
    """1-D GD with a period-2 orbit: f(x) = x^2/2 (x > 0), x^2/4 (x < 0); lr 3 maps 1 -> -2 -> 1.

    The loss alternates 0.5, 1.0, 0.5, ... exactly: a 100 % rise every other step.
    """
    from eos_jax import optim

    def loss(p, batch):
        x = p["x"][0]
        return jnp.where(x > 0, 0.5 * x * x, 0.25 * x * x) + 0.0 * jnp.sum(batch["d"])

    return tr.Problem(
        lambda key: {"x": jnp.ones((1,), jnp.float32)},
        loss,
        lambda hp: optim.sgd(hp.learning_rate, k=hp.k, weight_decay=hp.weight_decay),
        {"d": jnp.zeros((2, 1), jnp.float32)},
        name="zigzag",
    )


def test_period_two_oscillation_is_seen_with_log_every_2(tmp_path):
    """log_every=2 logs only the low points of a period-2 oscillation; the verdict still sees every step."""
    cfg = tr.EngineConfig(steps=20, chunk_steps=6, log_every=2, sharpness_every=None, checkpoint_every=None)
    res = tr.train(_zigzag_problem(), tr.make_lanes([3.0]), cfg, tmp_path, quiet=True)
    lines = _lines(tmp_path)
    assert [r["loss"] for r in lines] == [0.5] * 11  # the logged steps alone look perfectly flat
    logged = lane_series(series_from_lines(lines), 0)
    assert lane_summary(logged, 2.0)["num_loss_increases_1pct"] == 0  # what the logged lines would say
    lane = res["lanes"][0]
    # Steps 0..20 (20 the final evaluation): rises 0 -> 1, 2 -> 3, ..., 18 -> 19: ten of them, each +100 %.
    assert lane["num_loss_increases_1pct"] == 10 and lane["max_rel_loss_increase"] == 1.0
    assert lane["num_loss_increases_1pct_late"] == 9  # late: the earlier step >= 20 // 10 = 2
    assert lane["loss_stats_from"] == "every step"
    ref = tr.stats.loss_stats_reference([0.5, 1.0] * 10 + [0.5], [True] * 21, late_from=2)
    assert {k: lane[k] for k in ref} == ref


def test_every_step_loss_stats_match_numpy(tmp_path):
    """The in-scan statistics of a real toy run equal a NumPy recomputation from every step's loss."""
    cfg = tr.EngineConfig(steps=40, chunk_steps=9, log_every=1, sharpness_every=None, checkpoint_every=None)
    res = tr.train(toy_problem(), tr.make_lanes([0.05, 2.5]), cfg, tmp_path, quiet=True)
    lines = _lines(tmp_path)
    for lane in res["lanes"]:
        rs = sorted((r for r in lines if r["lane"] == lane["lane"]), key=lambda r: r["step"])
        ref = tr.stats.loss_stats_reference([r["loss"] for r in rs], [r["finite"] for r in rs], late_from=4)
        assert {k: lane[k] for k in ref} == ref, lane["learning_rate"]
    assert res["lanes"][1]["num_loss_increases_1pct"] > 0  # lr 2.5 oscillates: the test can fail


# ----------------------------------------------------------------------------- fit (in memory)


def _from_lines(lines: list[dict], key: str, step: np.ndarray, num_lanes: int) -> np.ndarray:
    """``(lanes, logged steps)`` float64 array of ``key`` from metrics lines, NaN where absent."""
    pos = {int(s): t for t, s in enumerate(step)}
    out = np.full((num_lanes, len(step)), np.nan)
    for r in lines:
        if r.get(key) is not None:
            out[r["lane"], pos[r["step"]]] = r[key]
    return out


def _assert_fit_is_train(hist: tr.History, lines: list[dict], res: dict) -> None:
    """fit's series are train's metrics lines bit for bit, its final parameters and lane records train's."""
    np.testing.assert_array_equal(hist.step, sorted({r["step"] for r in lines}))
    n = len(hist.lanes)
    # train's values are the engine's float32 widened to float64 in JSON (exact): cast back, compare bits.
    for key, arr in [
        ("loss", hist.loss),
        ("sharpness", hist.sharpness),
        ("rel_l1_to_k1", hist.rel_l1),
        (f"rel_l1_to_k1_ma{tr.stats.REL_L1_WINDOW}", hist.rel_l1_ma),
        ("normalized_sharpness", hist.normalized_sharpness),
    ]:
        ref = _from_lines(lines, key, hist.step, n).astype(arr.dtype)
        assert arr.shape == ref.shape and np.array_equal(arr.view(np.uint8), ref.view(np.uint8)), key
    np.testing.assert_array_equal(hist.finite, _from_lines(lines, "finite", hist.step, n).astype(bool))
    for i in range(n):
        assert tree_digest(jax.tree_util.tree_map(lambda a: a[i], hist.params)) == res["lanes"][i]["params_digest"]
    assert list(hist.lane_summaries) == res["lanes"] and hist.summary == res["summary"]


def test_fit_equals_train_bitwise_and_touches_nothing(baseline, tmp_path, monkeypatch):
    """fit() with the baseline's problem, lanes and config gives train()'s losses, sharpness and final
    parameters bit for bit, installs no signal handler and writes nothing into the working directory."""
    base_dir, res = baseline
    monkeypatch.chdir(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    installed = []
    monkeypatch.setattr(signal, "signal", lambda *a: installed.append(a))
    hist = tr.fit(toy_problem(), tr.make_lanes(list(TOY_LRS)), TOY_CONFIG.steps, config=TOY_CONFIG)
    monkeypatch.undo()
    assert installed == [] and {s: signal.getsignal(s) for s in before} == before
    assert os.listdir(tmp_path) == []
    assert hist.loss.shape == (2, TOY_CONFIG.steps + 1) and hist.loss.dtype == np.float32
    assert np.isfinite(hist.sharpness).sum() == 2 * 7  # steps 0, 20, .., 120
    assert np.isnan(hist.rel_l1).all()  # k=1 lanes have no twin
    _assert_fit_is_train(hist, _lines(base_dir), res)


def test_fit_refuses_a_bad_step_count():
    with pytest.raises(ConfigError, match="steps=0"):
        tr.fit(toy_problem(), tr.make_lanes([0.1]), 0)


def test_step_metrics_hook_reaches_history_and_metrics_lines(tmp_path):
    """Problem.step_metrics: every step's values at the parameters before the update, in History.aux
    (fit) and in the 'aux' field of metrics.jsonl (train), equal to a recomputation from the loss series'
    own iterates (the non-linear PDE's Table 3 quantities use this hook)."""

    def step_metrics(params, batch):
        return {"w1_sq": jnp.sum(jnp.square(params["w1"])), "out": jnp.mean(batch["x"] @ params["w1"], axis=0)[:2]}

    prob = dataclasses.replace(toy_problem(), step_metrics=step_metrics)
    lanes = tr.make_lanes([0.05, 0.3])
    cfg = dataclasses.replace(TOY_CONFIG, steps=5, chunk_steps=2, sharpness_every=None, checkpoint_every=None)
    hist = tr.fit(prob, lanes, 5, config=cfg)
    assert hist.aux["w1_sq"].shape == (2, 6) and hist.aux["out"].shape == (2, 6, 2)
    # Recompute from the lanes' own iterates: plain GD (k=1) from the same init, one jitted step.
    init = jax.jit(lambda h: tr.init_state(prob, h))
    step = jax.jit(tr.make_train_step(prob))
    hp = tr.stack_hparams(lanes, jnp.float32)
    for i in range(2):
        h = jax.tree_util.tree_map(lambda a: a[i], hp)
        st = init(h)
        for t in range(6):
            want = jax.jit(step_metrics)(st.params, prob.data)
            assert float(hist.aux["w1_sq"][i, t]) == pytest.approx(float(want["w1_sq"]), rel=1e-6)
            np.testing.assert_allclose(hist.aux["out"][i, t], np.asarray(want["out"]), rtol=1e-5, atol=1e-7)
            st, _ = step(st, h, prob.data)
    res_dir = tmp_path / "run"
    tr.train(prob, lanes, cfg, res_dir, quiet=True)
    lines = tr.read_metrics(res_dir / "metrics.jsonl")
    got = np.array([[r["aux"]["w1_sq"] for r in lines if r["lane"] == i] for i in range(2)], np.float32)
    assert np.array_equal(got, hist.aux["w1_sq"])  # train and fit: the same programs, the same bits
    assert all(len(r["aux"]["out"]) == 2 for r in lines)


def test_alternating_sharpness_schedule_sees_both_phases_of_a_period2_orbit():
    """GD at lr 2.5 on f(w) = log cosh(w) + 0.2 w settles into a period-2 orbit whose two points have
    lr * f''(w) = 2.132 and 0.965 (closed form: f'' = 1 - tanh^2). Sampled every 20 steps, the plain
    schedule sees one phase only; the alternating one (0, 21, 40, 61, ...) sees both, the high one included.
    Training bits do not depend on the schedule."""
    import math

    def loss(p, b):
        return jnp.sum(jnp.log(jnp.cosh(p["w"])) + b["c"][0] * p["w"])

    problem = tr.Problem(
        lambda key: {"w": jnp.full((1,), 0.01, jnp.float32)},
        loss,
        lambda hp: optim.sgd(hp.learning_rate, k=hp.k),
        {"c": jnp.array([0.2], jnp.float32)},
    )
    w = 0.01  # the orbit in float64
    for _ in range(400):
        w -= 2.5 * (math.tanh(w) + 0.2)
    orbit = sorted(2.5 * (1 - math.tanh(x) ** 2) for x in (w, w - 2.5 * (math.tanh(w) + 0.2)))
    assert orbit == pytest.approx([0.965, 2.132], abs=1e-3)
    runs = {}
    for alternate in (False, True):
        cfg = tr.EngineConfig(steps=400, sharpness_every=20, sharpness_iters=1, sharpness_alternate=alternate)
        h = tr.fit(problem, tr.make_lanes([2.5]), 400, config=cfg)
        late = [(int(s), float(v)) for s, v in zip(h.step, h.normalized_sharpness[0]) if s >= 200 and not math.isnan(v)]
        runs[alternate] = (late, h.params["w"])
    plain, alt = runs[False][0], runs[True][0]
    assert [s for s, _ in plain][:4] == [200, 220, 240, 260] and [s for s, _ in alt][:4] == [200, 221, 240, 261]
    assert max(v for _, v in plain) - min(v for _, v in plain) < 1e-3  # one phase only
    assert {round(v, 2) for _, v in alt} == {round(orbit[0], 2), round(orbit[1], 2)}  # both phases
    assert max(v for _, v in alt) == pytest.approx(orbit[1], abs=1e-3)  # the high one included
    assert np.array_equal(runs[False][1], runs[True][1])


def test_loss_goal_freezes_a_lane_and_ends_the_group_when_all_have_stopped():
    """Cohen et al.'s stopping rule on 0.5 w^T diag(1, 4) w from w = (1, 1): at lr 0.25 the loss is 2.5, 0.28125,
    0.158203125 at steps 0-2, so loss_goal 0.2 stops that lane at step 2 with the parameters of two updates; the
    lr 0.5 lane never gets below 2 and trains on. Alone, the stopped lane ends its group at the next boundary."""

    def loss(p, b):
        return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)

    problem = tr.Problem(
        lambda key: {"w": jnp.ones(2, jnp.float32)},
        loss,
        lambda hp: optim.sgd(hp.learning_rate, k=hp.k),
        {"h": jnp.array([[1.0, 4.0]], jnp.float32)},
    )
    cfg = tr.EngineConfig(steps=10, chunk_steps=4, sharpness_every=None, loss_goal=0.2)
    h = tr.fit(problem, tr.make_lanes([0.25, 0.5]), 10, config=cfg)
    assert [s["stop_step"] for s in h.lane_summaries] == [2, None]
    two = tr.fit(problem, tr.make_lanes([0.25]), 2, config=tr.EngineConfig(steps=2, sharpness_every=None))
    assert np.array_equal(h.params["w"][0], two.params["w"][0])  # frozen after two updates, bit for bit
    assert list(h.step) == list(range(11)) and float(h.loss[0, -1]) == 0.158203125
    assert h.lane_summaries[1]["steps"] == 10 and h.loss[1, -1] >= 2.0
    alone = tr.fit(problem, tr.make_lanes([0.25]), 10, config=cfg)
    assert int(alone.step[-1]) == 4 and alone.lane_summaries[0]["stop_step"] == 2  # the group ended at step 4
    assert np.array_equal(alone.params["w"], h.params["w"][:1])
    with pytest.raises(ConfigError, match="acc_goal"):
        tr.EngineConfig(steps=2, acc_goal=1.5).validate()


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root can mount one; elsewhere the test cannot make a disk fill up)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}): a full disk needs one")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Fills the filesystem of ``directory`` to all but ``leave`` bytes; returns the filler file."""
    filler = directory / "filler"
    st = os.statvfs(directory)
    want = max(st.f_bavail * st.f_frsize - leave, 0)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 1):
            while want >= size:
                try:
                    want -= os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_at_a_checkpoint_is_one_error_and_resume_is_bitwise(small_fs, tmp_path):
    """The disk fills after the checkpoint of step 30 is committed: train() raises one RunWriteError naming the
    file, the reason and the last complete checkpoint (30); after making room, resume ends bitwise equal to an
    uninterrupted run, with no step logged twice."""
    from eos_jax.errors import RunWriteError

    problem = toy_problem()
    lanes = tr.make_lanes(list(TOY_LRS))
    ref = tr.train(problem, lanes, TOY_CONFIG, tmp_path / "ref", quiet=True)
    run = small_fs / "run"
    filler = []

    def fill_after_first_checkpoint(s):
        if s == 40 and not filler:
            committed = run / "checkpoints" / "group_000" / "30"  # orbax renames a checkpoint here on commit
            deadline = time.monotonic() + 60
            while not committed.is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
            filler.append(_fill(small_fs))

    with pytest.raises(RunWriteError) as e:
        tr.train(problem, lanes, TOY_CONFIG, run, quiet=True, on_chunk=fill_after_first_checkpoint)
    err = e.value
    assert err.reason == "No space left on device" and err.last_checkpoint == [30], (str(err), err.last_checkpoint)
    assert str(run) in err.what and "step 30" in str(err) and "\n" not in str(err)
    filler[0].unlink()
    got = tr.train(problem, lanes, TOY_CONFIG, run, resume=True, quiet=True)
    assert [l["params_digest"] for l in got["lanes"]] == [l["params_digest"] for l in ref["lanes"]]
    steps = [(r["lane"], r["step"]) for r in tr.read_metrics(run / "metrics.jsonl")]
    assert len(steps) == len(set(steps)) and steps == [
        (r["lane"], r["step"]) for r in tr.read_metrics(tmp_path / "ref" / "metrics.jsonl")
    ]


def test_a_failed_metrics_write_is_one_error_and_resume_is_bitwise(tmp_path, monkeypatch):
    """The same error path as a full disk, on any machine (the tmpfs tests above need root to mount one): the
    metrics write after step 40 fails with ENOSPC once the checkpoint of step 30 is committed; train() raises
    one RunWriteError naming metrics.jsonl, the reason and checkpoint 30; resume ends bitwise equal to an
    uninterrupted run, with no step logged twice."""
    import errno

    from eos_jax.errors import RunWriteError
    from eos_jax.train import writer as writer_mod

    problem = toy_problem()
    lanes = tr.make_lanes(list(TOY_LRS))
    ref = tr.train(problem, lanes, TOY_CONFIG, tmp_path / "ref", quiet=True)
    run = tmp_path / "run"
    real_log = writer_mod.RunWriter.log

    def failing_log(self, block):
        if block.start >= 40:
            self.wait(0)  # checkpoint 30 committed, as on a disk that fills after it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
        real_log(self, block)

    monkeypatch.setattr(writer_mod.RunWriter, "log", failing_log)
    with pytest.raises(RunWriteError) as e:
        tr.train(problem, lanes, TOY_CONFIG, run, quiet=True)
    err = e.value
    assert err.reason == "No space left on device" and err.last_checkpoint == [30], (str(err), err.last_checkpoint)
    assert err.what == str(run / "metrics.jsonl") and "step 30" in str(err) and "\n" not in str(err)
    monkeypatch.setattr(writer_mod.RunWriter, "log", real_log)
    got = tr.train(problem, lanes, TOY_CONFIG, run, resume=True, quiet=True)
    assert [l["params_digest"] for l in got["lanes"]] == [l["params_digest"] for l in ref["lanes"]]
    steps = [(r["lane"], r["step"]) for r in tr.read_metrics(run / "metrics.jsonl")]
    assert len(steps) == len(set(steps)) and steps == [
        (r["lane"], r["step"]) for r in tr.read_metrics(tmp_path / "ref" / "metrics.jsonl")
    ]


def test_a_full_disk_is_one_line_and_exit_1_from_the_command_line(small_fs):
    """The command line: no traceback, no orbax log lines; one line naming the file, the reason and the
    command that resumes; exit code 1."""
    _fill(small_fs, leave=120 * 1024)  # room for the run's first files, none for a checkpoint
    out = small_fs / "run"
    env = {k: v for k, v in os.environ.items() if k != "EOS_JAX_DEBUG"}
    env.update(EOS_JAX_NO_SYSTEM_DATA="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "experiments.eos", "--layers", "1", "--lr", "5", "--seed", "0", "--k", "1"]
    cmd += ["--steps", "60", "--sharpness-every", "0", "--checkpoint-every", "20", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stderr.splitlines() if not l.startswith("WARNING: dataset")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert (
        "No space left on device" in lines[0]
        and str(out) in lines[0]
        and lines[0].endswith(f"--quiet --out {out} --resume")
    )
    assert "Traceback" not in proc.stderr and "ERROR:" not in proc.stderr
