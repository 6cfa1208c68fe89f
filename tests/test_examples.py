"""examples/: the worked example runs, its sharpness matches the dense Hessian, its ulp counts a NumPy recount."""

from __future__ import annotations

import runpy
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sharpness_and_perturbed_sgd.py"


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 whose differences count ulps (sign-magnitude to two's complement)."""
    i = x.view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def test_sharpness_and_perturbed_sgd_example(capsys):
    g = runpy.run_path(str(EXAMPLE), run_name="example")
    out = g["main"]()  # the script's entry point, with its default sizes
    printed = capsys.readouterr().out

    # Sharpness: Lanczos (float32) against the dense Hessian's top eigenvalue in float64.
    to64 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
    flat, unravel = ravel_pytree(to64(out["params"]))
    batch64 = to64(out["batch"])
    dense = jax.jit(jax.hessian(lambda f: g["loss_fn"](unravel(f), batch64)))(flat)
    top = float(np.linalg.eigvalsh(np.asarray(dense))[-1])
    assert abs(out["sharpness"] - top) <= 1e-4 * abs(top), (out["sharpness"], top)

    # k=3 vs k=1: recount the differing parameters and their ulp distance with NumPy.
    a = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(out["p3"])])
    b = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(out["p1"])])
    assert a.dtype == np.float32 and np.isfinite(a).all() and np.isfinite(b).all()
    differ = a.view(np.uint32) != b.view(np.uint32)
    n_diff = int(differ.sum())
    max_ulp = int(np.abs(_ordered(a) - _ordered(b))[differ].max()) if n_diff else 0
    assert (out["ulp"].n_diff, out["ulp"].n_total, out["ulp"].max_ulp) == (n_diff, a.size, max_ulp)
    assert n_diff > 0  # the perturbation changes last bits (Section 4.1); a no-op k=3 would fail here
    assert f"{n_diff} of {a.size} parameters differ, by up to {max_ulp} ulps" in printed
    assert f"sharpness at init {out['sharpness']:.6g}" in printed
