"""VGG16 and VGG16-BN for 32x32 inputs (the CIFAR variant of Simonyan & Zisserman 2014).

Thirteen 3x3 convolutions (padding 1, with bias) in five stages
``64,64 | 128,128 | 256x3 | 512x3 | 512x3``, each stage ended by 2x2 max pooling, so a
32x32 input ends as 1x1x512; then ONE linear layer 512 -> num_classes. This is the
head of the widely used CIFAR VGG (kuangliu/pytorch-cifar ``models/vgg.py``), whose
parameter counts are 14,719,818 (``vgg16``) and 14,728,266 (``vgg16_bn``: + BN scale
and shift). With BN: conv -> BN -> activation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from eos_jax.models.layers import Conv, Dense, check_choice, make_activation

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Batch norm as PyTorch's BatchNorm2d: running = (1 - 0.1) * running + 0.1 * batch, eps 1e-5
# (PyTorch's momentum convention; 1 - 0.1 == 0.9 exactly in Python floats).
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5
# How training-mode batch norm computes its statistics (see BatchNorm): "two_pass", the default, or "one_pass".
BN_STATS = ("two_pass", "one_pass")


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over the last axis of NHWC inputs.

    Training normalizes with the batch mean and the biased batch variance (two-pass:
    ``mean((x - mean)^2)``, no ``E[x^2] - E[x]^2`` cancellation) and updates the
    running statistics with the UNBIASED variance ``var * n / (n - 1)`` as PyTorch
    does (flax's BatchNorm uses the biased one). Evaluation uses the running ones.

    ``stats="one_pass"`` (opt-in; other bits than the default) reads ``x`` once for both
    statistics, ``var = max(mean(x^2) - mean(x)^2, 0)``, and normalizes with one multiply-add per
    element, ``x * inv + (bias - mean * inv)`` with ``inv = scale / sqrt(var + eps)`` (batch norm
    folded into a per-channel scale and shift). It saves a pass over the activations forward and
    backward: ResNet-56's SGD step (batch 128, 2-core CPU) took PyTorch's time over 0.77-0.79 of it
    against 0.72-0.74 with two passes (``benchmarks/bench_models.py --variants``, four runs), about 6 %
    shorter. It loses accuracy where a channel's mean is large against its spread:
    ``mean(x^2) - mean(x)^2`` cancels, with an error of about float32's epsilon times ``mean^2`` in
    the variance (after one such ResNet-56 step the parameters differ from two-pass ones by a RelL1 of
    4e-5). Evaluation mode is the same either way.

    Examples:
      A batch of the two values 1 and 3: mean 2, biased variance 1, unbiased 2, so the
      running statistics become ``0.1 * 2 = 0.2`` and ``0.9 * 1 + 0.1 * 2 = 1.1``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.vgg import BatchNorm
      >>> x = jnp.array([1.0, 3.0]).reshape(2, 1, 1, 1)
      >>> bn = BatchNorm(train=True)
      >>> variables = {"params": {"scale": jnp.ones(1), "bias": jnp.zeros(1)},
      ...              "batch_stats": {"mean": jnp.zeros(1), "var": jnp.ones(1)}}
      >>> y, new = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, x)
      >>> [round(float(v), 4) for v in y.ravel()]  # (x - 2) / sqrt(1 + eps), eps = 1e-5
      [-1.0, 1.0]
      >>> round(float(new["batch_stats"]["mean"][0]), 6), round(float(new["batch_stats"]["var"][0]), 6)
      (0.2, 1.1)

      One pass gives the same statistics here (``mean(x^2) = 5``, ``5 - 2^2 = 1``):

      >>> y1, new1 = jax.jit(lambda v, x: BatchNorm(train=True, stats="one_pass").apply(v, x, mutable=["batch_stats"]))(variables, x)
      >>> [round(float(v), 4) for v in y1.ravel()], round(float(new1["batch_stats"]["var"][0]), 6)
      ([-1.0, 1.0], 1.1)
    """

    train: bool
    dtype: Any = jnp.float32
    stats: str = "two_pass"  # or "one_pass" (see above)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.dtype))
        check_choice("bn_stats", self.stats, BN_STATS)
        one_pass = self.train and self.stats == "one_pass"
        if self.train:
            n = x.size // c
            mean = jnp.mean(x, axis=(0, 1, 2))
            if one_pass:
                var = jnp.maximum(jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
            else:
                var = jnp.mean(jnp.square(x - mean[None, None, None, :]), axis=(0, 1, 2))
            if not self.is_initializing():
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1.0 - BN_MOMENTUM) * ra_mean.value + BN_MOMENTUM * mean
                ra_var.value = (1.0 - BN_MOMENTUM) * ra_var.value + BN_MOMENTUM * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = scale * lax.rsqrt(var + BN_EPSILON)
        if one_pass:
            return x * inv[None, None, None, :] + (bias - mean * inv)[None, None, None, :]
        return (x - mean[None, None, None, :]) * inv[None, None, None, :] + bias[None, None, None, :]


def batch_norm(train: bool, dtype: Any, name: str, stats: str = "two_pass") -> BatchNorm:
    """PyTorch-equivalent batch norm layer (see :class:`BatchNorm`; ``stats``: how training computes its statistics).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.models.vgg import batch_norm
      >>> bn = batch_norm(False, jnp.float32, "bn0")
      >>> type(bn).__name__, bn.train, bn.name
      ('BatchNorm', False, 'bn0')
    """
    return BatchNorm(train, dtype, stats, name=name)


class VGG(nn.Module):
    """VGG for 32x32 inputs with a single linear classifier.

    Examples:
      VGG16 for CIFAR-10 (the kuangliu/pytorch-cifar count), from shapes only:

      >>> import jax
      >>> from eos_jax import models
      >>> vgg = models.get("vgg16")
      >>> type(vgg.module).__name__
      'VGG'
      >>> shapes = jax.eval_shape(lambda key: vgg.init(key, (32, 32, 3)), jax.random.PRNGKey(0))
      >>> models.count_params(shapes)
      14719818
    """

    cfg: tuple[Any, ...]
    num_outputs: int
    batch_norm: bool
    activation: str
    beta: float
    init_scheme: str
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = make_activation(self.activation, self.beta)
        i = 0
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = Conv(
                v,
                (3, 3),
                padding="same",
                use_bias=True,
                init_scheme=self.init_scheme,
                dtype=self.dtype,
                name=f"conv{i}",
            )(x)
            if self.batch_norm:
                x = batch_norm(train, self.dtype, f"bn{i}")(x)
            x = act(x)
            i += 1
        x = x.reshape(x.shape[0], -1)
        return Dense(self.num_outputs, init_scheme=self.init_scheme, dtype=self.dtype, name="classifier")(x)
