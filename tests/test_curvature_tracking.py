"""The Hessian's trace and eigenvalue density tracked along training (``EngineConfig.track``).

The tracked values are checked against the dense Hessian (``jax.hessian`` + ``eigh``) and
against the library functions called alone on the same parameters with the same keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_eos_cli import _run
from train_fixtures import toy_loss, toy_problem

from eos_jax import hessian
from eos_jax import train as tr
from eos_jax.errors import ConfigError
from eos_jax.train.state import curvature_key
from eos_jax.train.step import objective_fn
from experiments import eos

N_PARAMS = 24  # toy_problem's parameters: 24 Lanczos steps span the whole space


def test_tracked_trace_and_density_match_the_dense_hessian_and_the_library_alone():
    prob = toy_problem()
    lanes = tr.make_lanes([0.05, 0.3], weight_decays=[0.0, 0.01])
    track = dict(track=("trace", "density"), trace_probes=64, density_probes=2, density_steps=N_PARAMS)
    hist = tr.fit(prob, lanes, 4, sharpness_every=2, **track)
    c = hist.curvature
    measured = ~np.isnan(c["trace"])
    assert hist.step[measured.all(axis=0)].tolist() == [0, 2, 4] and not measured[:, ~measured.all(axis=0)].any()
    assert c["ritz"].shape == c["weights"].shape == (4, len(hist.step), 2, N_PARAMS)
    assert [s["curvature"]["step"] for s in hist.lane_summaries] == [[0, 2, 4]] * 4
    hp = tr.stack_hparams(lanes)
    state = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)

    @jax.jit
    def dense(params, wd):  # the objective's Hessian: the loss's plus wd * I (wd/2 |p|^2)
        flat, unravel = ravel_pytree(params)
        h = jax.hessian(lambda f: toy_loss(unravel(f), prob.data))(flat).astype(jnp.float64)
        return h + wd.astype(jnp.float64) * jnp.eye(N_PARAMS, dtype=jnp.float64)

    @jax.jit
    def alone(params, hp_i, key):  # the library called on one lane, with the lane's probe key
        obj = objective_fn(prob, hp_i)
        t = hessian.trace(obj, params, prob.data, jax.random.fold_in(key, 0), num_probes=64)
        d = hessian.density(obj, params, prob.data, jax.random.fold_in(key, 1), num_probes=2, num_steps=N_PARAMS)
        return t.estimate, d.ritz_values

    for i in range(len(lanes)):  # step 0: the initial parameters
        p = jax.tree_util.tree_map(lambda a, i=i: a[i], state.params)
        hp_i = jax.tree_util.tree_map(lambda a, i=i: a[i], hp)
        h = dense(p, hp_i.weight_decay)
        eig = np.asarray(jnp.linalg.eigvalsh(h))
        est, se = float(c["trace"][i, 0]), float(c["trace_stderr"][i, 0])
        # Hutchinson's estimate is unbiased: within 5 of its standard errors of the exact trace.
        assert se > 0 and abs(est - float(jnp.trace(h))) <= 5 * se, (est, float(jnp.trace(h)), se)
        # 24 Lanczos steps on 24 parameters: the Ritz values are the spectrum (float32 rounding).
        ritz, w = c["ritz"][i, 0], c["weights"][i, 0]
        assert np.max(ritz) == pytest.approx(eig[-1], rel=1e-4)
        assert np.min(ritz) == pytest.approx(eig[0], abs=1e-4 * eig[-1])
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-5)
        # The same numbers as the library alone (a vmapped lane is not bitwise a lone call).
        t_alone, ritz_alone = alone(p, hp_i, curvature_key(state.key[i], 0))
        assert float(t_alone) == pytest.approx(est, rel=1e-5)
        np.testing.assert_allclose(np.sort(np.asarray(ritz_alone), -1), np.sort(ritz, -1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="track"):
        tr.fit(prob, lanes, 2, sharpness_every=None, track=("trace",))


def test_track_flags_reach_the_config_and_untracked_configs_keep_their_hash(capsys):
    """``--track`` and its counts reach ``EosConfig`` (and ``config.json``); bad values are one-line
    errors naming the flag; an untracked config has none of the four fields (the config and hash
    of runs made before tracking). The tracked run itself: tests/test_eos_cli.py (the 3-layer CNN
    against its dense Hessian)."""
    from experiments.eos import cli as eos_cli

    args = eos_cli.build_parser().parse_args(
        ["--track", "trace,density", "--trace-probes", "4", "--density-steps", "6"]
    )
    cfg = eos.default_config("cnn", **eos_cli.overrides_from_args(args))
    d = cfg.to_dict()
    assert (d["track"], d["trace_probes"], d["density_probes"], d["density_steps"]) == (["trace", "density"], 4, 1, 6)
    assert cfg.engine_config().track == ("trace", "density")
    plain = eos.default_config("cnn")
    assert not {"track", "trace_probes", "density_probes", "density_steps"} & set(plain.to_dict())
    for argv, needle in (
        (["--track", "trace,hessian"], "'hessian' is not allowed"),
        (["--track", "trace", "--trace-probes", "1"], "--trace-probes 1"),
        (["--track", "density", "--sharpness-every", "0"], "needs --sharpness-every"),
    ):
        code, _, err = _run([*argv, "--steps", "1"], capsys)
        assert code == 2 and err.count("\n") == 1 and needle in err, err
