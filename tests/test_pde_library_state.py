"""The PDE library leaves the process as it found it (no global side effects).

A child process starts under JAX's defaults (x64 off) with a user-chosen matplotlib backend and
``XLA_FLAGS``, imports every ``eos_jax.pde`` module (and the experiments' plotting code), calls a
cheap public function of each (float32 where the function supports it; the float64-only ones
must refuse with a ConfigError naming x64, never switch it on), draws one experiment figure,
and checks that x64, the matmul precision, ``XLA_FLAGS`` and the matplotlib backend are unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import os
    import matplotlib
    matplotlib.use("svg")  # the user's choice, which the library must keep
    import jax
    import jax.numpy as jnp
    import numpy as np

    def state():
        return (bool(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision),
                os.environ.get("XLA_FLAGS"), matplotlib.get_backend())

    before = state()
    assert before[0] is False and before[3] == "svg", before

    from eos_jax import eigen
    from eos_jax.errors import ConfigError
    from eos_jax.pde import beltrami, common, heat, linear, nonlinear
    from experiments.pde import beltrami as beltrami_exp
    from experiments.pde import heat as heat_exp, linear as linear_exp, nonlinear as nonlinear_exp  # noqa: F401
    from experiments.pde.nonlinear_sim import simulate as nonlinear_simulate
    assert state() == before, ("import", state(), before)

    def refuses(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except ConfigError as e:
            assert "x64" in str(e) and "float64" in str(e), str(e)
            return
        raise AssertionError(f"{fn.__qualname__} ran without x64")

    # common: the checkerboard (NumPy) in float32.
    cb = common.checkerboard(8, dtype=np.float32)
    assert cb.dtype == np.float32 and cb[0, 0] == 1.0 and cb[0, 1] == -1.0
    # heat: closed forms (NumPy float64) run; the float64 simulation refuses.
    amp = heat.amplifier(0.4, 5)
    assert abs(amp[0] - (1 - 0.8 * (1 - np.cos(np.pi / 6)))) < 1e-15
    refuses(heat.simulate, heat.triangle(5, 6.0), 0.4, 3)
    # beltrami: loss and gradient descent follow the signal's dtype (float32 here).
    sig = jnp.asarray(np.linspace(0.0, 1.0, 16), jnp.float32)
    out = beltrami.simulate(sig, jnp.asarray([1e-4], jnp.float32), steps=20, lam=10.0, delta=0.1, dx=1 / 16,
                            record_every=2)
    assert out["u"].dtype == jnp.float32 and out["loss"].shape == (1, 10)
    assert float(beltrami.loss(sig, sig, lam=1.0, delta=0.1, dx=1.0)) > 0
    refuses(beltrami.piecewise_constant_signal, 16, jax.random.key(0), noise=0.1)
    # linear: closed-form bounds (Python floats) run; the float64 operators refuse.
    lo, hi = linear.alpha_bounds(0.0, 4.0, scheme="gd", dt=0.1, a=-0.5, beta=1.0)
    assert lo == 1.0 and hi == 20.0
    refuses(linear.image_spectrum, cb)
    refuses(linear.make_windowed_operator, cb, 3)
    refuses(linear.operator_extremes, lambda v: v, (2, 2), jax.random.key(0))
    # nonlinear: the Swish regimes and the float32 model/simulation.
    eps = nonlinear.regime_threshold(1.0, 0.05)
    fr = nonlinear.regime_fractions(jnp.asarray([-1.0, 0.0, 1.0], jnp.float32), eps)
    assert fr.dtype == jnp.float32 and abs(float(jnp.sum(fr)) - 1.0) < 1e-6
    assert nonlinear.swish_prime(jnp.asarray([0.0], jnp.float32)).dtype == jnp.float32
    cfg = nonlinear.NonlinearConfig(dts=(0.01, 0.2), steps=4, size=8, kernel=3, sharpness_every=2, sharpness_iters=3,
                                    rel_l1_window=2)
    sim = nonlinear_simulate(cfg)  # the float32 k=1 / k lanes, through the library's engine (fit)
    assert sim["loss"].dtype == np.float32 and sim["loss"].shape == (4, 2, 2)
    refuses(nonlinear.theory, cb, 3, alpha=20.0, beta=1.0, label=1, dts=(0.01,), pool="mean")
    # eigen: the shared solver in float32.
    a = jnp.diag(jnp.asarray([1.0, 2.0, 5.0], jnp.float32))
    e = eigen.psd_extremes(lambda v: a @ v, jnp.ones(3, jnp.float32), jnp.asarray([1.0, -1.0, 0.5], jnp.float32),
                           tol=1e-5)
    assert abs(e.mu_max - 5.0) < 1e-4 and abs(e.mu_min - 1.0) < 1e-3
    assert state() == before, ("calls", state(), before)

    # An experiment's figure: object-oriented matplotlib, the user's backend kept.
    import tempfile
    from pathlib import Path
    x = np.linspace(0.0, 1.0, 8)
    results = {"dx": 1 / 8, "signal_noisy": x, "signal_clean": x,
               "runs": {"1.0": {"final_u": x, "classification": "stable", "update_history": np.ones(3)}}}
    cfg = beltrami.BeltramiConfig(multiples=(1.0,), points=8, steps=30, record_every=10)
    with tempfile.TemporaryDirectory() as d:
        beltrami_exp._plot(results, cfg, Path(d) / "f.png")
        assert (Path(d) / "f.png").read_bytes()[:4] == b"\\x89PNG"
    assert state() == before, ("plot", state(), before)
    print("UNCHANGED", state())
    """
)


@pytest.mark.subprocess
def test_pde_library_keeps_x64_xla_flags_and_matplotlib_backend():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env.pop("JAX_ENABLE_X64", None)
    env.pop("MPLBACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "UNCHANGED (False, " in r.stdout and "--xla_force_host_platform_device_count=1', 'svg')" in r.stdout
