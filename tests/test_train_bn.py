"""The engine with a model state (batch norm's running statistics), test-set evaluation and
augmentation: PyTorch's running-statistics update against a hand computation,
train/eval modes, crash-and-resume and chunking bit for bit, the sharpness of the
train-mode loss against the dense Hessian, and the k perturbation through all of it."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_equal_bits
from jax.flatten_util import ravel_pytree

from eos_jax import optim
from eos_jax import train as tr
from eos_jax.io import open_run_dir
from eos_jax.models.vgg import BatchNorm

F64 = jnp.float64


def _data(n: int, seed: int) -> dict[str, jax.Array]:
    rs = np.random.RandomState(seed)
    x = rs.randn(n, 3) * 2.0 + 0.5
    return {"x": jnp.asarray(x, F64), "y": jnp.asarray((x[:, 0] + x[:, 1] > 1.0).astype(np.int32))}


def bn_problem(**kw) -> tr.Problem:
    """x (3) -> dense (4) -> PyTorch batch norm -> tanh -> dense (2) -> softmax cross-entropy, float64."""
    bn_train, bn_eval = BatchNorm(train=True, dtype=F64), BatchNorm(train=False, dtype=F64)

    def init_params(key):
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (12,), F64).reshape(3, 4),
            "bn": {"scale": jnp.ones(4, F64), "bias": jnp.zeros(4, F64)},
            "w2": jax.random.normal(k2, (8,), F64).reshape(4, 2),
        }

    def init_model_state(key):
        del key
        return {"mean": jnp.zeros(4, F64), "var": jnp.ones(4, F64)}

    def logits(params, model_state, x, train):
        h = x @ params["w1"]
        v = {"params": params["bn"], "batch_stats": model_state}
        if train:
            h, new = bn_train.apply(v, h[:, None, None, :], mutable=["batch_stats"])
            model_state = new["batch_stats"]
        else:
            h = bn_eval.apply(v, h[:, None, None, :])
        return jnp.tanh(h[:, 0, 0, :]) @ params["w2"], model_state

    def xent(z, y):
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])

    def loss_fn(params, batch, model_state):
        z, new = logits(params, model_state, batch["x"], True)
        return xent(z, batch["y"]), new

    def eval_fn(params, model_state, data):
        z, _ = logits(params, model_state, data["x"], False)
        acc = jnp.mean((jnp.argmax(z, axis=1).astype(jnp.int32) == data["y"]).astype(F64))
        return {"test_loss": xent(z, data["y"]), "test_accuracy": acc}

    def make_optimizer(hp):
        return optim.sgd(hp.learning_rate, k=hp.k, momentum=0.9, weight_decay=hp.weight_decay)

    return tr.Problem(
        init_params,
        loss_fn,
        make_optimizer,
        _data(32, 0),
        name="bn",
        init_model_state=init_model_state,
        eval_fn=eval_fn,
        eval_data=_data(20, 1),
        **kw,
    )


def _noise(batch, key):
    """A toy augmentation: Gaussian noise on the inputs (pure in the key)."""
    return {**batch, "x": batch["x"] + 0.1 * jax.random.normal(key, (batch["x"].size,), F64).reshape(batch["x"].shape)}


CFG = tr.EngineConfig(
    steps=8, batch_size=8, chunk_steps=4, sharpness_every=None, checkpoint_every=4, eval_every=4, log_every=1
)
LANES = tr.make_lanes([0.1], ks=[1, 2, 3], seeds=[0], init_seeds=[7])


def test_running_statistics_by_hand_eval_mode_and_sharpness_of_the_train_mode_loss():
    """One full-batch step: running mean 0.9*0 + 0.1*mean(h), running var 0.9*1 + 0.1*var_unbiased(h),
    with h = x @ w1 at the initial parameters (NumPy, float64); evaluation with the running statistics;
    the sharpness (Lanczos) of the objective (train-mode loss, batch statistics, + wd/2 |p|^2) at the
    final parameters and running statistics against eigh of its dense Hessian."""
    problem = bn_problem()
    cfg = tr.EngineConfig(steps=1, sharpness_every=1, sharpness_iters=30, sharpness_tol=None, checkpoint_every=None)
    hist = tr.fit(problem, tr.make_lanes([0.1], weight_decays=[1e-2]), 1, config=cfg)
    w1 = np.asarray(jax.jit(problem.init_params)(tr.lane_init_key(0))["w1"])
    h = np.asarray(problem.data["x"]) @ w1
    np.testing.assert_allclose(hist.model_state["mean"][0], 0.1 * h.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(hist.model_state["var"][0], 0.9 + 0.1 * h.var(axis=0, ddof=1), rtol=1e-12)
    # Evaluation uses the running statistics (eval mode), at step 0 and at the end.
    ev = hist.evals
    assert set(ev) == {"test_accuracy", "test_loss"} and hist.step.tolist() == [0, 1]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), hist.params)
    ms = {k: jnp.asarray(v[0]) for k, v in hist.model_state.items()}
    want = problem.eval_fn(params, ms, problem.eval_data)
    assert float(ev["test_loss"][0, 1]) == pytest.approx(float(want["test_loss"]), rel=1e-14)  # eager vs jitted
    assert 0.0 <= ev["test_accuracy"][0, 0] <= 1.0
    flat, unravel = ravel_pytree(params)

    def objective(f):
        p = unravel(f)
        sq = sum(jnp.sum(jnp.square(v)) for v in jax.tree_util.tree_leaves(p))
        return problem.loss_fn(p, problem.data, ms)[0] + 0.5e-2 * sq

    top = float(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(objective))(flat)))[-1])
    assert float(hist.sharpness[0, -1]) == pytest.approx(top, rel=1e-9)


def test_crash_and_resume_equal_the_uninterrupted_run_bit_for_bit(tmp_path):
    """Minibatches, augmentation, momentum and running statistics: a run that dies after its step-4
    checkpoint and resumes ends with the same parameters, running statistics and metrics lines
    (test accuracy included) as one that did not."""
    problem = bn_problem(augment=_noise, rel_l1_level=1)  # the programs of the next test (compile cache)
    ref_dir = open_run_dir(tmp_path / "ref", {"bn": 1})
    ref = tr.train(problem, LANES, CFG, ref_dir, quiet=True)

    class Crash(Exception):
        pass

    def crash(step):
        if step == 8:
            raise Crash  # after the step-4 checkpoint, before the final one

    run_dir = open_run_dir(tmp_path / "run", {"bn": 1})
    with pytest.raises(Crash):
        tr.train(problem, LANES, CFG, run_dir, quiet=True, on_chunk=crash)
    assert not (run_dir / "results.json").exists()
    got = tr.train(problem, LANES, CFG, open_run_dir(tmp_path / "run", {"bn": 1}, resume=True), quiet=True, resume=True)
    for a, b in zip(got["lanes"], ref["lanes"]):
        assert a["params_digest"] == b["params_digest"] and a["model_state_digest"] == b["model_state_digest"]
        assert a["final_eval"] == b["final_eval"] and a["final_eval"]["step"] == 8
    assert (run_dir / "metrics.jsonl").read_bytes() == (ref_dir / "metrics.jsonl").read_bytes()
    lines = [json.loads(l) for l in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({l["step"] for l in lines if "eval" in l}) == [0, 4, 8]
    # k = 2 (a power of two) equals k = 1 bit for bit through batch norm and momentum; k = 3 does not.
    d = {l["k"]: l for l in ref["lanes"]}
    assert d[2]["params_digest"] == d[1]["params_digest"] and d[2]["model_state_digest"] == d[1]["model_state_digest"]
    assert d[3]["params_digest"] != d[1]["params_digest"] and d[3]["n_diff_to_k1"] > 0


def test_chunking_does_not_change_bits_and_per_layer_rel_l1_and_augmentation():
    problem = bn_problem(augment=_noise, rel_l1_level=1)
    a = tr.fit(problem, LANES, CFG.steps, config=CFG)
    b = tr.fit(problem, LANES, CFG.steps, config=dataclasses.replace(CFG, chunk_steps=3, checkpoint_every=None))
    assert_tree_equal_bits(a.params, b.params)
    assert_tree_equal_bits(a.model_state, b.model_state)
    for name in a.evals:
        assert_tree_equal_bits(a.evals[name], b.evals[name])
    # Per-layer RelL1 to the k=1 twin (Figure 3, left), computed in the program, at the last step:
    # equal to a recomputation from the final parameters; 0 for k=2 (bitwise equal to k=1).
    from eos_jax.metrics import layer_groups, rel_l1

    one = jax.tree_util.tree_map(lambda x: x[0], a.params)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(a.params)]
    got = a.aux["rel_l1_layers"][:, -1]  # (lanes, layers)
    assert got.shape == (3, len(layer_groups(one))) and not got[1].any()
    for j, idx in enumerate(layer_groups(one).values()):
        want = rel_l1([leaves[i][2] for i in idx], [leaves[i][0] for i in idx])
        assert got[2, j] == pytest.approx(float(want), rel=1e-12)
    assert got[2].max() > 0
    # The steps trained on augmented batches: the augmentation of step t's minibatch, keyed by (lane, t).
    state = jax.tree_util.tree_map(
        lambda x: x[0], jax.jit(jax.vmap(lambda h: tr.init_state(problem, h)))(tr.stack_hparams(LANES[:1], F64))
    )
    plain = tr.step.select_batch(problem.data, state.key, state.step, CFG.batch_size)
    aug = tr.step.step_batch(problem, problem.data, state, CFG.batch_size)
    want = _noise(plain, tr.state.augment_key(state.key, state.step))
    assert_tree_equal_bits(aug, want) and not np.array_equal(np.asarray(aug["x"]), np.asarray(plain["x"]))
