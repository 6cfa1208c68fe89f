"""ResNet-56 for CIFAR (He et al. 2016, Sec. 4.2), option-A shortcuts.

``conv3x3(16) -> BN -> act``, then three stages of ``n = 9`` basic blocks with
16/32/64 channels (the first block of stages 2 and 3 has stride 2), global average
pooling and a linear layer 64 -> num_classes: 6n + 2 = 56 weighted layers,
853,018 parameters for 10 classes (He et al. Table 6: "0.85M"). Convolutions have
no bias (as in the common PyTorch port, akamaster/pytorch_resnet_cifar10).
Option A: when the shape changes, the shortcut is ``x[:, ::2, ::2, :]`` padded with
zero channels (``planes // 4`` on each side), parameter-free.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eos_jax.models.layers import Conv, Dense, make_activation
from eos_jax.models.vgg import batch_norm


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an option-A shortcut.

    Example:
      A stride-2 block from 4 to 8 channels halves the image (shapes only):

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.resnet import BasicBlock
      >>> block = BasicBlock(8, 2, "relu", 1.0, "pytorch", jnp.float32)
      >>> x = jnp.zeros((1, 8, 8, 4))
      >>> variables = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
      >>> sorted(variables["params"]), variables["params"]["conv1"]["kernel"].shape
      (['bn1', 'bn2', 'conv1', 'conv2'], (3, 3, 4, 8))
      >>> jax.eval_shape(block.apply, variables, x).shape
      (1, 4, 4, 8)
    """

    planes: int
    stride: int
    activation: str
    beta: float
    init_scheme: str
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = make_activation(self.activation, self.beta)
        s = (self.stride, self.stride)
        y = Conv(
            self.planes,
            (3, 3),
            strides=s,
            padding="same",
            use_bias=False,
            init_scheme=self.init_scheme,
            dtype=self.dtype,
            name="conv1",
        )(x)
        y = act(batch_norm(train, self.dtype, "bn1")(y))
        y = Conv(
            self.planes,
            (3, 3),
            padding="same",
            use_bias=False,
            init_scheme=self.init_scheme,
            dtype=self.dtype,
            name="conv2",
        )(y)
        y = batch_norm(train, self.dtype, "bn2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            # Option A (He et al. 2016): subsample, then zero-pad the new channels.
            pad = (self.planes - x.shape[-1]) // 2
            shortcut = jnp.pad(
                x[:, :: self.stride, :: self.stride, :],
                ((0, 0), (0, 0), (0, 0), (pad, self.planes - x.shape[-1] - pad)),
            )
        return act(y + shortcut)


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``6 * blocks_per_stage + 2`` layers.

    Example:
      ResNet-20 (``blocks_per_stage=3``; He et al. Table 6: "0.27M"), counted from shapes:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models import count_params
      >>> from eos_jax.models.resnet import ResNetCifar
      >>> net = ResNetCifar(3, 10, "relu", 1.0, "pytorch", jnp.float32)
      >>> shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
      >>> count_params(shapes)
      269722
    """

    blocks_per_stage: int
    num_outputs: int
    activation: str
    beta: float
    init_scheme: str
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = make_activation(self.activation, self.beta)
        x = Conv(
            16, (3, 3), padding="same", use_bias=False, init_scheme=self.init_scheme, dtype=self.dtype, name="conv1"
        )(x)
        x = act(batch_norm(train, self.dtype, "bn1")(x))
        for stage, planes in enumerate((16, 32, 64)):
            for b in range(self.blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                x = BasicBlock(
                    planes,
                    stride,
                    self.activation,
                    self.beta,
                    self.init_scheme,
                    self.dtype,
                    name=f"stage{stage + 1}_block{b}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_outputs, init_scheme=self.init_scheme, dtype=self.dtype, name="fc")(x)
