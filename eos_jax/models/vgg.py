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

from eos_jax.models.layers import Conv, Dense, make_activation

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Batch norm as PyTorch's BatchNorm2d: running = 0.9 * running + 0.1 * batch, eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """PyTorch-equivalent BatchNorm (two-pass variance; see :data:`BN_MOMENTUM`)."""
    # use_fast_variance=False: var = mean((x - mean)^2), not E[x^2] - E[x]^2, which
    # cancels catastrophically when |mean| >> std.
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=dtype, param_dtype=dtype, use_fast_variance=False, name=name)


class VGG(nn.Module):
    """VGG for 32x32 inputs with a single linear classifier."""

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
            x = Conv(v, (3, 3), padding="same", use_bias=True, init_scheme=self.init_scheme, dtype=self.dtype,
                     name=f"conv{i}")(x)
            if self.batch_norm:
                x = batch_norm(train, self.dtype, f"bn{i}")(x)
            x = act(x)
            i += 1
        x = x.reshape(x.shape[0], -1)
        return Dense(self.num_outputs, init_scheme=self.init_scheme, dtype=self.dtype, name="classifier")(x)
