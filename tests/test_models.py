"""Models and losses: shapes, parameter counts, BN state, conv implementations, Eq. (6)/(8).

Independent references: published parameter counts, ``lax.conv`` for the single-channel
convolutions, a NumPy/SciPy re-computation of the one-layer network Eq. (6) and of its
gradient Eq. (8) in float64, NumPy formulas for the losses and for PyTorch's batch norm.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_equal_bits
from scipy import signal
from scipy.special import expit, log_expit, logsumexp

from eos_jax import losses, models
from eos_jax.errors import ConfigError
from eos_jax.models import layers, shifted

KEY = jax.random.key(0)


def _abstract_count(model: models.Model, shape) -> int:
    """Parameter count from shapes only (no RNG, no compile of the init)."""
    return models.count_params(jax.eval_shape(lambda k: model.init(k, shape), KEY))


# --- parameter counts (published / closed form) ------------------------------------


@pytest.mark.parametrize(
    "name,cfg,shape,expected",
    [
        # kuangliu/pytorch-cifar VGG('VGG16'): 13 convs with bias + Linear(512, 10).
        ("vgg16", {}, (32, 32, 3), 14_719_818),
        ("vgg16_bn", {}, (32, 32, 3), 14_728_266),
        # He et al. 2016 Table 6: ResNet-56 "0.85M" (853,018 in the PyTorch port).
        ("resnet56", {}, (32, 32, 3), 853_018),
        # Cohen et al. fc-tanh on CIFAR: 3072*200+200 + 200*200+200 + 200*10+10.
        ("fc", {}, (32, 32, 3), 656_810),
        # Paper Sec. 6.2: 3 single-channel 3x3 layers, no bias.
        ("cnn", {"layers": 3}, (28, 28, 1), 27),
        # Sec. 5.3: one 32x32 kernel.
        ("cnn", {"kernel_size": 32}, (256, 256, 1), 1024),
        (
            "cnn",
            {"layers": 2, "channels": (4, 8), "head": "linear", "num_outputs": 10, "in_channels": 3},
            (8, 8, 3),
            3 * 3 * 3 * 4 + 3 * 3 * 4 * 8 + 8 * 10 + 10,
        ),
    ],
)
def test_parameter_counts(name, cfg, shape, expected):
    assert _abstract_count(models.get(name, **cfg), shape) == expected


# --- shapes, finiteness, dtype, no recompilation -----------------------------------

SMALL = [
    ("cnn", {"layers": 3}, (12, 12, 1), 1, "float32"),
    ("cnn", {"layers": 3}, (12, 12, 1), 1, "float64"),
    (
        "cnn",
        {"layers": 2, "channels": 3, "head": "linear", "num_outputs": 4, "padding": "same"},
        (9, 9, 1),
        4,
        "float32",
    ),
    ("cnn", {"layers": 2, "head": "linear", "num_outputs": 3, "init": "jax"}, (9, 9, 1), 3, "float64"),
    ("fc", {"width": 16, "depth": 3}, (6, 6, 3), 10, "float64"),
]


@pytest.mark.parametrize("name,cfg,shape,n_out,dtype", SMALL)
def test_small_models_shape_dtype_and_no_recompile(name, cfg, shape, n_out, dtype):
    model = models.get(name, dtype=dtype, **cfg)
    variables = jax.jit(lambda k: model.init(k, shape))(KEY)  # one program (eagerly every op compiles)
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == np.dtype(dtype)
    traces = []

    def fwd(v, x):
        traces.append(1)
        return model.apply(v, x, train=True)

    f = jax.jit(fwd)
    x = jax.random.uniform(jax.random.key(1), (2 * math.prod(shape),), jnp.float32).reshape(2, *shape)
    logits, state = f(variables, x)
    assert logits.shape == (2, n_out) and logits.dtype == np.dtype(dtype)
    assert state == {}
    assert np.all(np.isfinite(np.asarray(logits)))
    f(variables, x + 1.0)
    assert len(traces) == 1, "apply retraced on a second call with the same shapes"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16_bn", "resnet56"])
def test_bn_models_init_apply_and_batch_stats(name):
    # Same modules and code paths as the full networks (whose counts are checked above),
    # shrunk so that the per-leaf RNG compile of init stays cheap: ResNet with one block
    # per stage (ResNet-8, still two option-A shortcuts), VGG with two conv stages.
    model = models.get(name, activation="swish", beta=2.0)
    small = {"vgg16_bn": {"cfg": (8, "M", 16, 16, "M")}, "resnet56": {"blocks_per_stage": 1}}[name]
    model = dataclasses.replace(model, module=model.module.clone(**small))
    variables = jax.jit(lambda k: model.init(k, (8, 8, 3)))(KEY)
    assert "batch_stats" in variables and model.info["batch_stats"]
    x = jax.random.normal(jax.random.key(2), (384,), jnp.float32).reshape(2, 8, 8, 3)
    apply = jax.jit(model.apply, static_argnames="train")
    logits, state = apply(variables, x, train=True)
    assert logits.shape == (2, 10) and np.all(np.isfinite(np.asarray(logits)))
    # train=True moves every running statistic; train=False returns them bitwise unchanged.
    for new, old in zip(
        jax.tree_util.tree_leaves(state["batch_stats"]), jax.tree_util.tree_leaves(variables["batch_stats"])
    ):
        assert not np.any(np.asarray(new) == np.asarray(old))
    logits_eval, state_eval = apply(variables, x, train=False)
    assert_tree_equal_bits(state_eval["batch_stats"], variables["batch_stats"])
    assert np.all(np.isfinite(np.asarray(logits_eval)))
    assert not np.allclose(logits_eval, logits)  # running vs batch statistics


def test_batch_norm_matches_pytorch_formulas():
    # Running mean/var as torch.nn.BatchNorm2d (momentum 0.1, unbiased running var), float64.
    from eos_jax.models.vgg import BatchNorm

    x = np.random.RandomState(0).randn(3, 4, 5, 2) * 3.0 + 1.0
    m = BatchNorm(train=True, dtype=jnp.float64)
    v = m.init(KEY, jnp.asarray(x))
    y, upd = m.apply(v, jnp.asarray(x), mutable=["batch_stats"])
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    n = 3 * 4 * 5
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-13)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-13)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-12, atol=1e-12)
    y_eval = BatchNorm(train=False, dtype=jnp.float64).apply(v, jnp.asarray(x))
    np.testing.assert_allclose(y_eval, x / np.sqrt(1.0 + 1e-5), rtol=1e-13)


def _resnet_cifar_count(blocks_per_stage: int, classes: int, shortcut: str) -> int:
    """Hand count of He et al.'s CIFAR ResNet from its layer shapes (bias-free convs, BN scale+shift)."""
    conv = lambda cin, cout, k: k * k * cin * cout  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total, cin = conv(3, 16, 3) + bn(16), 16
    for planes in (16, 32, 64):
        for _ in range(blocks_per_stage):
            total += conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if shortcut == "B" and cin != planes:  # authors' _make_layer: 1x1 conv + BN
                total += conv(cin, planes, 1) + bn(planes)
            cin = planes
    return total + 64 * classes + classes  # fc with bias


@pytest.mark.parametrize("name,shortcut,expected", [("resnet56", "A", 853_018), ("resnet56_authors", "B", 855_770)])
def test_resnet56_counts_match_a_hand_count_of_the_layers(name, shortcut, expected):
    assert _resnet_cifar_count(9, 10, shortcut) == expected  # the numbers the docstrings state
    assert _abstract_count(models.get(name), (32, 32, 3)) == expected


def test_resnet_authors_option_b_shortcut_and_init():
    # The authors' construction (instability/resnet.py): the projection exists exactly where the
    # shape changes; convs take "he_fan_out" and the fc PyTorch's default (values: next test).
    model = models.get("resnet56_authors")
    shapes = jax.eval_shape(lambda k: model.init(k, (32, 32, 3)), KEY)
    with_proj = sorted(b for b, leaves in shapes["params"].items() if "shortcut_conv" in leaves)
    assert with_proj == ["stage2_block0", "stage3_block0"]
    assert shapes["params"]["stage3_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 32, 64)
    assert "bias" not in shapes["params"]["stage3_block0"]["shortcut_conv"]
    assert sorted(shapes["batch_stats"]["stage2_block0"]) == ["bn1", "bn2", "shortcut_bn"]
    m = model.module
    assert (m.init_scheme, m.fc_init_scheme, m.shortcut) == ("he_fan_out", "pytorch", "B")
    assert models.get("resnet56").module.shortcut == "A" and models.get("resnet56").module.fc_init_scheme is None


def test_resnet_option_b_shortcut_is_conv1x1_then_batch_norm_and_he_init():
    from eos_jax.models.resnet import BasicBlock

    rs = np.random.RandomState(3)
    x = rs.randn(2, 6, 6, 32)
    block = BasicBlock(64, 2, "relu", 1.0, "he_fan_out", jnp.float64, shortcut="B")
    v = jax.tree_util.tree_map(np.asarray, jax.jit(block.init)(KEY, jnp.asarray(x)))
    # He fan-out init, N(0, 2 / (kh*kw*out)), as the authors' normal_(0, sqrt(2. / n)).
    for kernel, fan_out in (("conv1", 9 * 64), ("conv2", 9 * 64), ("shortcut_conv", 64)):
        k = v["params"][kernel]["kernel"]
        assert abs(k.std() / math.sqrt(2.0 / fan_out) - 1.0) < 0.05 and abs(k.mean()) < 0.05 * k.std()
    assert np.all(v["params"]["shortcut_bn"]["scale"] == 1) and not np.any(v["params"]["shortcut_bn"]["bias"])
    # With conv2 = 0 and running mean 0 the residual branch is bn2's shift, 0: the block is
    # relu(BN(x[:, ::2, ::2] @ W)), recomputed here in NumPy (float64, eval mode).
    w, scale, shift, var = rs.randn(32, 64), rs.rand(64) + 0.5, rs.randn(64), rs.rand(64) + 0.5
    v["params"]["conv2"]["kernel"] = np.zeros_like(v["params"]["conv2"]["kernel"])
    v["params"]["shortcut_conv"]["kernel"] = w[None, None]
    v["params"]["shortcut_bn"] = {"scale": scale, "bias": shift}
    v["batch_stats"]["shortcut_bn"] = {"mean": np.zeros(64), "var": var}
    y = np.asarray(jax.jit(lambda v, x: block.apply(v, x, train=False))(v, jnp.asarray(x)))
    ref = np.maximum((x[:, ::2, ::2, :] @ w) * scale / np.sqrt(var + 1e-5) + shift, 0.0)
    assert y.shape == (2, 3, 3, 64)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_resnet_option_a_shortcut_is_parameter_free():
    params = jax.eval_shape(lambda k: models.get("resnet56").init(k, (32, 32, 3)), KEY)["params"]
    block = params["stage2_block0"]
    assert sorted(block) == ["bn1", "bn2", "conv1", "conv2"]  # no projection conv
    assert block["conv1"]["kernel"].shape == (3, 3, 16, 32)
    assert "bias" not in block["conv1"]


# --- convolution implementations --------------------------------------------------


@pytest.mark.parametrize("impl", ["shifted", "fft"])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-6), (jnp.float64, 1e-13)])
def test_single_channel_conv_matches_lax(impl, dtype, rtol):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(3, 10, 9, 1), dtype)

    @jax.jit
    def run(kk, xx):
        outs = {}
        for which in ("lax", impl):

            def f(k_, x_, which=which):
                return jnp.sum(jnp.tanh(layers.conv2d(x_, k_, padding=padding, impl=which)))

            outs[which] = (layers.conv2d(xx, kk, padding=padding, impl=which), jax.grad(f, (0, 1))(kk, xx))
        scale = layers.conv2d(jnp.abs(xx), jnp.abs(kk), padding=padding, impl="lax")
        return outs, scale

    for ksize, padding in (((3, 3), "valid"), ((3, 3), "same"), ((4, 2), "same"), ((1, 1), "valid")):
        k = jnp.asarray(rs.randn(*ksize, 1, 1), dtype)
        outs, scale = run(k, x)
        (ref, g_ref), (out, g) = outs["lax"], outs[impl]
        assert out.shape == ref.shape and out.dtype == ref.dtype
        # Rounding scale: sum of |terms| per output for the direct sum; the FFT's error is
        # global (relative to the largest such sum), not per output.
        scale = np.asarray(scale) if impl == "shifted" else 4 * np.max(np.asarray(scale))
        err = np.abs(np.asarray(out - ref))
        assert np.all(err <= rtol * scale), f"{ksize} {padding}: max err {err.max()}"
        for a, b_ in zip(g, g_ref):
            np.testing.assert_allclose(a, b_, rtol=50 * rtol, atol=50 * rtol * float(jnp.max(jnp.abs(b_))))


def test_conv_impl_choice_is_recorded_and_validated():
    assert models.get("cnn", layers=3).info["conv_impl_per_layer"] == ["shifted"] * 3
    assert models.get("cnn", kernel_size=32).info["conv_impl"] == "fft"
    assert models.get("cnn", conv_impl="lax").info["conv_impl"] == "lax"
    m = models.get("cnn", layers=2, channels=(2, 1))
    assert m.info["conv_impl_per_layer"] == ["lax", "lax"] and m.info["conv_impl"] == "lax"
    assert layers.resolve_conv_impl("auto", 1, 1, (5, 5)) == "fft"
    with pytest.raises(ConfigError, match="conv_impl='shifted'"):
        models.get("cnn", channels=2, conv_impl="shifted")
    with pytest.raises(ConfigError, match="'winograd'"):
        models.get("cnn", conv_impl="winograd")


def test_cnn_impls_agree_in_a_full_model():
    x = jax.random.normal(jax.random.key(3), (242,), jnp.float64).reshape(2, 11, 11, 1)
    outs = {}
    for impl in ("lax", "shifted", "fft"):
        m = models.get("cnn", layers=3, padding="same", conv_impl=impl, dtype="float64")
        # Compiled (eagerly every op compiles on its own); the same params for every impl (init is impl-free).
        outs[impl] = jax.jit(lambda k, xx, m=m: m.apply(m.init(k, (11, 11, 1)), xx, train=False)[0])(KEY, x)
    np.testing.assert_allclose(outs["shifted"], outs["lax"], rtol=1e-12)
    np.testing.assert_allclose(outs["fft"], outs["lax"], rtol=1e-12)


# --- Eq. (6) and Eq. (8) on a checkerboard, float64 --------------------------------


def _swish(z, beta):
    return z * expit(beta * z)


def _swish_prime(z, beta):
    s = expit(beta * z)
    return s + beta * z * s * (1.0 - s)


@pytest.mark.parametrize("pool", ["mean", "sum"])
@pytest.mark.parametrize("impl", ["lax", "shifted", "fft"])
def test_one_layer_cnn_matches_eq6_and_eq8(impl, pool):
    size, ks, beta, alpha = 24, 6, 1.5, 0.3
    checker = np.where((np.arange(size)[:, None] + np.arange(size)[None, :]) % 2 == 0, 1.0, -1.0)
    # mean: the authors' AvgPooling (a larger kernel keeps yhat away from 0 and 1 as well).
    model = models.get(
        "cnn",
        kernel_size=ks,
        beta=beta,
        init="normal",
        init_std=0.02 if pool == "sum" else 0.5,
        conv_impl=impl,
        pool=pool,
        dtype="float64",
    )
    params = jax.jit(lambda k: model.init(k, (size, size, 1))["params"])(KEY)
    kernel = np.asarray(params["conv0"]["kernel"])[:, :, 0, 0]
    # A checkerboard with a column ramp so that K*I crosses zero (transitioning regime).
    x = jnp.asarray(checker[None, :, :, None] * np.linspace(0.5, 1.5, size)[None, None, :, None])
    image = np.asarray(x)[0, :, :, 0]

    @jax.jit
    def loss_grad_logit(p, labels):
        def loss(pp):
            logits, _ = model.apply({"params": pp}, x, train=False)
            decay = 0.5 * alpha * jnp.sum(jnp.square(pp["conv0"]["kernel"]))
            return losses.binary_cross_entropy(logits, labels) + decay, logits

        (value, logits), grad = jax.value_and_grad(loss, has_aux=True)(p)
        return value, grad, logits

    # Eq. (6): yhat = s(g), g = sum_x r(K * I)(x) (or the mean over the P output positions,
    # the authors' AvgPooling), * = cross-correlation.
    z = signal.correlate2d(image, kernel, mode="valid")
    scale = 1.0 / z.size if pool == "mean" else 1.0
    g = np.sum(_swish(z, beta)) * scale
    yhat = expit(g)
    assert 0.05 < yhat < 0.95  # both labels give a data term in Eq. (8)
    for y in (0, 1):
        value, grad, logits = loss_grad_logit(params, jnp.asarray([y], jnp.int32))
        np.testing.assert_allclose(float(logits[0, 0]), g, rtol=1e-12)
        ref_loss = -(y * log_expit(g) + (1 - y) * log_expit(-g)) + 0.5 * alpha * np.sum(kernel**2)
        np.testing.assert_allclose(float(value), ref_loss, rtol=1e-12)
        # Eq. (8): dL/dK = (yhat - y) r'(K * I) * I + alpha K (correlation of I with r'(K*I)).
        # With the mean the data term carries 1/P (the authors' AvgPooling.backward divides by H and W).
        ref_grad = scale * (yhat - y) * signal.correlate2d(image, _swish_prime(z, beta), mode="valid") + alpha * kernel
        np.testing.assert_allclose(
            np.asarray(grad["conv0"]["kernel"])[:, :, 0, 0], ref_grad, rtol=1e-10, atol=1e-12 * np.max(np.abs(ref_grad))
        )


# --- initialization ----------------------------------------------------------------


def test_pytorch_init_bounds_and_jax_init():
    v = models.get("fc", width=64, depth=1, num_outputs=5).init(KEY, (4, 4, 2))["params"]
    for layer, fan_in in (("dense0", 32), ("out", 64)):
        bound = 1.0 / math.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            a = np.asarray(v[layer][leaf])
            assert np.max(np.abs(a)) <= bound
            assert np.max(np.abs(a)) > 0.8 * bound  # uniform over the whole interval
    k = np.asarray(v["dense0"]["kernel"])
    assert abs(k.std() - 1.0 / math.sqrt(3 * 32)) < 0.1 / math.sqrt(32)  # U(-b, b) std b/sqrt(3)
    vj = models.get("fc", width=64, depth=1, num_outputs=5, init="jax").init(KEY, (4, 4, 2))["params"]
    assert not np.any(np.asarray(vj["dense0"]["bias"]))
    conv = models.get("vgg16", init="pytorch")
    shapes = jax.eval_shape(lambda kk: conv.init(kk, (32, 32, 3)), KEY)["params"]
    assert shapes["conv0"]["kernel"].shape == (3, 3, 3, 64)


def test_normal_init_for_the_pde_kernel():
    m = models.get("cnn", kernel_size=32, init="normal", dtype="float64")
    k = np.asarray(m.init(KEY, (40, 40, 1))["params"]["conv0"]["kernel"])
    assert k.dtype == np.float64 and abs(k.std() - 1.0) < 0.1 and abs(k.mean()) < 0.1
    k2 = np.asarray(
        models.get("cnn", kernel_size=32, init="normal", init_std=0.5, dtype="float64").init(KEY, (40, 40, 1))[
            "params"
        ]["conv0"]["kernel"]
    )
    np.testing.assert_allclose(k2, 0.5 * k, rtol=1e-15)


def test_activations():
    z = jnp.asarray(np.linspace(-6, 6, 25))
    np.testing.assert_allclose(layers.make_activation("swish", 2.5)(z), _swish(np.asarray(z), 2.5), rtol=1e-14)
    np.testing.assert_array_equal(layers.make_activation("relu")(z), np.maximum(np.asarray(z), 0))
    np.testing.assert_allclose(layers.make_activation("tanh")(z), np.tanh(np.asarray(z)), rtol=1e-15)


@pytest.mark.parametrize(
    "name,cfg,match",
    [
        ("resnet", {}, "model name='resnet'"),
        ("cnn", {"layer": 2}, "unknown option"),
        ("cnn", {"padding": "full"}, "padding='full'"),
        ("cnn", {"pool": "max"}, "pool='max'"),
        ("cnn", {"activation": "gelu"}, "activation='gelu'"),
        ("cnn", {"beta": 0.0}, "beta=0.0"),
        ("cnn", {"num_outputs": 3}, "head='linear'"),
        ("cnn", {"layers": 3, "channels": (1, 2)}, "channels="),
        ("fc", {"width": 0}, "width=0"),
        ("vgg16", {"init": "xavier"}, "init='xavier'"),
        ("resnet56", {"dtype": "float16"}, "dtype='float16'"),
    ],
)
def test_bad_config_raises_one_line_error(name, cfg, match):
    with pytest.raises(ConfigError, match=match):
        models.get(name, **cfg)


def test_bad_input_shape():
    m = models.get("cnn")
    with pytest.raises(ConfigError, match="3 channels"):
        m.init(KEY, (8, 8, 3))
    with pytest.raises(ConfigError, match="input_shape"):
        m.init(KEY, (8, 8))


def test_info_is_json_able():
    import json

    for name in models.names():
        json.dumps(models.get(name).info)


# --- losses ------------------------------------------------------------------------


def test_binary_cross_entropy_matches_numpy_and_is_stable():
    z = np.array([-30.0, -2.0, -0.1, 0.0, 0.7, 5.0, 40.0])
    y = np.array([1, 0, 1, 0, 1, 1, 0], np.int32)
    ref = np.mean(-(y * log_expit(z) + (1 - y) * log_expit(-z)))
    out = losses.binary_cross_entropy(jnp.asarray(z)[:, None], jnp.asarray(y))
    np.testing.assert_allclose(float(out), ref, rtol=1e-14)
    g = jax.grad(lambda zz: losses.binary_cross_entropy(zz, jnp.asarray(y)))(jnp.asarray(z))
    np.testing.assert_allclose(g, (expit(z) - y) / len(z), rtol=1e-13, atol=1e-300)
    big = losses.binary_cross_entropy(jnp.asarray([100.0, -100.0], jnp.float32), jnp.asarray([1, 1], jnp.int32))
    assert big.dtype == jnp.float32 and np.isfinite(float(big)) and abs(float(big) - 50.0) < 1e-4
    tiny = losses.binary_cross_entropy(jnp.asarray([60.0]), jnp.asarray([1], jnp.int32))
    np.testing.assert_allclose(float(tiny), np.exp(-60.0), rtol=1e-12)  # not rounded to 0


def test_cross_entropy_and_mse_match_numpy():
    rs = np.random.RandomState(0)
    z = rs.randn(5, 4) * 3
    y = np.array([0, 3, 1, 1, 2], np.int32)
    ce = np.mean(logsumexp(z, axis=1) - z[np.arange(5), y])
    np.testing.assert_allclose(float(losses.cross_entropy(jnp.asarray(z), jnp.asarray(y))), ce, rtol=1e-14)
    onehot = np.eye(4)[y]
    mse = np.mean(0.5 * np.sum((z - onehot) ** 2, axis=1))  # Cohen et al.: 0.5 * sum over classes
    np.testing.assert_allclose(float(losses.mse(jnp.asarray(z), jnp.asarray(y), 4)), mse, rtol=1e-14)
    z32 = jnp.asarray(z, jnp.float32)
    assert losses.cross_entropy(z32, jnp.asarray(y)).dtype == jnp.float32
    assert losses.mse(z32, jnp.asarray(y), 4).dtype == jnp.float32
    with pytest.raises(ConfigError, match="num_classes=3"):
        losses.mse(z32, jnp.asarray(y), 3)
    with pytest.raises(ConfigError, match="integer"):
        losses.cross_entropy(z32, jnp.asarray(y, jnp.float32))


def test_kernel_inits_draw_flat_with_the_bits_of_a_shaped_draw():
    """make_kernel_init draws one flat vector (a rank-4 threefry draw compiles ~15x slower): the
    bits equal the shaped draws it replaces, flax's lecun_normal and normal among them."""
    from flax import linen as nn

    cases = []
    for dtype in (jnp.float32, jnp.float64):
        for shape in [(2, 2, 2, 2), (4, 3)]:  # small: a shaped rank-4 draw of 60 numbers compiles for 1.3 s
            fan_in, fan_out = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
            bound = 1.0 / math.sqrt(fan_in)
            refs = {
                "pytorch": lambda k, s, d, b=bound: jax.random.uniform(k, s, d, -b, b),
                "jax": nn.initializers.lecun_normal(),
                "normal": nn.initializers.normal(stddev=0.3),
                "he_fan_out": lambda k, s, d, f=fan_out: math.sqrt(2.0 / f) * jax.random.normal(k, s, d),
            }
            cases += [(layers.make_kernel_init(name, std=0.3), ref, shape, dtype) for name, ref in refs.items()]

    def draws(key):  # one program for every case
        return [(ours(key, shape, dtype), ref(key, shape, dtype)) for ours, ref, shape, dtype in cases]

    for (got, want), (_, _, shape, dtype) in zip(jax.jit(draws)(jax.random.key(5)), cases):
        assert got.shape == shape and got.dtype == dtype
        assert_tree_equal_bits(got, want)


def test_materialize_is_the_identity_bit_for_bit_and_for_derivatives():
    bits = np.array([0x3FC00000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 2, 0x80000003], np.uint32)
    x = jnp.asarray(bits.view(np.float32))  # 1.5, -0, +-inf, NaNs with payloads, subnormals
    for f in (layers.materialize, jax.jit(layers.materialize)):
        assert np.array_equal(np.asarray(f(x)).view(np.uint32), bits)
    lanes = jnp.stack([x, x[::-1]])  # one lane starts with a NaN (its loop makes no trip)
    out = jax.jit(jax.vmap(layers.materialize))(lanes)
    assert np.array_equal(np.asarray(out).view(np.uint32), np.asarray(lanes).view(np.uint32))
    x64 = jnp.asarray(np.array([1.0, -0.0, 5e-324], np.float64)) if jax.config.jax_enable_x64 else None
    if x64 is not None:
        assert np.array_equal(
            np.asarray(jax.jit(layers.materialize)(x64)).view(np.uint64), np.asarray(x64).view(np.uint64)
        )
    v = jnp.array([1.0, -2.0, 3.0], jnp.float32)
    f = lambda w: jnp.sum(jnp.tanh(layers.materialize(w * w)))  # noqa: E731
    g = lambda w: jnp.sum(jnp.tanh(w * w))  # noqa: E731
    assert np.array_equal(np.asarray(jax.grad(f)(v)), np.asarray(jax.grad(g)(v)))
    hvp = lambda fn: jax.jvp(jax.grad(fn), (v,), (jnp.ones_like(v),))[1]  # noqa: E731
    assert np.array_equal(np.asarray(jax.jit(lambda: hvp(f))()), np.asarray(jax.jit(lambda: hvp(g))()))


def test_materialize_tangents_is_the_identity_and_leaves_gradients_alone():
    bits = np.array([0x3FC00000, 0x80000000, 0x7F800000, 0x7FC00000, 2, 0x80000003], np.uint32)
    x = jnp.asarray(bits.view(np.float32))  # 1.5, -0, inf, NaN, subnormals
    for f in (layers.materialize_tangents, jax.jit(layers.materialize_tangents)):
        assert np.array_equal(np.asarray(f(x)).view(np.uint32), bits)
    v = jnp.array([0.5, -2.0, 3.0], jnp.float32)
    f = lambda w: jnp.sum(jnp.tanh(layers.materialize_tangents(w * w)) * w)  # noqa: E731
    g = lambda w: jnp.sum(jnp.tanh(w * w) * w)  # noqa: E731
    assert np.array_equal(np.asarray(jax.jit(jax.grad(f))(v)), np.asarray(jax.jit(jax.grad(g))(v)))
    # A gradient compiles to the program it would be without it: no while loop; a
    # Hessian-vector product keeps the value, its cotangent and both tangents (loops).
    assert " while(" not in jax.jit(jax.grad(f)).lower(v).compile().as_text()
    hvp = lambda fn: jax.jit(lambda w, t: jax.jvp(jax.grad(fn), (w,), (t,))[1])  # noqa: E731
    t = jnp.array([1.0, 0.5, -1.0], jnp.float32)
    assert " while(" in hvp(f).lower(v, t).compile().as_text()
    np.testing.assert_allclose(np.asarray(hvp(f)(v, t)), np.asarray(jax.hessian(g)(v) @ t), rtol=1e-5)
    # Lanes (vmap) and a Hessian through jax.hessian work too.
    np.testing.assert_allclose(np.asarray(jax.hessian(f)(v)), np.asarray(jax.hessian(g)(v)), rtol=1e-5)
    lanes = jnp.stack([v, 2 * v])
    assert np.array_equal(np.asarray(jax.vmap(jax.grad(f))(lanes)), np.asarray(jax.vmap(jax.grad(g))(lanes)))


def test_cnn_hvp_keeps_activations_and_the_gradient_keeps_its_bits(monkeypatch):
    """Shifted convolutions pass their inputs through materialize_tangents: the 3-layer CNN's gradient
    is bit for bit the one without, its HVP agrees with the dense Hessian, and the HVP's fusions
    no longer recompute a layer inside the next one's slices (measured: at most 36 slices per
    fusion with it, 90 without, on this size)."""
    import re

    import jax.flatten_util

    from eos_jax import hessian

    model = models.get("cnn", layers=3, kernel_size=3, activation="swish")
    key = jax.random.key(0)
    x = jax.random.uniform(key, (32 * 10 * 10,), jnp.float32).reshape(32, 10, 10, 1)
    y = (jnp.arange(32) % 2).astype(jnp.int32)
    params = jax.jit(lambda k: model.init(k, (10, 10, 1)))(key)["params"]

    def loss(p, b):
        return losses.binary_cross_entropy(model.apply({"params": p}, b[0], train=True)[0][:, 0], b[1])

    t = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.1), params)

    def most_slices(hlo: str) -> int:
        return max(c.count(" slice(") for c in re.split(r"\n(?=\S)", hlo) if "fused_computation" in c.split("\n")[0])

    def run():
        grad = jax.jit(jax.grad(loss))
        hv = jax.jit(lambda p, b, v: hessian.hvp(loss, p, b, v))
        return grad(params, (x, y)), hv(params, (x, y), t), hv.lower(params, (x, y), t).compile().as_text()

    g_with, h_with, hlo_with = run()
    monkeypatch.setattr(layers, "materialize_tangents", lambda a: a)
    g_without, h_without, hlo_without = run()
    assert_tree_equal_bits(g_with, g_without)
    # 2 activations x 2 loops (the value with its tangent, the cotangent with its tangent); the
    # first layer's input is data, not differentiated: no loop
    assert hlo_with.count(" while(") == 4 and hlo_without.count(" while(") == 0
    assert most_slices(hlo_with) < most_slices(hlo_without), (most_slices(hlo_with), most_slices(hlo_without))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    dense = jax.jit(jax.hessian(lambda w: loss(unravel(w), (x, y))))(flat)
    ref = np.asarray(dense, np.float64) @ np.asarray(jax.flatten_util.ravel_pytree(t)[0], np.float64)
    for h in (h_with, h_without):
        np.testing.assert_allclose(np.asarray(jax.flatten_util.ravel_pytree(h)[0]), ref, rtol=2e-4, atol=1e-6)


def test_kernel_gradient_tangent_runs_in_one_pass_and_matches_autodiff():
    """The shifted convolution's kernel gradient keeps its nine reductions (the gradient's bits);
    its tangent (what a Hessian-vector product needs) is one variadic reduction over each
    example's positions, equal to the autodiff tangent of the nine reductions to float32
    rounding, under jit and vmap."""
    rs = np.random.RandomState(3)
    g, dg = (jnp.asarray(rs.randn(5, 6, 6).astype(np.float32)) for _ in range(2))
    x, dx = (jnp.asarray(rs.randn(5, 8, 8).astype(np.float32)) for _ in range(2))

    def plain(g, x):
        return jnp.stack([jnp.stack([jnp.sum(g * x[:, i : i + 6, j : j + 6]) for j in range(3)]) for i in range(3)])

    ours = lambda g, x: shifted.kernel_grad_nhw(g, x, (3, 3))  # noqa: E731
    assert np.array_equal(np.asarray(jax.jit(ours)(g, x)), np.asarray(jax.jit(plain)(g, x)))
    jvp = lambda f: jax.jit(lambda *a: jax.jvp(f, a[:2], a[2:]))  # noqa: E731
    (p1, t1), (p2, t2) = jvp(ours)(g, x, dg, dx), jvp(plain)(g, x, dg, dx)
    assert np.array_equal(np.asarray(p1), np.asarray(p2))
    g64, x64, dg64, dx64 = (np.asarray(a, np.float64) for a in (g, x, dg, dx))
    ref = np.array(
        [
            [np.sum(dg64 * x64[:, i : i + 6, j : j + 6] + g64 * dx64[:, i : i + 6, j : j + 6]) for j in range(3)]
            for i in range(3)
        ]
    )
    scale = np.sum(np.abs(dg64)) * np.abs(x64).max() + np.sum(np.abs(g64)) * np.abs(dx64).max()
    for t in (t1, t2):
        np.testing.assert_allclose(np.asarray(t, np.float64), ref, rtol=0, atol=1e-6 * scale)
    hlo = jax.jit(lambda *a: jax.jvp(ours, a[:2], a[2:])[1]).lower(g, x, dg, dx).compile().as_text()
    assert re.search(r"\(f32\[5\]\{0\}, f32\[5\]\{0\}, f32\[5\]\{0\}, f32\[5\]\{0\}", hlo), "no variadic reduce"
    lanes = jax.vmap(lambda a, b, c, d: jax.jvp(ours, (a, b), (c, d))[1])(
        jnp.stack([g, g]), jnp.stack([x, x]), jnp.stack([dg, -dg]), jnp.stack([dx, -dx])
    )
    np.testing.assert_allclose(np.asarray(lanes[0], np.float64), ref, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(np.asarray(lanes[1], np.float64), -ref, rtol=0, atol=1e-6 * scale)


def _resnet_step():
    model = models.get("resnet56")
    model = dataclasses.replace(model, module=model.module.clone(blocks_per_stage=2))
    key = jax.random.key(0)
    x = jax.random.normal(key, (8 * 16 * 16 * 3,), jnp.float32).reshape(8, 16, 16, 3)
    y = jnp.arange(8, dtype=jnp.int32) % 10
    v = jax.jit(lambda k: model.init(k, (16, 16, 3)))(key)

    def step(v, x, y):
        def loss(p):
            logits, new = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True)
            return losses.cross_entropy(logits, y), new

        (l, new), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        return jax.tree_util.tree_map(lambda p, g: p - jnp.float32(0.1) * g, v["params"], g), new, l

    jitted = jax.jit(step)
    return jitted(v, x, y), jitted.lower(v, x, y).compile().as_text()


def test_resnet_residual_stream_is_materialized_with_the_same_bits(monkeypatch):
    """ResNet-14's train step with its block outputs materialized (one while loop each, kept by
    XLA) equals the step without, bit for bit; without, XLA fuses a stage's whole residual chain
    into single fusions (many more operands per fusion)."""
    import re

    from eos_jax.models import resnet

    def widest_fusion(hlo: str) -> int:
        return max(line.count("%") - 1 for line in hlo.splitlines() if re.search(r"= \S+ fusion\(", line))

    with_out, with_hlo = _resnet_step()
    monkeypatch.setattr(resnet, "materialize", lambda x: x)
    without_out, without_hlo = _resnet_step()
    assert_tree_equal_bits(with_out, without_out)
    assert with_hlo.count(" while(") == 1 + 3 * 2  # the stem and every block
    assert without_hlo.count(" while(") == 0
    assert widest_fusion(with_hlo) < widest_fusion(without_hlo), (widest_fusion(with_hlo), widest_fusion(without_hlo))
