"""Models as pure functions, chosen by name: ``get(name, **cfg) -> Model``.

A :class:`Model` has two pure functions over plain dicts of arrays::

    variables = model.init(key, input_shape)           # input_shape: ONE example, HWC
    logits, new_state = model.apply(variables, x_NHWC, train=True)

``variables`` is ``{"params": ...}`` plus ``"batch_stats"`` for batch-norm models;
``new_state`` holds the non-parameter collections (``{}`` when there are none): the
updated batch statistics when ``train=True``, the unchanged ones when
``train=False`` (so its structure does not depend on ``train``). Logits are
``(N, num_outputs)``; binary models have ``num_outputs=1`` and return the logit
before the sigmoid. Inputs are cast to the model's dtype (float32 by default).

Names: ``"cnn"`` (the paper's Eq. (6), (20)-(21)), ``"fc"``, ``"vgg16"``,
``"vgg16_bn"``, ``"resnet56"`` (option-A shortcuts), ``"resnet56_authors"`` (the authors' option-B
ResNet-56; see :mod:`eos_jax.models.resnet`). ``model.info`` is a JSON-able dict for run metadata
(resolved config, convolution implementation per layer, dtype).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError
from eos_jax.models.cnn import FC, POOLS, PaperCNN
from eos_jax.models.layers import (
    ACTIVATIONS,
    INIT_SCHEMES,
    PADDINGS,
    check_choice,
    resolve_conv_impl,
)
from eos_jax.models.resnet import ResNetCifar
from eos_jax.models.vgg import BN_STATS, VGG, VGG16_CFG

__all__ = ["Model", "get", "names", "count_params"]

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A named network with pure ``init`` and ``apply`` (see the module docstring).

    Attributes:
      name: registry name.
      module: the flax module underneath.
      info: JSON-able description for run metadata.
      dtype: working dtype of parameters and activations.
      has_batch_stats: whether ``variables`` carry ``"batch_stats"``.
      in_channels: required number of input channels, or None for any.

    Examples:
      A one-layer 3x3 CNN (Eq. (6)) on a batch of two 8x8 grey images:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import models
      >>> model = models.get("cnn", kernel_size=3)
      >>> variables = jax.jit(model.init, static_argnums=1)(jax.random.PRNGKey(0), (8, 8, 1))
      >>> variables["params"]["conv0"]["kernel"].shape
      (3, 3, 1, 1)
      >>> apply = jax.jit(model.apply, static_argnames="train")
      >>> logits, new_state = apply(variables, jnp.ones((2, 8, 8, 1)), train=False)
      >>> logits.shape, logits.dtype, new_state
      ((2, 1), dtype('float32'), {})
      >>> model.info["conv_impl"], model.has_batch_stats
      ('shifted', False)
    """

    name: str
    module: nn.Module
    info: dict[str, Any]
    dtype: Any
    has_batch_stats: bool = False
    in_channels: int | None = None

    def _check_shape(self, shape: Sequence[int], what: str) -> None:
        """Raises ConfigError unless ``shape`` is HWC with the required channels."""
        if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise ConfigError(f"{what}={tuple(shape)!r}; allowed: (height, width, channels) of positive ints")
        if self.in_channels is not None and shape[-1] != self.in_channels:
            raise ConfigError(
                f"{what} has {shape[-1]} channels but model {self.name!r} was built with in_channels={self.in_channels}"
            )

    def init(self, key: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
        """Initial variables for inputs of one example's shape ``input_shape`` (H, W, C).

        Args:
          key: PRNG key.
          input_shape: shape of ONE example, NHWC without the batch axis.

        Returns:
          ``{"params": ...}`` (plus ``"batch_stats"`` for BN models), a plain dict.
        """
        self._check_shape(tuple(input_shape), "input_shape")
        x = jnp.zeros((1, *input_shape), self.dtype)
        kwargs = {"train": False} if self.has_batch_stats else {}
        variables = self.module.init(key, x, **kwargs)
        return flax.core.unfreeze(variables)

    def apply(self, variables: dict[str, Any], x: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        """Logits and new non-parameter state.

        Args:
          variables: from :meth:`init` (or updated params / batch stats).
          x: ``(N, H, W, C)`` inputs; cast to the model dtype.
          train: batch-norm mode: batch statistics (and updated running ones in
            ``new_state``) if True, running statistics (unchanged) if False.

        Returns:
          ``(logits (N, num_outputs), new_state)``.
        """
        if x.ndim != 4:
            raise ConfigError(f"model input has shape {tuple(x.shape)}; expected (N, H, W, C)")
        x = jnp.asarray(x).astype(self.dtype)
        if not self.has_batch_stats:
            return self.module.apply({"params": variables["params"]}, x), {}
        if train:
            logits, mutated = self.module.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, {"batch_stats": mutated["batch_stats"]}
        logits = self.module.apply(variables, x, train=False)
        return logits, {"batch_stats": variables["batch_stats"]}


def count_params(variables_or_params: Any) -> int:
    """Number of trainable scalars (``variables["params"]`` if given full variables).

    Examples:
      Cohen et al.'s fc-tanh on MNIST has ``784*200 + 200 + 200*200 + 200 + 200*10 + 10``
      parameters; shapes alone suffice (:func:`jax.eval_shape`, nothing is initialised):

      >>> import jax
      >>> from eos_jax import models
      >>> fc = models.get("fc", width=200, depth=2, num_outputs=10)
      >>> shapes = jax.eval_shape(lambda key: fc.init(key, (28, 28, 1)), jax.random.PRNGKey(0))
      >>> models.count_params(shapes)
      199210
      >>> models.count_params(shapes) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
      True
    """
    tree = variables_or_params
    if isinstance(tree, dict) and "params" in tree:
        tree = tree["params"]
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def _dtype(dtype: Any) -> tuple[Any, str]:
    """Normalizes a dtype given by name or object to (jnp dtype, name)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}; allowed: {', '.join(_DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("dtype='float64' needs jax_enable_x64 (eos_jax.runtime.configure(x64=True))")
    return _DTYPES[name], name


def _pos_int(name: str, v: Any) -> int:
    """Validates a positive int."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name}={v!r}; allowed: a positive int")
    return int(v)


def _common(activation: str, beta: float, init: str) -> None:
    """Validates activation, beta and init."""
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (beta > 0 and np.isfinite(beta)):
        raise ConfigError(f"beta={beta!r}; allowed: a finite number > 0")
    check_choice("init", init, INIT_SCHEMES)


def _cnn(
    *,
    layers: int = 1,
    channels: int | Sequence[int] = 1,
    kernel_size: int | Sequence[int] = 3,
    padding: str = "valid",
    activation: str = "swish",
    beta: float = 1.0,
    init: str = "pytorch",
    init_std: float = 1.0,
    head: str = "sum",
    num_outputs: int = 1,
    conv_impl: str = "auto",
    in_channels: int = 1,
    pool: str = "mean",
    dtype: Any = "float32",
) -> Model:
    """The paper's CNN, Eq. (20)-(21) (Eq. (6) for ``layers=1``); see ``cnn.py``.

    ``pool`` is how the integral over the image domain in Eq. (6)/(20) is discretized:
    ``"mean"`` (default) averages over the output positions, as the authors' released code
    does (``single_layer/PySun.py`` in sunyx523/surprising-instabilities: ``AvgPooling`` is
    ``np.mean`` over both spatial axes); ``"sum"`` is the literal Riemann sum with unit pixel
    area (the logit is then ``(H_out * W_out)`` times larger, which moves every stability
    threshold by that factor).
    """
    layers = _pos_int("layers", layers)
    chans = (channels,) * layers if isinstance(channels, (int, np.integer)) else tuple(channels)
    if len(chans) != layers:
        raise ConfigError(f"channels={channels!r} has {len(chans)} entries; allowed: an int or {layers} ints")
    chans = tuple(_pos_int("channels", c) for c in chans)
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, (int, np.integer)) else tuple(kernel_size)
    if len(ks) != 2:
        raise ConfigError(f"kernel_size={kernel_size!r}; allowed: an int or (height, width)")
    ks = tuple(_pos_int("kernel_size", k) for k in ks)
    check_choice("padding", padding, PADDINGS)
    _common(activation, beta, init)
    check_choice("head", head, ("sum", "linear"))
    check_choice("pool", pool, POOLS)
    num_outputs = _pos_int("num_outputs", num_outputs)
    if head == "sum" and num_outputs != 1:
        raise ConfigError(f"num_outputs={num_outputs} with head='sum' (one logit); use head='linear'")
    in_channels = _pos_int("in_channels", in_channels)
    jdtype, dname = _dtype(dtype)
    ins = (in_channels,) + chans[:-1]
    impls = tuple(resolve_conv_impl(conv_impl, i, o, ks) for i, o in zip(ins, chans))
    module = PaperCNN(
        chans, ks, padding, impls, activation, float(beta), init, float(init_std), head, num_outputs, jdtype, pool
    )
    cfg = dict(
        layers=layers,
        channels=list(chans),
        kernel_size=list(ks),
        padding=padding,
        activation=activation,
        beta=float(beta),
        init=init,
        init_std=float(init_std),
        head=head,
        num_outputs=num_outputs,
        conv_impl=conv_impl,
        in_channels=in_channels,
        pool=pool,
        dtype=dname,
    )
    info = {
        "name": "cnn",
        "config": cfg,
        "dtype": dname,
        "num_outputs": num_outputs,
        "conv_impl": impls[0] if len(set(impls)) == 1 else "mixed",
        "conv_impl_per_layer": list(impls),
        "batch_stats": False,
    }
    return Model("cnn", module, info, jdtype, False, in_channels)


def _fc(
    *,
    width: int = 200,
    depth: int = 2,
    num_outputs: int = 10,
    activation: str = "tanh",
    beta: float = 1.0,
    init: str = "pytorch",
    use_bias: bool = True,
    dtype: Any = "float32",
) -> Model:
    """Fully connected network (Cohen et al.'s fc-tanh by default)."""
    width, depth, num_outputs = _pos_int("width", width), _pos_int("depth", depth), _pos_int("num_outputs", num_outputs)
    _common(activation, beta, init)
    jdtype, dname = _dtype(dtype)
    module = FC(width, depth, num_outputs, activation, float(beta), init, bool(use_bias), jdtype)
    cfg = dict(
        width=width,
        depth=depth,
        num_outputs=num_outputs,
        activation=activation,
        beta=float(beta),
        init=init,
        use_bias=bool(use_bias),
        dtype=dname,
    )
    info = {
        "name": "fc",
        "config": cfg,
        "dtype": dname,
        "num_outputs": num_outputs,
        "conv_impl": None,
        "batch_stats": False,
    }
    return Model("fc", module, info, jdtype)


def _vgg(name: str, bn: bool):
    """Builder of VGG16 (with or without BN)."""

    def build(
        *,
        num_outputs: int = 10,
        activation: str = "relu",
        beta: float = 1.0,
        init: str = "pytorch",
        dtype: Any = "float32",
    ) -> Model:
        num_outputs = _pos_int("num_outputs", num_outputs)
        _common(activation, beta, init)
        jdtype, dname = _dtype(dtype)
        module = VGG(VGG16_CFG, num_outputs, bn, activation, float(beta), init, jdtype)
        cfg = dict(num_outputs=num_outputs, activation=activation, beta=float(beta), init=init, dtype=dname)
        info = {
            "name": name,
            "config": cfg,
            "dtype": dname,
            "num_outputs": num_outputs,
            "conv_impl": "lax",
            "classifier": "linear 512 -> num_outputs (kuangliu/pytorch-cifar)",
            "batch_stats": bn,
        }
        return Model(name, module, info, jdtype, bn)

    return build


def _resnet56(
    *,
    num_outputs: int = 10,
    activation: str = "relu",
    beta: float = 1.0,
    init: str = "pytorch",
    dtype: Any = "float32",
    bn_stats: str = "two_pass",
) -> Model:
    """ResNet-56 for CIFAR, option-A shortcuts (He et al. 2016): 853,018 parameters for 10 classes.

    ``bn_stats="one_pass"`` (opt-in, other bits) computes the training batch statistics in one pass and
    normalizes with one multiply-add (:class:`eos_jax.models.vgg.BatchNorm`); it is recorded in ``info``
    and its ``config``. The default, ``"two_pass"``, is left out of both, so default metadata is as before.

    Examples:
      >>> from eos_jax import models
      >>> "bn_stats" in models.get("resnet56").info["config"]
      False
      >>> models.get("resnet56", bn_stats="one_pass").info["bn_stats"]
      'one_pass'
    """
    num_outputs = _pos_int("num_outputs", num_outputs)
    _common(activation, beta, init)
    check_choice("bn_stats", bn_stats, BN_STATS)
    jdtype, dname = _dtype(dtype)
    module = ResNetCifar(9, num_outputs, activation, float(beta), init, jdtype, bn_stats=bn_stats)
    cfg = dict(num_outputs=num_outputs, activation=activation, beta=float(beta), init=init, dtype=dname)
    info = {
        "name": "resnet56",
        "config": cfg,
        "dtype": dname,
        "num_outputs": num_outputs,
        "conv_impl": "lax",
        "shortcut": "A",
        "batch_stats": True,
    }
    if bn_stats != "two_pass":
        cfg["bn_stats"] = info["bn_stats"] = bn_stats
    return Model("resnet56", module, info, jdtype, True)


def _resnet56_authors(
    *, num_outputs: int = 10, activation: str = "relu", beta: float = 5.0, dtype: Any = "float32"
) -> Model:
    """ResNet-56 as the authors build it (``instability/resnet.py``, ``resnet_swish.py``).

    Option-B shortcuts (1x1 conv + BN), convolutions initialized ``N(0, 2 / (kh*kw*out))``, the
    linear layer PyTorch's default, Swish ``x * sigmoid(5 x)`` (``beta=5.0``, used only with
    ``activation="swish"``). 855,770 parameters for 10 classes (``"resnet56"``: 853,018). The
    initialization is part of the construction, so there is no ``init`` option.

    Examples:
      >>> from eos_jax import models
      >>> m = models.get("resnet56_authors", activation="swish")
      >>> m.info["shortcut"], m.info["config"]["beta"], m.info["init"]
      ('B', 5.0, {'conv': 'he_fan_out', 'fc': 'pytorch'})
    """
    num_outputs = _pos_int("num_outputs", num_outputs)
    _common(activation, beta, "he_fan_out")
    jdtype, dname = _dtype(dtype)
    module = ResNetCifar(9, num_outputs, activation, float(beta), "he_fan_out", jdtype, "B", "pytorch")
    cfg = dict(num_outputs=num_outputs, activation=activation, beta=float(beta), dtype=dname)
    info = {
        "name": "resnet56_authors",
        "config": cfg,
        "dtype": dname,
        "num_outputs": num_outputs,
        "conv_impl": "lax",
        "shortcut": "B",
        "init": {"conv": "he_fan_out", "fc": "pytorch"},
        "source": "sunyx523/surprising-instabilities instability/resnet.py, resnet_swish.py",
        "batch_stats": True,
    }
    return Model("resnet56_authors", module, info, jdtype, True)


_REGISTRY = {
    "cnn": _cnn,
    "fc": _fc,
    "vgg16": _vgg("vgg16", False),
    "vgg16_bn": _vgg("vgg16_bn", True),
    "resnet56": _resnet56,
    "resnet56_authors": _resnet56_authors,
}


def names() -> tuple[str, ...]:
    """Registered model names.

    Examples:
      >>> from eos_jax import models
      >>> models.names()
      ('cnn', 'fc', 'vgg16', 'vgg16_bn', 'resnet56', 'resnet56_authors')
    """
    return tuple(_REGISTRY)


def get(name: str, **cfg: Any) -> Model:
    """Builds the model ``name`` from keyword configuration.

    Args:
      name: one of :func:`names`.
      **cfg: the builder's keywords; common ones are ``activation`` (``"relu"``,
        ``"swish"``, ``"tanh"``), ``beta`` (Swish), ``init`` (``"pytorch"``,
        ``"jax"``, ``"normal"``), ``num_outputs`` and ``dtype`` (``"float32"``
        default, ``"float64"``). ``cnn`` adds ``layers``, ``channels``,
        ``kernel_size``, ``padding`` (``"valid"``/``"same"``), ``head``
        (``"sum"``/``"linear"``), ``pool`` (``"mean"``/``"sum"`` over positions), ``conv_impl`` (``"auto"``, ``"lax"``,
        ``"shifted"``, ``"fft"``, ``"fused"``), ``init_std``, ``in_channels``; ``fc`` adds
        ``width``, ``depth``, ``use_bias``.

    Returns:
      A :class:`Model`.

    Raises:
      ConfigError: unknown name, unknown keyword or invalid value.

    Examples:
      The paper's three-layer Swish CNN (Eq. (20)-(21)) and two rejected configurations:

      >>> from eos_jax import models
      >>> cnn = models.get("cnn", layers=3, kernel_size=3, activation="swish", beta=1.0)
      >>> cnn.info["config"]["channels"], cnn.info["conv_impl_per_layer"]
      ([1, 1, 1], ['shifted', 'shifted', 'shifted'])
      >>> models.get("mlp")
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: model name='mlp'; allowed: cnn, fc, vgg16, vgg16_bn, resnet56,
        resnet56_authors
      >>> models.get("cnn", width=3)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: unknown option(s) width for model 'cnn'; allowed: layers, channels,
        kernel_size, padding, activation, beta, init, init_std, head, num_outputs, conv_impl, in_channels, pool, dtype
    """
    if name not in _REGISTRY:
        raise ConfigError(f"model name={name!r}; allowed: {', '.join(_REGISTRY)}")
    builder = _REGISTRY[name]
    allowed = [p for p in inspect.signature(builder).parameters]
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; allowed: {', '.join(allowed)}")
    return builder(**cfg)
