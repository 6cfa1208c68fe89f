"""The paper's N-layer single-path CNN (Eq. (6), (20)-(21)) and fully connected nets.

``cnn``: ``F = F_N o ... o F_1`` with ``F_i(I_i) = r(K_i * I_i)`` (bias-free
cross-correlation ``*`` followed by the activation ``r``, Swish(beta) in the paper),
then a global pooling over space (and a sum over channels) gives one logit: ``pool="mean"``
(default) ``g = mean_x F(I)(x)``, as the authors' released code pools (``AvgPooling`` in
``single_layer/PySun.py``, sunyx523/surprising-instabilities), or ``pool="sum"``
``g = sum_x F(I)(x)``, the integral of Eq. (6) as a Riemann sum with unit pixel area;
the sigmoid ``f(I) = s(g)`` of Eq. (20) is applied by the binary cross-entropy loss
(:func:`eos_jax.losses.binary_cross_entropy`), so ``apply`` returns ``g`` as an
``(N, 1)`` logit. With ``N = 1`` this is Eq. (6). Optionally (``head="linear"``)
the spatial sum of the last layer's channels feeds a linear layer with
``num_outputs`` outputs, for several classes.

``fc``: ``flatten -> [Dense(width) -> activation] * depth -> Dense(num_outputs)``,
Cohen et al.'s ``fc-tanh`` is ``width=200, depth=2`` (locuslab/edge-of-stability
``src/archs.py``: widths [200, 200], bias, tanh).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eos_jax.models.fused import single_channel_stack
from eos_jax.models.layers import (
    Conv,
    Dense,
    SingleChannelConv,
    make_activation,
    make_kernel_init,
)

POOLS = ("mean", "sum")


class PaperCNN(nn.Module):
    """Eq. (20)-(21): bias-free convolutions + activation, global mean or sum (or linear head).

    Examples:
      Eq. (6) with a 3x3 kernel of ones on an 8x8 image of ones: every output is
      ``swish(9) = 9 * sigmoid(9)``, and so is their mean:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import models
      >>> model = models.get("cnn", kernel_size=3, activation="swish")
      >>> type(model.module).__name__
      'PaperCNN'
      >>> variables = {"params": {"conv0": {"kernel": jnp.ones((3, 3, 1, 1))}}}
      >>> logit, _ = jax.jit(model.apply, static_argnames="train")(variables, jnp.ones((1, 8, 8, 1)), train=False)
      >>> round(float(logit[0, 0]), 5)
      8.99889
    """

    channels: tuple[int, ...]
    kernel_size: tuple[int, int]
    padding: str
    impls: tuple[str, ...]
    activation: str
    beta: float
    init_scheme: str
    init_std: float
    head: str
    num_outputs: int
    dtype: Any
    pool: str = "mean"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = make_activation(self.activation, self.beta)
        spatial = jnp.mean if self.pool == "mean" else jnp.sum
        if x.shape[-1] == 1 and set(self.channels) == {1} and set(self.impls) == {"fused"}:
            # The whole stack fused per batch chunk (eos_jax.models.fused); same parameters
            # (conv{i}/kernel, HWIO (kh, kw, 1, 1)) and same initialization as the layers below.
            kernels = [
                _KernelParam(self.kernel_size, self.init_scheme, self.init_std, self.dtype, name=f"conv{i}")()[
                    :, :, 0, 0
                ]
                for i in range(len(self.channels))
            ]
            pooled = single_channel_stack(kernels, x[..., 0], act, pool=self.pool, padding=self.padding)[:, None]
            if self.head == "sum":
                return pooled
            return Dense(
                self.num_outputs,
                init_scheme="jax" if self.init_scheme == "normal" else self.init_scheme,
                dtype=self.dtype,
                name="head",
            )(pooled)
        if x.shape[-1] == 1 and set(self.channels) == {1}:
            # All layers single-channel: run on (N, H, W) arrays (much faster on CPU than
            # with a trailing channel axis of size 1; same parameters, same function).
            x = x[..., 0]
            for i, impl in enumerate(self.impls):
                x = act(
                    SingleChannelConv(
                        self.kernel_size,
                        self.padding,
                        self.init_scheme,
                        self.init_std,
                        impl,
                        self.dtype,
                        name=f"conv{i}",
                    )(x)
                )
            x = x[..., None]
        else:
            for i, (c, impl) in enumerate(zip(self.channels, self.impls)):
                x = Conv(
                    c,
                    self.kernel_size,
                    padding=self.padding,
                    use_bias=False,
                    init_scheme=self.init_scheme,
                    init_std=self.init_std,
                    impl=impl,
                    dtype=self.dtype,
                    name=f"conv{i}",
                )(x)
                x = act(x)
        if self.head == "sum":
            # The integral of Eq. (20) over pixels (mean or sum), summed over channels: one logit.
            return jnp.sum(spatial(x, axis=(1, 2)), axis=1)[:, None]
        pooled = spatial(x, axis=(1, 2))
        return Dense(
            self.num_outputs,
            init_scheme="jax" if self.init_scheme == "normal" else self.init_scheme,
            dtype=self.dtype,
            name="head",
        )(pooled)


class _KernelParam(nn.Module):
    """The kernel parameter of a single-channel layer (as :class:`SingleChannelConv` creates it)."""

    kernel_size: tuple[int, int]
    init_scheme: str
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (*self.kernel_size, 1, 1)
        return self.param("kernel", make_kernel_init(self.init_scheme, std=self.init_std), shape, self.dtype)


class FC(nn.Module):
    """Fully connected network: ``depth`` hidden layers of ``width`` units.

    Examples:
      >>> import jax
      >>> from eos_jax import models
      >>> fc = models.get("fc", width=4, depth=1, num_outputs=2)
      >>> shapes = jax.eval_shape(lambda key: fc.init(key, (2, 2, 1)), jax.random.PRNGKey(0))
      >>> {name: p["kernel"].shape for name, p in shapes["params"].items()}
      {'dense0': (4, 4), 'out': (4, 2)}
    """

    width: int
    depth: int
    num_outputs: int
    activation: str
    beta: float
    init_scheme: str
    use_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = make_activation(self.activation, self.beta)
        x = x.reshape(x.shape[0], -1)  # NHWC flattened row-major (PyTorch flattens NCHW).
        for i in range(self.depth):
            x = act(
                Dense(
                    self.width, use_bias=self.use_bias, init_scheme=self.init_scheme, dtype=self.dtype, name=f"dense{i}"
                )(x)
            )
        return Dense(
            self.num_outputs, use_bias=self.use_bias, init_scheme=self.init_scheme, dtype=self.dtype, name="out"
        )(x)
