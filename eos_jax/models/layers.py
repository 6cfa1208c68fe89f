"""Building blocks shared by the models: activations, initializers, convolutions.

Convolutions are cross-correlations, as in every deep-learning library and in the
paper (Sec. 5.1: "* will denote the cross-correlation"). Three implementations
compute the same function and differ only in rounding:

* ``"lax"``: :func:`jax.lax.conv_general_dilated` (XLA's convolution).
* ``"shifted"``: for one input and one output channel, the sum over the kernel taps
  ``K[i, j] * x[:, i:i+Ho, j:j+Wo]`` in row-major tap order, on ``(N, H, W)`` arrays,
  with a hand-written VJP. XLA's CPU convolution is poor at one channel
  (``benchmarks/bench_main.py`` prints the ratio), while the slices fuse into one loop. It keeps exact zeros exact (a direct sum), which
  the FFT does not.
* ``"fft"``: for one input and one output channel, ``irfft2(rfft2(x) *
  conj(rfft2(K)))`` cropped to the valid region (no wrap-around: the FFT has the
  size of the (padded) input, and a valid output index ``n`` only reads ``x[n+m]``
  with ``n+m`` inside it). Used for big kernels, where ``kh*kw`` shifted slices
  compile slowly (32x32 kernel on 256x256: 18-44 s to compile) and run slowly.

* ``"fused"``: the whole single-channel stack per batch chunk in a batch-minor layout
  (:mod:`eos_jax.models.fused`), used by :class:`eos_jax.models.cnn.PaperCNN` when every
  layer is ``"fused"``. Its GD step is the fastest in wall time on the shared 2-core VM
  (2,000 images: 285 ms vs 566 ms shifted vs 2,512 ms lax; 50x fewer page faults), but
  its Hessian-vector products are not (``jvp`` of the chunk scans: 7.8 gradients for
  ``jvp(grad)``, 38 through ``jax.linearize``), so ``"auto"`` does not pick it: the main
  job spends most of its time in sharpness tracking.

``resolve_conv_impl("auto", ...)`` picks ``"shifted"`` for single-channel kernels
with at most :data:`SHIFTED_MAX_TAPS` taps, ``"fft"`` for bigger single-channel
kernels and ``"lax"`` otherwise. Runs record the choice (``model.info``) because the
implementations differ in the last bits.

:func:`materialize` is the identity (bit for bit) that makes XLA:CPU keep a value in memory:
without it, XLA fuses a ResNet stage's chain of batch norm, ReLU and residual additions into
every consumer of a block's output, so the backward pass recomputes the stage from its first
block for each weight gradient (ResNet-56 at batch 128 on 2 cores: 1.9 s per step, 0.93 s with
it, the same bits). :func:`materialize_tangents` keeps a value's tangents and cotangents in memory in
Hessian-vector products and changes nothing in a gradient: the shifted single-channel convolution
passes its input through it (with a one-pass kernel-gradient tangent, :func:`_kernel_grad`), which
made the CNN's HVP 3.4-4.4x faster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from eos_jax.errors import ConfigError
from eos_jax.models import shifted

ACTIVATIONS = ("relu", "swish", "tanh")
INIT_SCHEMES = ("pytorch", "jax", "normal", "he_fan_out")
CONV_IMPLS = ("auto", "lax", "shifted", "fft", "fused")
PADDINGS = ("valid", "same")
# Largest single-channel kernel (in taps) done as shifted slices under "auto" (3x3); above
# it "auto" uses the FFT (measured, 2-core CPU: see benchmarks/bench_models.py).
SHIFTED_MAX_TAPS = 9

Array = jax.Array


def _keep(x: Array) -> Array:
    """``x`` through a one-trip while loop whose body XLA cannot prove to be the identity."""
    first = x.reshape(-1)[0]
    trips = (first == first).astype(jnp.int32)  # 1 (0 for a NaN: the body is the identity either way)
    runs = trips > 0  # true whenever the body runs: it selects v, moving bits (no arithmetic, no flush)

    def body(c: tuple[Array, Array]) -> tuple[Array, Array]:
        return c[0] + 1, jnp.where(runs, c[1], jnp.zeros_like(c[1]))

    return lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), x))[1]


@jax.custom_jvp
def materialize(x: Array) -> Array:
    """The identity, bit for bit, computed so that XLA keeps its result in memory.

    XLA:CPU fuses chains of cheap elementwise operations into their consumers and duplicates
    them into each one. A residual stream ``x_{l+1} = relu(bn(conv(...)) + x_l)`` is such a
    chain: the transposes that feed the weight-gradient convolutions in the backward pass
    each recompute it from the stage's first block (measured: 1.1 s of ResNet-56's 1.75 s
    step at batch 128, 2-core CPU). XLA cannot fuse across a while loop, and removes
    ``lax.optimization_barrier`` before fusion on CPU, so the value goes through a loop of
    one trip whose body selects it under a run-time true (a select moves bits: signed zeros,
    infinities, NaNs and subnormals, which XLA:CPU's arithmetic flushes to zero, all kept). Its derivative is the identity (a custom JVP: forward and
    reverse mode, ``vmap``); the tangent is not materialized.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax.models.layers import materialize
      >>> x = jnp.array([1.5, -0.0, jnp.inf, jnp.nan, 3e-45])  # 3e-45: a subnormal
      >>> np.array_equal(np.asarray(jax.jit(materialize)(x)).view(np.uint32), np.asarray(x).view(np.uint32))
      True
      >>> jax.grad(lambda v: jnp.sum(materialize(v) ** 2))(jnp.array([1.0, 2.0])).tolist()
      [2.0, 4.0]
    """
    return _keep(x)


@materialize.defjvp
def _materialize_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    return materialize(primals[0]), tangents[0]


@jax.custom_jvp
def _kept_when_differentiated(x: Array) -> Array:
    """The identity; under ``jvp``, the value and its tangent go through one one-trip loop."""
    return x


@_kept_when_differentiated.defjvp
def _kept_when_differentiated_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    # The loop's own JVP: one loop carrying the value and its tangent. (Two loops, one each,
    # were slower: the CNN's HVP took 185-187 ms against 143-144 ms, 12,000 images.)
    return jax.jvp(_keep, primals, tangents)


@jax.custom_vjp
def materialize_tangents(x: Array) -> Array:
    """The identity, bit for bit; in Hessian-vector products, the value and its derivatives are kept in memory.

    Forward-over-reverse products (``jvp(grad)``) of the single-channel CNN were slow because
    XLA:CPU fused the tangent of layer ``l``'s activation (with the primal it depends on)
    into each of the nine shifted slices that layer ``l+1`` and the kernel gradient's tangents
    read, recomputing layer ``l``'s convolution in each: one fusion of the 3-layer CNN's HVP
    re-evaluated the first layer 81 times over. :func:`materialize` keeps a primal only (its
    tangent is the identity, which XLA fuses away). Here, a custom VJP whose forward and
    backward rules are the identity: a gradient (``jax.grad``) compiles to the very program it
    would be without this function, bit for bit; under an outer ``jvp`` of that gradient,
    both rules are differentiated, and their tangent rule passes the value and its tangent,
    and the cotangent and its tangent, through :func:`materialize`'s one-trip loop (one loop
    per pair), so each is written once. Measured (3-layer CNN, 12,000 images, 2-core CPU):
    HVP 0.48-0.62 s -> 0.14 s (with the one-pass kernel-gradient tangent of the shifted
    convolution); the gradient's program unchanged.

    Supported: reverse mode, forward-over-reverse (``jvp(grad)``, ``jax.hessian``) and
    ``vmap``. Not supported: forward mode alone (``jax.jvp`` of a function that calls it, as
    for every ``custom_vjp`` function) and reverse-over-reverse (``grad(grad)``: JAX cannot
    transpose the loop that the tangent rule runs).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.layers import materialize_tangents
      >>> f = lambda v: jnp.sum(jnp.sin(materialize_tangents(v)))
      >>> x = jnp.array([0.5, 1.0])
      >>> bool(jnp.array_equal(jax.grad(f)(x), jnp.cos(x)))
      True
      >>> hv = jax.jvp(jax.grad(f), (x,), (jnp.ones(2),))[1]  # Hessian-vector product
      >>> bool(jnp.array_equal(hv, -jnp.sin(x)))
      True
    """
    return x


def _materialize_tangents_fwd(x: Array) -> tuple[Array, None]:
    return _kept_when_differentiated(x), None


def _materialize_tangents_bwd(_: None, g: Array) -> tuple[Array]:
    return (_kept_when_differentiated(g),)


materialize_tangents.defvjp(_materialize_tangents_fwd, _materialize_tangents_bwd)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raises ConfigError naming ``value`` and the allowed values.

    Examples:
      >>> from eos_jax.models.layers import check_choice
      >>> check_choice("padding", "valid", ("valid", "same"))
      >>> check_choice("padding", "full", ("valid", "same"))
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: padding='full'; allowed: 'valid', 'same'
    """
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def make_activation(name: str, beta: float = 1.0) -> Callable[[Array], Array]:
    """Returns the activation ``name``.

    Args:
      name: ``"relu"``, ``"swish"`` (``r(x) = x * sigmoid(beta * x)``, the paper's
        Swish of Sec. 4.2 and Theorem 5.2) or ``"tanh"``.
      beta: Swish parameter (> 0); ignored by the others.

    Returns:
      An elementwise function keeping the dtype of its input.

    Examples:
      Swish with ``beta = 1`` at 2 is ``2 * sigmoid(2)``:

      >>> import jax.numpy as jnp
      >>> from eos_jax.models.layers import make_activation
      >>> swish = make_activation("swish", beta=1.0)
      >>> y = swish(jnp.float32(2.0))
      >>> round(float(y), 6), y.dtype
      (1.761594, dtype('float32'))
      >>> make_activation("swish", beta=0.0)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: swish beta=0.0; allowed: a finite number > 0
    """
    check_choice("activation", name, ACTIVATIONS)
    if name == "relu":
        return jax.nn.relu
    if name == "tanh":
        return jnp.tanh
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"swish beta={beta!r}; allowed: a finite number > 0")
    beta = float(beta)

    def swish(x: Array) -> Array:
        # beta is a Python float (weakly typed): the product keeps x's dtype.
        return x * jax.nn.sigmoid(beta * x)

    return swish


def _fan_in(shape: Sequence[int]) -> int:
    """Fan-in of a dense (in, out) or conv (h, w, in, out) kernel."""
    return int(math.prod(shape[:-1]))


def make_kernel_init(scheme: str, *, std: float = 1.0) -> Callable[..., Array]:
    """Kernel initializer for dense ``(in, out)`` and conv ``(h, w, in, out)`` kernels.

    Args:
      scheme: ``"pytorch"``: PyTorch's default for ``nn.Linear``/``nn.Conv2d``,
        ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
        ``"jax"``: flax's default ``lecun_normal`` (truncated normal, variance
        ``1/fan_in``); ``"normal"``: ``N(0, std^2)`` (the PDE experiments of Sec. 5.3
        initialise K ~ N(0, 1)); ``"he_fan_out"``: ``N(0, 2 / fan_out)`` with ``fan_out =
        kh * kw * out`` for a conv kernel (``out`` for a dense one), He et al. (2015)'s init in its
        fan-out form, which the authors' ResNet uses for every convolution
        (``m.weight.data.normal_(0, math.sqrt(2. / n))``, ``n = kh * kw * out_channels``, in
        ``ResNet_Cifar.__init__`` of ``instability/resnet.py``, sunyx523/surprising-instabilities).
      std: standard deviation of ``"normal"``.

    Returns:
      ``init(key, shape, dtype) -> Array``. Every scheme draws its numbers as one flat vector
      and reshapes it: with JAX's partitionable threefry the counters are the row-major flat
      indices either way, so the bits equal a draw of ``shape`` (and flax's ``lecun_normal`` /
      ``normal``: tested), but a rank-4 draw compiles in about 5 s on this CPU against 0.3 s
      flat, and every model init, in every run, compiles one.

    Examples:
      PyTorch's default for a 3x3 one-channel kernel is uniform in ``[-1/3, 1/3]``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.layers import make_kernel_init
      >>> init = jax.jit(make_kernel_init("pytorch"), static_argnums=(1, 2))
      >>> k = init(jax.random.PRNGKey(0), (3, 3, 1, 1), jnp.float32)
      >>> k.shape, bool(jnp.all(jnp.abs(k) <= 1 / 3))
      ((3, 3, 1, 1), True)

      ``"he_fan_out"`` on a 3x3 kernel into 64 channels has standard deviation ``sqrt(2 / 576)``:

      >>> he = jax.jit(make_kernel_init("he_fan_out"), static_argnums=(1, 2))
      >>> k = he(jax.random.PRNGKey(0), (3, 3, 64, 64), jnp.float32)
      >>> round(float(jnp.std(k) / (2 / 576) ** 0.5), 1)
      1.0
    """
    check_choice("init", scheme, INIT_SCHEMES)
    if scheme == "normal" and not (math.isfinite(std) and std > 0):
        raise ConfigError(f"init_std={std!r}; allowed: a finite number > 0")

    def kernel_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        if scheme == "jax":  # flax's lecun_normal, term for term (variance_scaling(1, "fan_in", truncated_normal))
            stddev = jnp.sqrt(jnp.array(1.0 / _fan_in(shape), dtype)) / jnp.array(0.87962566103423978, dtype)
            flat = jax.random.truncated_normal(key, -2, 2, (n,), dtype) * stddev
        elif scheme == "normal":  # flax's normal(std)
            flat = jax.random.normal(key, (n,), dtype) * jnp.array(std, dtype)
        elif scheme == "he_fan_out":
            # fan_out = kh * kw * out (conv, HWIO) or out (dense, IO): every axis but the input one.
            fan_out = int(math.prod(shape[:-2])) * int(shape[-1])
            flat = math.sqrt(2.0 / fan_out) * jax.random.normal(key, (n,), dtype)
        else:  # "pytorch"
            bound = 1.0 / math.sqrt(_fan_in(shape))
            flat = jax.random.uniform(key, (n,), dtype, -bound, bound)
        return flat.reshape(shape)

    kernel_init.__name__ = f"{scheme}_kernel_init"
    return kernel_init


def make_bias_init(scheme: str, fan_in: int) -> Callable[..., Array]:
    """Bias initializer: PyTorch's ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` or zeros.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.layers import make_bias_init
      >>> init = make_bias_init("pytorch", fan_in=4)  # U(-0.5, 0.5)
      >>> jax.eval_shape(lambda key: init(key, (5,), jnp.float32), jax.random.PRNGKey(0)).shape
      (5,)
      >>> make_bias_init("jax", fan_in=4) is jax.nn.initializers.zeros
      True
    """
    if scheme != "pytorch":
        return nn.initializers.zeros
    bound = 1.0 / math.sqrt(fan_in)

    def pytorch_bias(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)

    return pytorch_bias


def resolve_conv_impl(
    impl: str, in_channels: int, out_channels: int, kernel_size: Sequence[int], strides: Sequence[int] = (1, 1)
) -> str:
    """Chooses the convolution implementation (see the module docstring).

    Raises:
      ConfigError: unknown ``impl``, or ``"shifted"``/``"fft"`` forced on a layer
        that is not single-channel with stride 1.

    Examples:
      >>> from eos_jax.models.layers import resolve_conv_impl
      >>> resolve_conv_impl("auto", 1, 1, (3, 3)), resolve_conv_impl("auto", 1, 1, (5, 5))
      ('shifted', 'fft')
      >>> resolve_conv_impl("auto", 3, 16, (3, 3))
      'lax'
      >>> resolve_conv_impl("fft", 3, 16, (3, 3))
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: conv_impl='fft' needs in_channels == out_channels == 1 and stride 1,
        got 3->16 channels, strides (1, 1); use 'lax' or 'auto'
    """
    check_choice("conv_impl", impl, CONV_IMPLS)
    single = in_channels == 1 and out_channels == 1 and tuple(strides) == (1, 1)
    if impl == "auto":
        if not single:
            return "lax"
        return "shifted" if math.prod(kernel_size) <= SHIFTED_MAX_TAPS else "fft"
    if impl != "lax" and not single:
        raise ConfigError(
            f"conv_impl={impl!r} needs in_channels == out_channels == 1 and stride 1, got "
            f"{in_channels}->{out_channels} channels, strides {tuple(strides)}; use 'lax' or 'auto'"
        )
    return impl


def _pad_amounts(padding: str, kernel_size: Sequence[int]) -> list[tuple[int, int]]:
    """Per spatial axis (low, high) padding; "same" as PyTorch/XLA (extra pad on the high side)."""
    if padding == "valid":
        return [(0, 0) for _ in kernel_size]
    return [((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel_size]


def conv2d(
    x_NHWC: Array, kernel_HWIO: Array, *, padding: str = "valid", strides: Sequence[int] = (1, 1), impl: str = "lax"
) -> Array:
    """2-D cross-correlation ``out[n, p, q, o] = sum K[i, j, c, o] x[n, p*s+i, q*s+j, c]``.

    Args:
      x_NHWC: input, same dtype as the kernel.
      kernel_HWIO: kernel.
      padding: ``"valid"`` (PyTorch's default) or ``"same"`` (stride 1 keeps H, W).
      strides: spatial strides.
      impl: ``"lax"``, ``"shifted"`` or ``"fft"`` (already resolved; the last two
        need one input and one output channel and stride 1).

    Returns:
      ``(N, Ho, Wo, O)`` in the input dtype.

    Examples:
      A 3x3 box of ones over an image of ones sums nine ones at every valid position:

      >>> import jax.numpy as jnp
      >>> from eos_jax.models.layers import conv2d
      >>> x = jnp.ones((1, 4, 4, 1)); k = jnp.ones((3, 3, 1, 2))
      >>> y = conv2d(x, k)
      >>> y.shape, y[0, :, :, 0].tolist()
      ((1, 2, 2, 2), [[9.0, 9.0], [9.0, 9.0]])
      >>> conv2d(x, k, padding="same").shape
      (1, 4, 4, 2)
    """
    check_choice("padding", padding, PADDINGS)
    kh, kw, cin, cout = kernel_HWIO.shape
    if impl == "lax":
        return lax.conv_general_dilated(
            x_NHWC,
            kernel_HWIO,
            tuple(strides),
            _pad_amounts(padding, (kh, kw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )
    if cin != 1 or cout != 1 or tuple(strides) != (1, 1):
        raise ConfigError(f"conv impl {impl!r} needs 1->1 channels and stride 1, got {cin}->{cout}")
    return conv2d_single_channel(x_NHWC[..., 0], kernel_HWIO[:, :, 0, 0], padding=padding, impl=impl)[..., None]


def conv2d_single_channel(x_NHW: Array, k_HW: Array, *, padding: str = "valid", impl: str = "shifted") -> Array:
    """One-channel cross-correlation on ``(N, H, W)`` arrays (no channel axis).

    Keeping the activations 3-D matters: with a trailing channel axis of size 1 the
    same shifted slices ran 4x slower per GD step on this CPU (3.9 s vs 1.0 s, 3-layer
    CNN, 12,000 MNIST images).

    Args:
      x_NHW: input.
      k_HW: kernel, same dtype.
      padding: ``"valid"`` or ``"same"``.
      impl: ``"shifted"``, ``"fft"`` or ``"lax"``.

    Returns:
      ``(N, Ho, Wo)``.

    Examples:
      A cross-correlation (not a convolution): ``K = [[1, 0], [0, -1]]`` gives
      ``x[p, q] - x[p+1, q+1]``, which is ``-5`` on a 4x4 ``arange``:

      >>> import jax.numpy as jnp
      >>> from eos_jax.models.layers import conv2d_single_channel
      >>> x = jnp.arange(16.0).reshape(1, 4, 4); k = jnp.array([[1.0, 0.0], [0.0, -1.0]])
      >>> conv2d_single_channel(x, k).tolist()
      [[[-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0]]]
    """
    check_choice("padding", padding, PADDINGS)
    kh, kw = k_HW.shape
    if impl == "lax":
        return conv2d(x_NHW[..., None], k_HW[:, :, None, None], padding=padding, impl="lax")[..., 0]
    x = x_NHW
    if padding == "same":
        pads = _pad_amounts(padding, (kh, kw))
        x = jnp.pad(x, [(0, 0), pads[0], pads[1]])
    h, w = x.shape[1], x.shape[2]
    ho, wo = h - kh + 1, w - kw + 1
    if ho < 1 or wo < 1:
        raise ConfigError(f"kernel {kh}x{kw} larger than its (padded) input {h}x{w}")
    if impl == "shifted":
        # The input in memory, with its derivatives, in Hessian-vector products (nothing in a
        # gradient, nothing for data, which is not differentiated): see materialize_tangents.
        return shifted.conv(materialize_tangents(x), k_HW, "NHW")
    if impl == "fused":
        # One layer on its own: the batch-minor layout of eos_jax.models.fused (the whole-stack
        # fusion happens in PaperCNN when every layer is "fused").
        return jnp.transpose(shifted.conv(jnp.transpose(x, (1, 2, 0)), k_HW, "HWN"), (2, 0, 1))
    if impl == "fft":
        # Circular cross-correlation of size (h, w) equals the linear one on the valid
        # region: c[n] = sum_m K[m] x[n+m] has n+m <= h-1 there.
        x_hat = jnp.fft.rfft2(x, s=(h, w))
        k_hat = jnp.fft.rfft2(k_HW, s=(h, w))
        out = jnp.fft.irfft2(x_hat * jnp.conj(k_hat)[None], s=(h, w))
        return out[:, :ho, :wo].astype(x_NHW.dtype)
    raise ConfigError(f"conv impl={impl!r}; allowed: 'lax', 'shifted', 'fft', 'fused'")


class Conv(nn.Module):
    """Conv layer (HWIO kernel, optional bias) with a selectable init and implementation.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.layers import Conv
      >>> layer = Conv(4, (3, 3), padding="valid")
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
      >>> jax.tree_util.tree_map(lambda a: a.shape, shapes["params"])
      {'bias': (4,), 'kernel': (3, 3, 1, 4)}
      >>> jax.eval_shape(layer.apply, shapes, x).shape
      (2, 6, 6, 4)
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "same"
    use_bias: bool = True
    init_scheme: str = "pytorch"
    init_std: float = 1.0
    impl: str = "lax"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        shape = (*self.kernel_size, cin, self.features)
        kernel = self.param("kernel", make_kernel_init(self.init_scheme, std=self.init_std), shape, self.dtype)
        y = conv2d(x, kernel, padding=self.padding, strides=self.strides, impl=self.impl)
        if self.use_bias:
            bias = self.param("bias", make_bias_init(self.init_scheme, _fan_in(shape)), (self.features,), self.dtype)
            y = y + bias[None, None, None, :]
        return y


class SingleChannelConv(nn.Module):
    """Bias-free one-channel conv on ``(N, H, W)`` arrays; kernel stored as HWIO ``(kh, kw, 1, 1)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.layers import SingleChannelConv
      >>> layer = SingleChannelConv((3, 3))
      >>> y = jax.jit(layer.apply)({"params": {"kernel": jnp.ones((3, 3, 1, 1))}}, jnp.ones((2, 5, 5)))
      >>> y.shape, float(y[0, 0, 0])
      ((2, 3, 3), 9.0)
    """

    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "valid"
    init_scheme: str = "pytorch"
    init_std: float = 1.0
    impl: str = "shifted"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_NHW: Array) -> Array:
        shape = (*self.kernel_size, 1, 1)
        kernel = self.param("kernel", make_kernel_init(self.init_scheme, std=self.init_std), shape, self.dtype)
        return conv2d_single_channel(x_NHW, kernel[:, :, 0, 0], padding=self.padding, impl=self.impl)


class Dense(nn.Module):
    """Dense layer with a selectable init (PyTorch uniform fan-in or flax defaults).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.models.layers import Dense
      >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.array([0.5, -0.5])}
      >>> jax.jit(Dense(2).apply)({"params": params}, jnp.ones((1, 3))).tolist()
      [[3.5, 2.5]]
    """

    features: int
    use_bias: bool = True
    init_scheme: str = "pytorch"
    init_std: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", make_kernel_init(self.init_scheme, std=self.init_std), shape, self.dtype)
        y = jnp.matmul(x, kernel, precision=lax.Precision.HIGHEST)
        if self.use_bias:
            bias = self.param("bias", make_bias_init(self.init_scheme, shape[0]), (self.features,), self.dtype)
            y = y + bias[None, :]
        return y
