"""Inputs of the PyTorch optimizer fixture (tests/fixtures/torch_optim.npz), rebuilt exactly.

The fixture stores PyTorch's results, not these inputs (30 steps of 2,000 float32
gradients would be 240 kB); both ``scripts/make_torch_fixtures.py`` and the test rebuild
them from NumPy's legacy ``RandomState`` integer draws (a stream NumPy guarantees not to
change) by exact operations (``np.ldexp``), and the fixture stores their SHA-256 so a
drift would fail loudly instead of comparing different runs.
"""

from __future__ import annotations

import hashlib

import numpy as np

SEED = 20240610
SHAPE = (50, 40)
STEPS = 30
KS = (1, 3, 4)
# name -> (optimizer, hyperparameters); lr = 0.1 is not a float32 number, so lr*k is rounded twice
CASES = {
    "sgd": ("sgd", dict(lr=0.1)),
    "momentum_wd": ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "nesterov_wd": ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "adam": ("adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)),
    "adam_wd": ("adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4)),
}
# (case, k, form): form "reference" is the authors' lr*k and d/k; "paper" is lr/k and k*d
RUNS = [(c, k, "reference") for c in CASES for k in KS] + [(c, 3, "paper") for c in ("sgd", "nesterov_wd", "adam")]


def _floats(rs: np.random.RandomState, n: int, lo: int, hi: int) -> np.ndarray:
    """``n`` float32 numbers: random sign, 24-bit mantissa, binary exponent in [lo, hi)."""
    mant = rs.randint(2**23, 2**24, size=n).astype(np.float64)
    sign = np.where(rs.randint(0, 2, size=n) == 1, -1.0, 1.0)
    exp = rs.randint(lo, hi, size=n)
    return np.ldexp(sign * mant, exp - 24).astype(np.float32)  # exact: 24 bits, normal range


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """``(params0 of SHAPE, grads of (STEPS,) + SHAPE)``, float32."""
    rs = np.random.RandomState(SEED)
    n = int(np.prod(SHAPE))
    p0 = _floats(rs, n, -6, 2).reshape(SHAPE)
    grads = np.stack([_floats(rs, n, -10, 1).reshape(SHAPE) for _ in range(STEPS)])
    return p0, grads


def digest(p0: np.ndarray, grads: np.ndarray) -> str:
    """SHA-256 of the inputs' bytes."""
    return hashlib.sha256(p0.tobytes() + grads.tobytes()).hexdigest()
