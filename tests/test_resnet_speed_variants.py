"""ResNet-56's opt-in one-pass batch statistics (``models.get("resnet56", bn_stats="one_pass")``).

The default stays two-pass, with its metadata as before; one pass computes the same function up to
float32 rounding (forward, running statistics, gradients), and a bad value is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eos_jax import models
from eos_jax.errors import ConfigError
from eos_jax.models.resnet import ResNetCifar
from eos_jax.models.vgg import BatchNorm


def test_the_default_is_two_pass_and_its_metadata_is_unchanged():
    model = models.get("resnet56")
    assert model.module.bn_stats == "two_pass"
    assert "bn_stats" not in model.info and "bn_stats" not in model.info["config"]
    opted = models.get("resnet56", bn_stats="one_pass")
    assert opted.module.bn_stats == "one_pass"
    assert opted.info["bn_stats"] == opted.info["config"]["bn_stats"] == "one_pass"


def test_a_bad_value_is_refused():
    with pytest.raises(ConfigError, match="bn_stats='three_pass'"):
        models.get("resnet56", bn_stats="three_pass")


def test_one_pass_batch_norm_matches_two_pass_to_rounding():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (8 * 5 * 5 * 4,), jnp.float32).reshape(8, 5, 5, 4)
    variables = {
        "params": {
            "scale": jnp.linspace(0.5, 2.0, 4, dtype=jnp.float32),
            "bias": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32),
        },
        "batch_stats": {"mean": jnp.zeros(4, jnp.float32), "var": jnp.ones(4, jnp.float32)},
    }
    outs = {
        stats: jax.jit(lambda v, x, s=stats: BatchNorm(True, stats=s).apply(v, x, mutable=["batch_stats"]))(
            variables, x
        )
        for stats in ("two_pass", "one_pass")
    }
    (y2, s2), (y1, s1) = outs["two_pass"], outs["one_pass"]
    np.testing.assert_allclose(y1, y2, rtol=0, atol=2e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s1["batch_stats"][k], s2["batch_stats"][k], rtol=2e-5)


def test_a_small_resnet_trains_the_same_function_with_one_pass_statistics():
    """ResNet-8 (one block per stage) on 4 random 8x8 images: logits and gradients agree to float32 rounding."""
    x = jax.random.normal(jax.random.PRNGKey(1), (4 * 8 * 8 * 3,), jnp.float32).reshape(4, 8, 8, 3)
    nets = {s: ResNetCifar(1, 10, "relu", 1.0, "pytorch", jnp.float32, bn_stats=s) for s in ("two_pass", "one_pass")}
    variables = jax.jit(nets["two_pass"].init)(jax.random.PRNGKey(0), x)  # one program, not op by op

    def loss(params, net):
        logits, _ = net.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.square(logits))

    grads = {
        s: jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], net) for s, net in nets.items()
    }
    (l2, g2), (l1, g1) = grads["two_pass"], grads["one_pass"]
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(b))))
