"""ResNet-56 (option A) written out as a function of the library's variables, with each formulation switchable.

``bench_models.py --variants`` times these formulations of one SGD-Nesterov step against the library's
``resnet56`` and PyTorch's. The default :class:`Variant` computes, operation for operation, what
:class:`eos_jax.models.resnet.ResNetCifar` computes (He et al. 2016, Sec. 4.2: ``conv3x3(16) -> BN ->
ReLU``, three stages of nine basic blocks, option-A shortcuts, global average pooling, a linear layer;
batch norm as :class:`eos_jax.models.vgg.BatchNorm` (two-pass statistics), the residual stream through
:func:`eos_jax.models.layers.materialize`), so its step has the library's bits; each switch changes
one thing:

* ``layout="NCHW"``: activations NCHW and kernels OIHW end to end (PyTorch's layout), the input
  transposed once;
* ``shortcut="lax"``: the option-A shortcut as ``lax.slice`` + ``lax.pad`` instead of indexing and
  ``jnp.pad`` (the same values);
* ``wgrad="taps"``: the kernel gradient of every convolution as nine ``dot_general`` s, one per tap
  (``dW[i, j] = sum_{n,h,w} x_pad[n, h*s+i, w*s+j, :]^T dy[n, h, w, :]``), instead of XLA's
  convolution with swapped dimension numbers (other summation order: new bits);
* ``keep_dy=True``: each convolution's output cotangent kept in memory once (a one-trip loop, as
  :func:`~eos_jax.models.layers.materialize` does for values) before the data- and kernel-gradient
  convolutions read it;
* ``remat=True``: each block under ``jax.checkpoint`` saving only the convolutions' outputs
  (``dots_saveable``);
* ``convs_only=True``: batch norm and ReLU removed, leaving the convolutions, their layout copies,
  the residual additions and the update: not a candidate (other function), the time that the
  convolutions alone take.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from eos_jax.models.layers import _keep, materialize
from eos_jax.models.vgg import BN_EPSILON, BN_MOMENTUM

HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Variant:
    """One formulation of ResNet-56's training step (see the module docstring); the defaults are the library's."""

    layout: str = "NHWC"  # or "NCHW"
    shortcut: str = "index"  # or "lax"
    wgrad: str = "xla"  # or "taps"
    keep_dy: bool = False
    remat: bool = False
    convs_only: bool = False


def _wgrad_taps(x: jax.Array, dy: jax.Array, stride: int) -> jax.Array:
    """Kernel gradient (3, 3, C, O) of a padding-1 3x3 NHWC convolution, one ``dot_general`` per tap."""
    ho, wo = dy.shape[1], dy.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [
        lax.dot_general(
            xp[:, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride, :],
            dy,
            (((0, 1, 2), (0, 1, 2)), ((), ())),
            precision=HIGHEST,
        )
        for i in range(3)
        for j in range(3)
    ]
    return jnp.stack(taps).reshape(3, 3, x.shape[-1], dy.shape[-1])


def _lax_conv(x: jax.Array, w_hwio: jax.Array, stride: int, layout: str) -> jax.Array:
    """Padding-1 3x3 cross-correlation as the library's :func:`eos_jax.models.layers.conv2d` (``"lax"``)."""
    if layout == "NCHW":
        dn, w = ("NCHW", "OIHW", "NCHW"), jnp.transpose(w_hwio, (3, 2, 0, 1))
    else:
        dn, w = ("NHWC", "HWIO", "NHWC"), w_hwio
    return lax.conv_general_dilated(x, w, (stride, stride), [(1, 1), (1, 1)], dimension_numbers=dn, precision=HIGHEST)


@jax.custom_vjp
def _keep_cotangent(x: jax.Array) -> jax.Array:
    """The identity; its cotangent goes through a one-trip loop, so XLA writes it once."""
    return x


_keep_cotangent.defvjp(lambda x: (x, None), lambda _, g: (_keep(g),))


def _make_conv(v: Variant):
    """``conv(x, w, stride)`` for the variant: XLA's gradient, or a custom VJP with the nine-tap kernel gradient."""

    def plain(x, w, stride):
        y = _lax_conv(x, w, stride, v.layout)
        return _keep_cotangent(y) if v.keep_dy else y

    if v.wgrad == "xla":
        return plain

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def conv(x, w, stride):
        return _lax_conv(x, w, stride, "NHWC")

    def fwd(x, w, stride):
        return conv(x, w, stride), (x, w)

    def bwd(stride, res, dy):
        x, w = res
        dx = jax.vjp(lambda x_: _lax_conv(x_, w, stride, "NHWC"), x)[1](dy)[0]
        return dx, _wgrad_taps(x, dy, stride)

    conv.defvjp(fwd, bwd)
    return conv


def _batch_norm(x, params, stats, caxis: int):
    """Training-mode batch norm over every axis but ``caxis`` as :class:`eos_jax.models.vgg.BatchNorm`
    (two-pass statistics); returns ``(y, new running statistics)``."""
    axes = tuple(a for a in range(4) if a != caxis)
    bshape = tuple(x.shape[caxis] if a == caxis else 1 for a in range(4))
    n = x.size // x.shape[caxis]
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean.reshape(bshape)), axis=axes)
    new = {
        "mean": (1.0 - BN_MOMENTUM) * stats["mean"] + BN_MOMENTUM * mean,
        "var": (1.0 - BN_MOMENTUM) * stats["var"] + BN_MOMENTUM * (var * (n / max(n - 1, 1))),
    }
    inv = params["scale"] * lax.rsqrt(var + BN_EPSILON)
    return (x - mean.reshape(bshape)) * inv.reshape(bshape) + params["bias"].reshape(bshape), new


def _shortcut(v: Variant, x: jax.Array, planes: int, stride: int, caxis: int) -> jax.Array:
    """Option A (He et al. 2016): ``x`` subsampled by ``stride``, zero channels padded on both sides."""
    cin = x.shape[caxis]
    if stride == 1 and cin == planes:
        return x
    pad = (planes - cin) // 2
    pads = [(0, 0, 0)] * 4
    pads[caxis] = (pad, planes - cin - pad, 0)
    strides = tuple(1 if a in (0, caxis) else stride for a in range(4))
    if v.shortcut == "lax":
        return lax.pad(lax.slice(x, (0,) * 4, x.shape, strides), jnp.zeros((), x.dtype), pads)
    sub = x[tuple(slice(None, None, s) for s in strides)]
    return jnp.pad(sub, [p[:2] for p in pads])


def make_apply(v: Variant):
    """``apply(variables, x_NHWC) -> (logits, {"batch_stats": ...})`` for ResNet-56 (option A), training mode."""
    if v.wgrad == "taps" and v.layout != "NHWC":
        raise ValueError("wgrad='taps' is written for the NHWC layout")
    conv = _make_conv(v)
    caxis = 1 if v.layout == "NCHW" else 3
    relu = (lambda a: a) if v.convs_only else jax.nn.relu

    def norm(x, params, stats):
        return (x, stats) if v.convs_only else _batch_norm(x, params, stats, caxis)

    def block(x, p, s, planes, stride):
        new = {}
        y, new["bn1"] = norm(conv(x, p["conv1"]["kernel"], stride), p["bn1"], s["bn1"])
        y, new["bn2"] = norm(conv(relu(y), p["conv2"]["kernel"], 1), p["bn2"], s["bn2"])
        return materialize(relu(y + _shortcut(v, x, planes, stride, caxis))), new

    if v.remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_saveable, static_argnums=(3, 4))

    def apply(variables, x):
        p, s = variables["params"], variables["batch_stats"]
        x = jnp.transpose(x, (0, 3, 1, 2)) if v.layout == "NCHW" else x
        new = {}
        x, new["bn1"] = norm(conv(x, p["conv1"]["kernel"], 1), p["bn1"], s["bn1"])
        x = materialize(relu(x))
        for stage, planes in enumerate((16, 32, 64)):
            for b in range(9):
                name = f"stage{stage + 1}_block{b}"
                x, new[name] = block(x, p[name], s[name], planes, 2 if (stage > 0 and b == 0) else 1)
        x = jnp.mean(x, axis=(2, 3) if v.layout == "NCHW" else (1, 2))
        logits = jnp.matmul(x, p["fc"]["kernel"], precision=HIGHEST) + p["fc"]["bias"][None, :]
        return logits, {"batch_stats": new}

    return apply
