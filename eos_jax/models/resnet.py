"""ResNet-56 for CIFAR (He et al. 2016, Sec. 4.2), option-A or option-B shortcuts.

``conv3x3(16) -> BN -> act``, then three stages of ``n = 9`` basic blocks with
16/32/64 channels (the first block of stages 2 and 3 has stride 2), global average
pooling and a linear layer 64 -> num_classes: 6n + 2 = 56 weighted layers.
Convolutions have no bias; the linear layer has one. Batch norm is PyTorch's
``BatchNorm2d`` defaults (momentum 0.1, eps 1e-5, scale 1, shift 0:
:class:`eos_jax.models.vgg.BatchNorm`).

Two shortcuts, where the shape changes (the first block of stages 2 and 3):

* ``"A"`` (He et al. 2016, Sec. 4.2: "we use identity shortcuts in all cases (option
  A)", the paper's "ResNet-56 architecture (He et al., 2016)" read literally, and the
  common PyTorch port akamaster/pytorch_resnet_cifar10): ``x[:, ::2, ::2, :]`` padded
  with zero channels (``planes // 4`` on each side), parameter-free. 853,018
  parameters for 10 classes (He et al. Table 6: "0.85M"). Model ``"resnet56"``.
* ``"B"`` (what the authors run: ``ResNet_Cifar._make_layer`` in
  ``instability/resnet.py`` and ``instability/resnet_swish.py`` of
  sunyx523/surprising-instabilities, ``downsample = nn.Sequential(nn.Conv2d(inplanes,
  planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes))``): a
  strided 1x1 convolution without bias, then batch norm. Two projections, ``16*32 +
  2*32`` and ``32*64 + 2*64`` parameters more: 855,770 for 10 classes. Model
  ``"resnet56_authors"``, which also takes the authors' initialization (convolutions
  ``N(0, 2 / (kh*kw*out_channels))``, the ``"he_fan_out"`` scheme; the linear layer
  PyTorch's default ``nn.Linear`` init, the ``"pytorch"`` scheme) and their Swish
  ``x * sigmoid(5 x)`` (``class Swish`` in ``resnet_swish.py``: beta = 5).

``bn_stats`` picks how training-mode batch norm computes its statistics (the ``stats`` of
:class:`eos_jax.models.vgg.BatchNorm`): ``"two_pass"`` (the default) or the opt-in ``"one_pass"``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eos_jax.models.layers import Conv, Dense, make_activation, materialize
from eos_jax.models.vgg import batch_norm


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an option-A (zero-padded) or option-B (1x1 conv + BN) shortcut.

    Examples:
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

      With ``shortcut="B"`` the block gains a projection: a 1x1 kernel and a batch norm:

      >>> block_b = BasicBlock(8, 2, "relu", 1.0, "pytorch", jnp.float32, shortcut="B")
      >>> params = jax.eval_shape(block_b.init, jax.random.PRNGKey(0), x)["params"]
      >>> sorted(params), params["shortcut_conv"]["kernel"].shape
      (['bn1', 'bn2', 'conv1', 'conv2', 'shortcut_bn', 'shortcut_conv'], (1, 1, 4, 8))
    """

    planes: int
    stride: int
    activation: str
    beta: float
    init_scheme: str
    dtype: Any
    shortcut: str = "A"  # "A": subsample + zero channels; "B": 1x1 conv (no bias) + BN
    bn_stats: str = "two_pass"  # batch statistics: eos_jax.models.vgg.BatchNorm's ``stats``

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
        y = act(batch_norm(train, self.dtype, "bn1", self.bn_stats)(y))
        y = Conv(
            self.planes,
            (3, 3),
            padding="same",
            use_bias=False,
            init_scheme=self.init_scheme,
            dtype=self.dtype,
            name="conv2",
        )(y)
        y = batch_norm(train, self.dtype, "bn2", self.bn_stats)(y)
        shortcut = x
        if (self.stride != 1 or x.shape[-1] != self.planes) and self.shortcut == "B":
            # Option B as the authors' _make_layer: Conv2d(kernel_size=1, stride, bias=False) + BN.
            # A 1x1 kernel needs no padding, so it reads x[:, ::s, ::s, :] as PyTorch's does.
            shortcut = Conv(
                self.planes,
                (1, 1),
                strides=s,
                padding="valid",
                use_bias=False,
                init_scheme=self.init_scheme,
                dtype=self.dtype,
                name="shortcut_conv",
            )(x)
            shortcut = batch_norm(train, self.dtype, "shortcut_bn", self.bn_stats)(shortcut)
        elif self.stride != 1 or x.shape[-1] != self.planes:
            # Option A (He et al. 2016): subsample, then zero-pad the new channels.
            pad = (self.planes - x.shape[-1]) // 2
            shortcut = jnp.pad(
                x[:, :: self.stride, :: self.stride, :],
                ((0, 0), (0, 0), (0, 0), (pad, self.planes - x.shape[-1] - pad)),
            )
        return materialize(act(y + shortcut))  # the residual stream in memory: see layers.materialize


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``6 * blocks_per_stage + 2`` layers.

    Examples:
      ResNet-20 (``blocks_per_stage=3``; He et al. Table 6: "0.27M"), counted from shapes:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models import count_params
      >>> from eos_jax.models.resnet import ResNetCifar
      >>> net = ResNetCifar(3, 10, "relu", 1.0, "pytorch", jnp.float32)
      >>> shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
      >>> count_params(shapes)
      269722

      The authors' construction (option B, He fan-out convolutions, PyTorch's linear layer)
      adds the two projections' ``16*32 + 2*32 + 32*64 + 2*64`` parameters:

      >>> net_b = ResNetCifar(3, 10, "relu", 1.0, "he_fan_out", jnp.float32, shortcut="B", fc_init_scheme="pytorch")
      >>> count_params(jax.eval_shape(net_b.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))) - 269722
      2752
    """

    blocks_per_stage: int
    num_outputs: int
    activation: str
    beta: float
    init_scheme: str
    dtype: Any
    shortcut: str = "A"  # see the module docstring
    fc_init_scheme: str | None = None  # None: init_scheme (the authors: "pytorch" for the fc layer)
    bn_stats: str = "two_pass"  # batch statistics: eos_jax.models.vgg.BatchNorm's ``stats``

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = make_activation(self.activation, self.beta)
        x = Conv(
            16, (3, 3), padding="same", use_bias=False, init_scheme=self.init_scheme, dtype=self.dtype, name="conv1"
        )(x)
        x = materialize(act(batch_norm(train, self.dtype, "bn1", self.bn_stats)(x)))
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
                    self.shortcut,
                    self.bn_stats,
                    name=f"stage{stage + 1}_block{b}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        fc_init = self.init_scheme if self.fc_init_scheme is None else self.fc_init_scheme
        return Dense(self.num_outputs, init_scheme=fc_init, dtype=self.dtype, name="fc")(x)
