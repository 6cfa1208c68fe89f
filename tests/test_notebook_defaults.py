"""The public API under JAX's defaults, as a notebook user calls it.

The suite's conftest turns x64 on and dtype promotion to strict for every in-process test, so
nothing else checks what a user with a fresh interpreter gets. One child process starts with a
clean environment (no ``JAX_ENABLE_X64``, ``XLA_FLAGS`` or ``MPLBACKEND``; x64 off, standard
promotion, a user-chosen matplotlib backend), turns every warning into an error (a float64
request silently truncated to float32 warns under x64 off), and exercises: a ``cnn`` model
(:mod:`eos_jax.models`), its sharpness (:mod:`eos_jax.hessian`, against the dense Hessian),
``optim.sgd(k=3)`` / ``adam`` in the user's own optax loop, the engine's file-free pieces
(:mod:`eos_jax.train`: lanes, state, a scanned chunk), the bitwise metrics, and the PDE library
(Beltrami descent, Swish regimes). Every result must be float32 and finite, and x64, the promotion
mode and the backend unchanged at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import warnings
    import matplotlib
    matplotlib.use("svg")  # the user's choice, which the library must keep
    import jax
    import jax.flatten_util
    import jax.numpy as jnp
    import numpy as np
    import optax

    def state():
        return (bool(jax.config.jax_enable_x64), str(jax.config.jax_numpy_dtype_promotion), matplotlib.get_backend())

    before = state()
    assert before == (False, "standard", "svg"), before
    from eos_jax import hessian, losses, metrics, models, optim
    from eos_jax import train as tr
    from eos_jax.pde import beltrami, nonlinear
    assert state() == before, ("import", state())
    warnings.simplefilter("error")  # e.g. "Explicitly requested dtype float64 ... is not available"

    def f32(tree, what):
        for a in jax.tree_util.tree_leaves(tree):
            a = np.asarray(a)
            assert a.dtype == np.float32 and np.isfinite(a).all(), (what, a.dtype, a)

    # A one-layer cnn (Eq. (6)) on a batch of four 5x5 images, binary cross-entropy (Eq. (20)).
    x = jax.random.uniform(jax.random.key(1), (100,), jnp.float32).reshape(4, 5, 5, 1)
    y = (jnp.arange(4) % 2).astype(jnp.int32)
    model = models.get("cnn", layers=1)
    variables = jax.jit(model.init, static_argnums=1)(jax.random.key(0), (5, 5, 1))
    params = variables["params"]
    f32(params, "cnn params")

    def loss_fn(p, batch):
        logits, _ = model.apply({**variables, "params": p}, batch[0], train=False)
        return losses.binary_cross_entropy(logits, batch[1])

    loss = jax.jit(loss_fn)
    loss0 = loss(params, (x, y))
    f32(loss0, "loss")
    # Sharpness by Lanczos (jitted by the user) against the dense Hessian's top eigenvalue (NumPy eigh).
    res = jax.jit(lambda p, b: hessian.top_eigenvalue(loss_fn, p, b, num_iters=12))(params, (x, y))
    f32((res.eigenvalue, res.eigenvector, res.residual), "top_eigenvalue")
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    dense = np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), (x, y))))(flat), np.float64)
    top = np.linalg.eigvalsh((dense + dense.T) / 2)[-1]
    assert abs(float(res.eigenvalue) - top) <= 1e-4 * abs(top), (float(res.eigenvalue), top)
    # Perturbed SGD and Adam (k=3) in the user's own optax loop, three jitted steps each.
    for opt in (optim.sgd(0.1, k=3), optim.adam(1e-2, k=3)):
        @jax.jit
        def step(p, s, batch):
            u, s = opt.update(jax.grad(loss_fn)(p, batch), s, p)
            return optax.apply_updates(p, u), s

        p, s = params, opt.init(params)
        for _ in range(3):
            p, s = step(p, s, (x, y))
        f32(p, "optimizer params")
        assert float(loss(p, (x, y))) < float(loss0)
    d = metrics.ulp_diff(p, params)
    assert 0 < d.n_diff <= d.n_total and d.max_ulp > 0
    f32(metrics.rel_l1(p, params), "rel_l1")
    assert len(metrics.tree_digest(p)) == 64
    # The engine's file-free pieces: k = 1 and 3 lanes, float32 hyperparameters, one scanned chunk.
    prob = tr.Problem(lambda k: model.init(k, (5, 5, 1))["params"], loss_fn,
                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k, weight_decay=hp.weight_decay), (x, y))
    hp = tr.stack_hparams(tr.make_lanes([0.1], ks=[1, 3]), tr.state.hparam_dtype(prob))
    f32((hp.learning_rate, hp.weight_decay), "hparams")
    st = jax.jit(jax.vmap(lambda h: tr.init_state(prob, h)))(hp)
    st, met = tr.make_chunk_fn(prob, None, 3)(st, hp, prob.data, jnp.asarray(3, jnp.int32))
    f32((st.params, met["loss"], met["rel_l1"]), "engine")
    assert np.asarray(met["finite"]).all() and int(st.step[0]) == 3
    # PDE library: Beltrami gradient descent (float32 signal) and the Swish regimes.
    sig = jnp.asarray(np.linspace(0.0, 1.0, 16), jnp.float32)
    out = beltrami.simulate(sig, jnp.asarray([1e-4], jnp.float32), steps=10, lam=10.0, delta=0.1, dx=1 / 16,
                            record_every=5)
    f32((out["u"], out["loss"]), "beltrami")
    fr = nonlinear.regime_fractions(jnp.asarray([-1.0, 0.0, 1.0], jnp.float32),
                                    nonlinear.regime_threshold(1.0, 0.05))
    f32(fr, "regimes")
    assert abs(float(jnp.sum(fr)) - 1.0) < 1e-6
    assert state() == before, ("calls", state())
    print("UNCHANGED", state())
    """
)


@pytest.mark.subprocess
def test_public_api_under_jax_defaults_is_float32_and_leaves_the_process_as_it_found_it():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_ENABLE_X64", "XLA_FLAGS", "MPLBACKEND", "JAX_NUMPY_DTYPE_PROMOTION")
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "UNCHANGED (False, 'standard', 'svg')", r.stdout[-2000:]


@pytest.mark.subprocess
def test_an_interactive_import_says_once_how_to_configure():
    """In a REPL or notebook (no entry point calls runtime.configure()), `import eos_jax` prints one line naming
    it; a script (the command lines) prints nothing, and EOS_JAX_QUIET=1 silences the REPL's line."""
    from eos_jax import CONFIGURE_HINT

    env = {k: v for k, v in os.environ.items() if k != "EOS_JAX_QUIET"}
    repl = "import sys; sys.ps1 = '>>> '; import eos_jax; from eos_jax import stability"
    for code, quiet, want in ((repl, "0", 1), ("import eos_jax", "0", 0), (repl, "1", 0)):
        proc = subprocess.run(
            [sys.executable, "-c", code], env={**env, "EOS_JAX_QUIET": quiet}, capture_output=True, text=True
        )
        assert proc.returncode == 0 and proc.stderr.count(CONFIGURE_HINT) == want, (code, quiet, proc.stderr)
        assert proc.stderr.count("\n") == want
    assert "eos_jax.runtime.configure()" in CONFIGURE_HINT
