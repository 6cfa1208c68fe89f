"""Tests of eos_jax.optim: the perturbed update of Section 4.1, bit for bit.

Every equality is bitwise. The NumPy references redo the same roundings in the same dtype:
NumPy's scalar/array float32 and float64 arithmetic is IEEE round-to-nearest, one rounding
per operation, with no contraction.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_allclose, assert_tree_equal_bits, tree_equal_bits

from eos_jax import optim
from eos_jax.metrics import ulp_diff

LR = 0.1
KS = list(range(1, 13))


def _updates(dtype, n=2048, seed=0):
    """Update values spanning six decades, both signs, with +0 and -0 among them."""
    rng = np.random.default_rng(seed)
    u = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype)
    u[:3] = 0.0
    u[3:6] = -0.0
    return u


def _numpy_update(u, lr, k, form="paper"):
    """The three roundings of the module docstring, redone in NumPy in u's dtype."""
    dt = u.dtype.type
    lr_d, k_d = dt(lr), dt(k)
    if form == "paper":
        q, p = dt(lr_d / k_d), (k_d * u).astype(u.dtype)
    else:
        q, p = dt(lr_d * k_d), (u / k_d).astype(u.dtype)
    out = -(q * p)
    return out + dt(0.0)  # the exact "+0" that blocks FMA contraction (-0 -> +0 only)


def _apply(opt, u, state=None):
    return opt.update(u, opt.init(u) if state is None else state)[0]


# ------------------------------------------------------------------ the three roundings


@pytest.mark.parametrize("form", ["paper", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_equals_numpy_roundings_constant_k(dtype, form):
    """k as a Python int: a compile-time constant in each jitted program."""
    u = _updates(dtype)
    for k in KS:
        got = np.asarray(jax.jit(lambda x, k=k: _apply(optim.perturbed_scale(LR, k=k, form=form), x))(u))
        assert got.dtype == dtype
        assert_tree_equal_bits(got, _numpy_update(u, LR, k, form), f"k={k} constant, {form}")


@pytest.mark.parametrize("form", ["paper", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_equals_numpy_roundings_traced_k_and_lr(dtype, form):
    """k and lr as jit arguments (one compile for all k), and vmapped over k."""
    u = _updates(dtype)

    def step(x, lr, k):
        return _apply(optim.perturbed_scale(lr, k=k, form=form), x)

    jitted = jax.jit(step)
    lr64 = jnp.asarray(LR, jnp.float64)  # rounded to dtype inside, like NumPy's dt(LR)
    for k in KS:
        got = jitted(u, lr64, jnp.asarray(k, jnp.int32))
        assert_tree_equal_bits(got, _numpy_update(u, LR, k, form), f"k={k} traced, {form}")
    lanes = jax.jit(jax.vmap(step, in_axes=(None, None, 0)))(u, lr64, jnp.asarray(KS, jnp.int32))
    for i, k in enumerate(KS):
        assert_tree_equal_bits(lanes[i], _numpy_update(u, LR, k, form), f"k={k} vmapped lane, {form}")


@pytest.mark.parametrize("form", ["paper", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vmapped_lanes_equal_numpy_for_every_batching(dtype, form):
    """Sweeps vmap over any of (u, lr, k). XLA turns a / broadcast(b) into a * (1/b), which
    is not correctly rounded (a naive barrier gets fl(lr/3) wrong in ~30% of an lr sweep)."""
    u = _updates(dtype, n=512)
    us = np.stack([u, u[::-1], -u, 3 * u])
    lrs = np.array([0.1, 0.3, 0.05, 0.7])
    ks = np.array([1, 3, 7, 11], np.int32)

    def step(x, lr, k):
        return _apply(optim.perturbed_scale(lr, k=k, form=form), x)

    for axes in [(None, 0, None), (None, None, 0), (None, 0, 0), (0, None, None), (0, 0, 0)]:
        args = [us if axes[0] == 0 else u, lrs if axes[1] == 0 else LR, ks if axes[2] == 0 else np.int32(3)]
        out = jax.jit(jax.vmap(step, in_axes=axes))(*args)
        for i in range(4):
            x = us[i] if axes[0] == 0 else u
            lr = lrs[i] if axes[1] == 0 else LR
            k = int(ks[i]) if axes[2] == 0 else 3
            assert_tree_equal_bits(out[i], _numpy_update(x, lr, k, form), f"in_axes={axes}, lane {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vmapped_lr_over_fixed_k_divides_correctly(dtype):
    """fl(lr/k) per lane of an lr sweep. With lr and k behind separate barriers, XLA turns
    lr[B] / broadcast(k) into lr * fl(1/k): for k=3, 341/1000 float32 and 330/1000 float64
    lanes came out 1 ulp off (measured with that variant of _opaque_scalars)."""
    lrs = np.random.default_rng(3).uniform(0.001, 1.0, 1000).astype(dtype)

    def q(lr, k):
        lr_d, k_d, _ = optim._opaque_scalars(lr, k, np.dtype(dtype))
        return lr_d / k_d

    for k in (3, 7, 11):
        wrong = lrs * (dtype(1) / dtype(k))  # what the rewrite would give
        assert (wrong != lrs / dtype(k)).any()  # so the check below can fail
        got = jax.jit(jax.vmap(q, in_axes=(0, None)))(lrs, k)
        assert_tree_equal_bits(got, lrs / dtype(k), f"k={k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_powers_of_two_equal_k1_and_odd_k_differ_by_at_most_2_ulp(dtype):
    """k=2^n: same bits as k=1. Odd k: a nonzero fraction differs, by 1 or 2 ulps.

    The issue text says "at most 1 ulp"; that is not a theorem: with z = lr*u exact,
    q*p = z(1+e1)(1+e2), |e_i| <= 2^-p, so |q*p - z| < 2 ulp(z) and the two final
    roundings add up to one more ulp: |fl(q*p) - fl(z)| < 3 ulp, i.e. <= 2 ulps, and
    2 does occur (e.g. lr=0.1, k=3 in float32; measured, see the report).
    """
    u = _updates(dtype, n=20000)
    f = jax.jit(lambda x, k: _apply(optim.perturbed_scale(LR, k=k), x))
    ref = f(u, jnp.asarray(1, jnp.int32))
    for k in (2, 4, 8, 16, 1024):
        assert_tree_equal_bits(f(u, jnp.asarray(k, jnp.int32)), ref, f"k={k}")
    for k in (3, 5, 7, 9, 11):
        d = ulp_diff(f(u, jnp.asarray(k, jnp.int32)), ref)
        assert 0.05 < d.fraction < 1.0, (k, d)
        assert 1 <= d.max_ulp <= 2, (k, d)


def test_k_dividing_lr_gives_no_perturbation():
    """lr=5, k=5: fl(lr/k) = 1 is exact, so fl(1 * fl(5u)) = fl(5u): no perturbation."""
    u = _updates(np.float32)
    f = jax.jit(lambda x, k: _apply(optim.perturbed_scale(5.0, k=k), x))
    assert_tree_equal_bits(f(u, jnp.asarray(5, jnp.int32)), f(u, jnp.asarray(1, jnp.int32)))
    assert not tree_equal_bits(f(u, jnp.asarray(3, jnp.int32)), f(u, jnp.asarray(1, jnp.int32)))


def _full_size_multiplies(hlo_text: str, n: int) -> int:
    """Number of elementwise multiplies over the f32[n] vector in compiled HLO text."""
    return len(re.findall(rf"= f32\[{n}\]\{{0\}} multiply\(", hlo_text))


@pytest.mark.parametrize("k", [7, 9])
def test_compiled_program_keeps_both_multiplications(k):
    """With constant k=7, 9 XLA folds a naive (lr/k)*(k*u) into one multiply by fl(fl(lr/k)*k)
    = lr (the perturbation vanishes); the transform's compiled program keeps two."""
    u = _updates(np.float32)
    n = u.size
    naive = jax.jit(lambda x: -((jnp.float32(LR) / jnp.float32(k)) * (jnp.float32(k) * x)))
    ours = jax.jit(lambda x: _apply(optim.perturbed_scale(LR, k=k), x))
    # Control: the hazard is real in this XLA (one multiply, bits of k=1).
    assert _full_size_multiplies(naive.lower(u).compile().as_text(), n) == 1
    assert_tree_equal_bits(naive(u), -(np.float32(LR) * u))
    # The transform: two multiplies in the optimized program, bits as NumPy predicts,
    # and different from k=1.
    assert _full_size_multiplies(ours.lower(u).compile().as_text(), n) == 2
    assert_tree_equal_bits(ours(u), _numpy_update(u, LR, k))
    assert ulp_diff(ours(u), _numpy_update(u, LR, 1)).n_diff > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_parameter_update_rounds_the_product(dtype):
    """jit(apply_updates(theta, update(u))) = fl(theta + fl(-(q*p))): no FMA contraction."""
    u = _updates(dtype)
    theta = np.random.default_rng(1).standard_normal(u.size).astype(dtype)
    theta[6:9] = -0.0

    @jax.jit
    def step(theta, u, k):
        opt = optim.perturbed_scale(LR, k=k)
        return optax.apply_updates(theta, opt.update(u, opt.init(theta))[0])

    for k in (1, 3, 7):
        want = theta + _numpy_update(u, LR, k)
        assert_tree_equal_bits(step(theta, u, jnp.asarray(k, jnp.int32)), want, f"k={k}")
    # Control: without the "+0", XLA:CPU contracts theta + -(q*p) into one FMA.
    q, k_d = dtype(dtype(LR) / dtype(3)), dtype(3)
    fused = jax.jit(lambda t, x, q, kk: t + (-(q * (kk * x))))(theta, u, q, k_d)
    assert not tree_equal_bits(fused, theta + (-(q * (k_d * u)))), "no FMA contraction any more"


def test_schedule_is_evaluated_at_the_count():
    u = _updates(np.float32)
    # (optax.piecewise_constant_schedule mixes float and int32 and fails under the
    # tests' strict dtype promotion, so the schedule is written out.)
    schedule = lambda count: jnp.where(count < 2, 0.1, 0.01)  # noqa: E731
    opt = optim.perturbed_scale(schedule, k=3)
    state = opt.init(u)
    step = jax.jit(opt.update)
    for t in range(4):
        assert int(state.count) == t
        got, state = step(u, state)
        assert_tree_equal_bits(got, _numpy_update(u, float(schedule(t)), 3), f"step {t}")
    assert int(state.count) == 4


# ------------------------------------------------------------------ validation and state


@pytest.mark.parametrize("bad", [0, -1, -3, 2.5, 3.0, True, np.bool_(True), "3", np.array([1, 2]), np.float32(3)])
def test_invalid_k_raises_naming_the_value(bad):
    with pytest.raises(ValueError, match="k"):
        optim.perturbed_scale(0.1, k=bad)
    with pytest.raises(ValueError, match="k"):
        optim.sgd(0.1, k=bad)
    with pytest.raises(ValueError, match="k"):
        optim.adam(0.1, k=bad)


def test_error_messages_name_the_value():
    with pytest.raises(ValueError, match=r"k=0"):
        optim.sgd(0.1, k=0)
    with pytest.raises(ValueError, match=r"k=2\.5"):
        optim.sgd(0.1, k=2.5)
    with pytest.raises(ValueError, match=r"k=True"):
        optim.sgd(0.1, k=True)
    with pytest.raises(ValueError, match=r"learning_rate=-0\.1"):
        optim.sgd(-0.1)
    with pytest.raises(ValueError, match=r"learning_rate=nan"):
        optim.adam(float("nan"))
    with pytest.raises(ValueError, match=r"form='torch'"):
        optim.perturbed_scale(0.1, form="torch")
    with pytest.raises(ValueError, match=r"momentum=-0\.9"):
        optim.sgd(0.1, momentum=-0.9)
    with pytest.raises(ValueError, match=r"nesterov"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"b2=1\.0"):
        optim.adam(0.1, b2=1.0)
    with pytest.raises(ValueError, match=r"k=16777217"):  # 2**24 + 1 is not a float32
        _apply(optim.perturbed_scale(0.1, k=2**24 + 1), np.ones(3, np.float32))


def test_valid_k_forms_accepted():
    u = _updates(np.float32)
    want = _numpy_update(u, LR, 3)
    for k in (3, np.int32(3), np.int64(3), np.array(3), jnp.asarray(3, jnp.int32)):
        assert_tree_equal_bits(_apply(optim.perturbed_scale(LR, k=k), u), want, repr(k))


def test_traced_float_k_rejected():
    with pytest.raises(ValueError, match="float"):
        jax.jit(lambda k: optim.sgd(0.1, k=k))(jnp.asarray(3.0, jnp.float32))


def test_state_shapes_do_not_depend_on_lr_or_k_and_build_inside_vmap():
    # Six different weights: whether k = 3 moves a given element's last bit depends on its value.
    params = {"w": np.linspace(0.5, 1.7, 6, dtype=np.float32).reshape(3, 2), "b": np.zeros((2,), np.float32)}
    shapes = [
        jax.eval_shape(optim.sgd(lr, k=k, momentum=0.9, weight_decay=1e-4).init, params)
        for lr, k in [(0.1, 1), (5.0, 3), (jnp.asarray(0.2), jnp.asarray(12, jnp.int32))]
    ]
    assert shapes[0] == shapes[1] == shapes[2]

    def lane(lr, k):
        opt = optim.sgd(lr, k=k, momentum=0.9, weight_decay=1e-4)
        state = opt.init(params)
        return opt.update(params, state, params)

    lrs = jnp.asarray([0.1, 0.1, 0.2], jnp.float64)
    ks = jnp.asarray([1, 3, 3], jnp.int32)
    updates, states = jax.jit(jax.vmap(lane))(lrs, ks)
    assert updates["w"].shape == (3, 3, 2) and updates["w"].dtype == np.float32
    assert states[2].count.shape == (3,)
    assert not tree_equal_bits(updates["w"][0], updates["w"][1])  # k=1 vs k=3


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.sgd(0.1, k=3),
        lambda: optim.sgd(0.1, k=3, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda: optim.adam(1e-3, k=3, weight_decay=1e-3),
    ],
    ids=["sgd", "sgd_nesterov_wd", "adam_wd"],
)
def test_float64_state_dtype_and_no_recompile(make):
    params = {"w": np.linspace(-1, 1, 6).reshape(3, 2), "b": np.zeros(2)}
    opt = make()
    state = opt.init(params)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)  # runs only while tracing
        grads = jax.tree_util.tree_map(lambda p: p * p + 1.0, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1
    for leaf in jax.tree_util.tree_leaves((params, state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == np.float64
        else:
            assert leaf.dtype == np.int32  # counts


# ------------------------------------------------------------------ PyTorch semantics


def _torch_sgd_reference(params, grads_seq, lr, momentum, nesterov, wd):
    """torch.optim.SGD (dampening 0, maximize False), as documented, in NumPy float64."""
    params = [p.copy() for p in params]
    bufs = [None] * len(params)
    for grads in grads_seq:
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + wd * p
            if momentum != 0:
                bufs[i] = d.copy() if bufs[i] is None else momentum * bufs[i] + d
                d = d + momentum * bufs[i] if nesterov else bufs[i]
            params[i] = p - lr * d
    return params


def _torch_adam_reference(params, grads_seq, lr, b1, b2, eps, wd):
    """torch.optim.Adam (amsgrad False, maximize False), as documented, in NumPy float64."""
    params = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_seq, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g + wd * p
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            params[i] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def _run_jax(opt, params, grads_seq):
    state = opt.init(params)
    step = jax.jit(lambda p, g, s: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
    for grads in grads_seq:
        params, state = step(params, grads, state)
    return params


def _problem(steps=6):
    rng = np.random.default_rng(2)
    params = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
    grads_seq = [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]
    return params, grads_seq


@pytest.mark.parametrize(
    "momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 5e-4), (0.5, False, 1e-2)]
)
def test_sgd_matches_torch_rules(momentum, nesterov, wd):
    params, grads_seq = _problem()
    want = _torch_sgd_reference(params, grads_seq, 0.1, momentum, nesterov, wd)
    got = _run_jax(optim.sgd(0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd), params, grads_seq)
    assert_tree_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam_matches_torch_rules(wd):
    params, grads_seq = _problem()
    want = _torch_adam_reference(params, grads_seq, 1e-2, 0.9, 0.999, 1e-8, wd)
    got = _run_jax(optim.adam(1e-2, weight_decay=wd), params, grads_seq)
    assert_tree_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_sgd_first_momentum_step_clones_gradient():
    """torch sets buf = d on step 1 (not mu*0 + d): a gradient of -0.0 stays -0.0 in the buffer."""
    params = {"w": np.ones(2, np.float32)}
    opt = optim.sgd(0.1, momentum=0.9)
    _, state = opt.update({"w": np.array([-0.0, 1.0], np.float32)}, opt.init(params), params)
    assert np.signbit(np.asarray(state[0].momentum_buffer["w"])[0])


# ------------------------------------------------------------------ trajectories (Table 5)


def _mlp_problem():
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "w1": jax.random.normal(k1, (8, 16), jnp.float32) / jnp.sqrt(jnp.float32(8)),
        "b1": jnp.zeros((16,), jnp.float32),
        "w2": jax.random.normal(k2, (16, 1), jnp.float32) / jnp.float32(4),
        "b2": jnp.zeros((1,), jnp.float32),
    }
    x = jax.random.normal(k3, (32, 8), jnp.float32)
    y = jnp.tanh(x @ jax.random.normal(k4, (8, 1), jnp.float32))
    return params, (x, y)


def _loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return jnp.mean((h @ params["w2"] + params["b2"][None, :] - y) ** 2)


@jax.jit
def _trajectory(params, batch, k):
    """100 full-batch steps of perturbed SGD with momentum 0.9, lr 0.1."""
    opt = optim.sgd(0.1, k=k, momentum=0.9)

    def body(carry, _):
        params, state = carry
        grads = jax.grad(_loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=100)
    return params


def test_trajectories_k_and_k_times_power_of_two_are_bitwise_identical():
    params, batch = _mlp_problem()
    run = lambda k: _trajectory(params, batch, jnp.asarray(k, jnp.int32))  # noqa: E731
    final = {k: run(k) for k in (1, 2, 3, 4, 6, 12, 24)}
    assert_tree_equal_bits(run(3), final[3], "same run twice")
    for k, k2 in [(1, 2), (1, 4), (3, 6), (3, 12), (3, 24)]:
        assert_tree_equal_bits(final[k], final[k2], f"k={k} vs k={k2}")
    d = ulp_diff(final[1], final[3])
    assert d.n_diff > 0, "k=1 and k=3 gave the same trajectory"
    assert float(_loss(final[1], batch)) < float(_loss(params, batch))  # it trains


# ------------------------------------------------------------------ rounding="paper": every operation rounds apart


def _np_paper_sgd(params, grads_seq, lr, k, mu, nesterov, wd):
    """The paper rounding of ``optim.sgd`` in NumPy float32: every product and sum rounded apart
    (NumPy never fuses a multiply with an add)."""
    f = np.float32
    lr, k, mu, wd = f(lr), f(k), f(mu), f(wd)
    q = lr / k
    p, b = params.copy(), None
    for g in grads_seq:
        d = g + wd * p
        if mu != 0:
            b = d.copy() if b is None else mu * b + d
            d = d + mu * b if nesterov else b
        p = p + (-(q * (k * d)))
    return p


@pytest.mark.parametrize("mu,nesterov,wd", [(0.9, False, 0.0), (0.9, True, 5e-4), (0.0, False, 1e-2)])
def test_paper_rounding_sgd_is_bitwise_every_operation_apart_when_jitted(mu, nesterov, wd):
    """XLA:CPU contracts ``g + wd*p`` and ``mu*b + g`` into fused multiply-adds inside a jitted
    step (23,613 of 100,000 float32 weight-decay terms differed before the products were kept
    rounded); the paper rounding must round each product."""
    rng = np.random.default_rng(5)
    params = (rng.standard_normal(4000) * 100).astype(np.float32)
    grads_seq = [rng.standard_normal(4000).astype(np.float32) for _ in range(4)]
    opt = optim.sgd(0.1, k=3, momentum=mu, nesterov=nesterov, weight_decay=wd)
    got = _run_jax(opt, params, grads_seq)
    want = _np_paper_sgd(params, grads_seq, 0.1, 3, mu, nesterov, wd)
    assert_tree_equal_bits(got, want)


def test_paper_rounding_adam_moments_are_bitwise_every_operation_apart_when_jitted():
    rng = np.random.default_rng(6)
    params = rng.standard_normal(4000).astype(np.float32)
    grads_seq = [rng.standard_normal(4000).astype(np.float32) for _ in range(3)]
    opt = optim.adam(1e-3, k=3, weight_decay=5e-4)
    state = opt.init(params)
    step = jax.jit(lambda p, g, s: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
    f = np.float32
    b1, b2, wd = f(0.9), f(0.999), f(5e-4)
    m, v, p = np.zeros_like(params), np.zeros_like(params), params
    for g in grads_seq:
        d = g + wd * p
        m = m + (f(1) - b1) * (d - m)
        v = b2 * v + (f(1) - b2) * (d * d)
        params, state = step(params, g, state)
        p = np.asarray(params)  # the update itself involves pow and sqrt; the moments are checked here
        adam_state = next(s for s in state if hasattr(s, "exp_avg"))
        assert_tree_equal_bits(adam_state.exp_avg, m)
        assert_tree_equal_bits(adam_state.exp_avg_sq, v)
