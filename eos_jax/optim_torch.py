"""PyTorch's CPU float32/float64 rounding for :func:`eos_jax.optim.sgd` / :func:`eos_jax.optim.adam`.

``rounding="torch"`` reproduces ``torch.optim.SGD`` / ``torch.optim.Adam`` (``foreach=False``,
the single-tensor loop) as run by PyTorch 2.13 on CPU, operation by operation. Measured
on that build (``scripts/make_torch_fixtures.py``; AVX2 kernels), each tensor op rounds
as follows, with ``RN`` one rounding to nearest-even in the parameter dtype ``D`` and
``fma`` one rounding of the exact ``a*b + c`` (:func:`eos_jax.fma.fma`):

* ``x.add(y, alpha=a)`` = ``fma(D(a), y, x)`` (ATen's ``vec::fmadd``), ``alpha=1``: ``RN(x + y)``;
* ``x.mul_(s)`` = ``RN(D(s) * x)``; ``x / s`` = ``RN(x / D(s))`` (a true division, not a
  multiplication by ``1/s``); ``x * s`` = ``RN(D(s) * x)``;
* ``x.lerp_(y, w)`` = ``fma(W, RN(y - x), x)`` for ``W = D(w) < 0.5``, else
  ``fma(RN(W - 1), RN(y - x), y)``;
* ``x.addcmul_(y, z, value=s)`` = ``fma(RN(D(s) * y), z, x)``;
* ``x.addcdiv_(y, z, value=s)`` = ``RN(x + RN(RN(D(s) * y) / z))``;
* Python scalars (``lr * k``, ``1 - beta1 ** step``, ``lr / bias_correction1``,
  ``bias_correction2 ** 0.5``) are IEEE doubles, rounded to ``D`` when they meet a tensor.

SGD (dampening 0; ``k`` as in the authors' ``instability/PDE_nesterov.py``, form
``"reference"``): ``d = fma(wd, p, g)``; ``b = d`` at the first step, else
``b = RN(RN(mu*b) + d)`` (two roundings); Nesterov ``d = fma(mu, b, d)``, else ``d = b``;
``d = RN(d / k)``; ``p = fma(-D(lr*k), d, p)``. Form ``"paper"`` uses ``d = RN(k*d)`` and
``-D(lr/k)`` instead (what ``p.add_(d * k, alpha=-(lr / k))`` computes).

Adam (non-amsgrad, L2 weight decay): ``g = fma(wd, p, g)``; ``m = lerp(m, g, 1 - b1)``;
``v = fma(RN(D(1-b2)*g), g, RN(b2*v))``; ``den = RN(RN(sqrt(v) / D(sqrt(bc2))) + D(eps))``;
``p = RN(p + RN(RN(-D(step_size) * m') / den))`` with ``step_size = lr*k / bc1`` (double)
and ``m' = RN(m / k)`` (form ``"reference"``; ``"paper"``: ``lr/k`` and ``RN(k*m)``).
``sqrt`` here is the correctly rounded one. PyTorch's CPU ``Tensor.sqrt`` is NOT: on the
generating machine (AMD EPYC, AVX2) it differs from the correctly rounded square root in
2,876,932 of the 16,777,216 float32 inputs in [1, 4), by one ulp, and only where the exact
root lies more than a quarter ulp from the nearest float32; the results are a function of
the element alone (not of its position or the tensor's size), but the kernel's formula was
not identified (no float32 rsqrt + Newton variant tried reproduces it) and may differ on
other CPUs. Substituting PyTorch's own sqrt values for ``jnp.sqrt`` made all seven fixture
Adam runs bitwise equal; with the correctly rounded sqrt, 48 to 60 of 2,000 parameters
differ after 30 steps (the exact counts are asserted in tests/test_optim_torch.py).

Scalars. Concrete hyperparameters (Python numbers) are combined in float64 NumPy at trace
time, exactly as PyTorch's Python code does. Traced ones (a vmapped lr, a schedule) are
combined in ``D``: for SGD ``D(lr_D * k)`` equals PyTorch's ``D(double(lr_D) * k)``
(the product is exact in double), i.e. PyTorch run with the learning rate ``lr_D``.
Adam's step-dependent scalars are computed on the host in double precision
(``jax.pure_callback``, once per step), as PyTorch does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eos_jax.errors import ConfigError
from eos_jax.fma import fma, opaque_zero, rounded_mul


class TorchSGDState(NamedTuple):
    """State of the ``rounding="torch"`` SGD.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim
      >>> state = optim.sgd(0.1, rounding="torch").init(jnp.zeros(2))
      >>> type(state).__name__, int(state.count), state.momentum_buffer
      ('TorchSGDState', 0, None)
      >>> optim.sgd(0.1, momentum=0.9, rounding="torch").init(jnp.zeros(2)).momentum_buffer.tolist()
      [0.0, 0.0]
    """

    count: jax.Array  # int32: steps taken so far (0: the momentum buffer is not yet set)
    momentum_buffer: Any  # pytree like params, or None without momentum


class TorchAdamState(NamedTuple):
    """State of the ``rounding="torch"`` Adam (PyTorch's ``state_steps``, ``exp_avg``, ``exp_avg_sq``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim
      >>> state = optim.adam(0.1, rounding="torch").init({"w": jnp.zeros(3)})
      >>> type(state).__name__, int(state.count), state.exp_avg["w"].shape
      ('TorchAdamState', 0, (3,))
    """

    count: jax.Array  # int32: steps taken so far
    exp_avg: optax.Updates
    exp_avg_sq: optax.Updates


class TorchRoundedOptimizer(NamedTuple):
    """An optimizer whose step returns new parameters (an FMA-rounded ``p + alpha*d`` is not
    ``p + u`` for any representable update ``u``).

    Use :func:`eos_jax.optim.apply_step` (or ``step``) instead of ``update`` +
    ``optax.apply_updates``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim
      >>> from eos_jax.optim_torch import TorchRoundedOptimizer
      >>> opt = optim.sgd(0.1, rounding="torch")
      >>> isinstance(opt, TorchRoundedOptimizer)
      True
      >>> p = jnp.zeros(2)
      >>> opt.update(p, opt.init(p), p)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: rounding='torch' rounds p + alpha*d once, which no update u reproduces
        through params + u; allowed: eos_jax.optim.apply_step(opt, grads, state, params)
    """

    init: Callable[[optax.Params], Any]
    step: Callable[[optax.Updates, Any, optax.Params], tuple[optax.Params, Any]]

    def update(self, updates, state, params=None):  # noqa: D102 - optax-shaped refusal
        raise ConfigError(
            "rounding='torch' rounds p + alpha*d once, which no update u reproduces through params + u; "
            "allowed: eos_jax.optim.apply_step(opt, grads, state, params)"
        )


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _concrete(x: Any) -> bool:
    return not callable(x) and not _is_tracer(x)


def _spread_like(s: jax.Array, x: jax.Array) -> jax.Array:
    """Scalar ``s`` at every element of ``x`` behind a barrier, so that ``x / s`` stays a
    true division (XLA turns ``x / broadcast(c)`` into ``x * (1/c)``, not correctly rounded)."""
    return jax.lax.optimization_barrier(jnp.where(jnp.isnan(x), s, s))


def _scalar(value: float, dtype: np.dtype) -> jax.Array:
    """A double rounded to ``dtype`` (PyTorch's Scalar -> opmath conversion), opaque to XLA."""
    return jax.lax.optimization_barrier(jnp.asarray(np.asarray(value, np.float64).astype(dtype)))


def _traced_scalar(x: Any, dtype: np.dtype) -> jax.Array:
    return jax.lax.optimization_barrier(jnp.asarray(x).astype(dtype))


def _lr_scalar(lr: Any, k: Any, form: str, count: jax.Array, dtype: np.dtype) -> jax.Array:
    """``D(lr*k)`` (reference) or ``D(lr/k)`` (paper): double when concrete, else in ``D``."""
    if _concrete(lr) and _concrete(k):
        lr64, k64 = float(np.asarray(lr)), float(np.asarray(k))
        return _scalar(lr64 * k64 if form == "reference" else lr64 / k64, dtype)
    lr_v = lr(count) if callable(lr) else lr
    lr_d, k_d = _traced_scalar(lr_v, dtype), _traced_scalar(k, dtype)
    return rounded_mul(lr_d, k_d, opaque_zero(dtype)) if form == "reference" else lr_d / k_d


def _leaf_dtype(x: jax.Array) -> np.dtype:
    dtype = np.dtype(x.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ConfigError(f"rounding='torch': leaf of dtype {dtype}; allowed: float32 or float64 parameters")
    return dtype


def _scale_by_k(d: jax.Array, k: Any, form: str) -> jax.Array:
    """``RN(d / k)`` (reference) or ``RN(k * d)`` (paper); ``k = 1`` is exact either way."""
    dtype = np.dtype(d.dtype)
    k_d = _scalar(float(np.asarray(k)), dtype) if _concrete(k) else _traced_scalar(k, dtype)
    if form == "reference":
        return d / _spread_like(k_d, d)
    return rounded_mul(k_d, d, opaque_zero(dtype))


def torch_sgd(
    learning_rate: Any, *, k: Any, momentum: float, nesterov: bool, weight_decay: float, form: str
) -> TorchRoundedOptimizer:
    """SGD with PyTorch's CPU roundings (module docstring); arguments as :func:`eos_jax.optim.sgd`.

    Examples:
      ``p - lr*g`` rounded once (``p.add_(g, alpha=-lr)``), checked against the exact
      value rounded to float32 (``Fraction``):

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from fractions import Fraction
      >>> from eos_jax.optim_torch import torch_sgd
      >>> opt = torch_sgd(0.1, k=1, momentum=0.0, nesterov=False, weight_decay=0.0, form="reference")
      >>> p = jnp.ones(1, jnp.float32); g = jnp.full(1, 0.3, jnp.float32)
      >>> new_p, state = jax.jit(opt.step)(g, opt.init(p), p)
      >>> new_p.tolist(), int(state.count)
      ([0.9699999690055847], 1)
      >>> exact = 1 - Fraction(float(np.float32(0.1))) * Fraction(float(np.float32(0.3)))
      >>> float(np.float32(float(exact)))
      0.9699999690055847
    """
    use_momentum = _is_tracer(momentum) or float(np.asarray(momentum)) != 0.0
    use_wd = _is_tracer(weight_decay) or float(np.asarray(weight_decay)) != 0.0

    def coef(x: Any, dtype: np.dtype) -> jax.Array:
        return _scalar(float(np.asarray(x)), dtype) if _concrete(x) else _traced_scalar(x, dtype)

    def init(params):
        buf = jax.tree_util.tree_map(jnp.zeros_like, params) if use_momentum else None
        return TorchSGDState(count=jnp.zeros((), jnp.int32), momentum_buffer=buf)

    def step(grads, state, params):
        first = state.count == 0

        def leaf(g, p, b):
            dtype = _leaf_dtype(p)
            zero = opaque_zero(dtype)
            d = fma(coef(weight_decay, dtype), p, g) if use_wd else g  # grad.add(p, alpha=wd)
            if use_momentum:
                mu = coef(momentum, dtype)
                b = jnp.where(first, d, rounded_mul(mu, b, zero) + d)  # clone, or mul_(mu).add_(d)
                d = fma(mu, b, d) if nesterov else b  # d.add(b, alpha=mu)
            d = _scale_by_k(d, k, form)
            alpha = -_lr_scalar(learning_rate, k, form, state.count, dtype)
            return fma(alpha, d, p), b  # p.add_(d, alpha=-lr)

        bufs = state.momentum_buffer if use_momentum else jax.tree_util.tree_map(lambda _: None, params)
        out = jax.tree_util.tree_map(leaf, grads, params, bufs, is_leaf=lambda x: x is None)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        new_p = jax.tree_util.tree_map(lambda t: t[0], out, is_leaf=is_pair)
        new_b = jax.tree_util.tree_map(lambda t: t[1], out, is_leaf=is_pair) if use_momentum else None
        return new_p, TorchSGDState(count=optax.safe_increment(state.count), momentum_buffer=new_b)

    return TorchRoundedOptimizer(init=init, step=step)


def _adam_host_scalars(lr, k, b1: float, b2: float, form: str, dtype: np.dtype):
    """Host function ``(t, lr?, k?) -> [D(-step_size), D(bc2 ** 0.5)]`` computed in Python floats."""

    def host(t, *traced):
        t = np.asarray(t)
        vals = [np.asarray(v) for v in traced]
        shape = np.broadcast_shapes(t.shape, *[v.shape for v in vals])
        t = np.broadcast_to(t, shape)
        vals = [np.broadcast_to(v, shape) for v in vals]
        out = np.empty(shape + (2,), dtype)
        for idx in np.ndindex(shape):
            it = iter(vals)
            lr_f = float(next(it)[idx]) if not _concrete(lr) else float(np.asarray(lr))
            k_f = float(next(it)[idx]) if not _concrete(k) else float(np.asarray(k))
            step = float(t[idx])  # torch: the float32 step tensor's value, a Python float
            bc1 = 1 - b1**step
            bc2 = 1 - b2**step
            lr_k = lr_f * k_f if form == "reference" else lr_f / k_f
            out[idx] = (-(lr_k / bc1), bc2**0.5)
        return out

    return host


def torch_adam(
    learning_rate: Any, *, k: Any, b1: float, b2: float, eps: float, weight_decay: float, form: str
) -> TorchRoundedOptimizer:
    """Adam with PyTorch's CPU roundings (module docstring); arguments as :func:`eos_jax.optim.adam`.

    Examples:
      The first step moves each parameter by ``lr`` against the gradient's sign (up to ``eps``):

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.optim_torch import torch_adam
      >>> opt = torch_adam(0.1, k=3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, form="reference")
      >>> p = jnp.ones(2, jnp.float32); g = jnp.array([0.5, -0.25], jnp.float32)
      >>> new_p, state = jax.jit(opt.step)(g, opt.init(p), p)
      >>> [round(float(x), 6) for x in new_p], int(state.count)
      ([0.9, 1.1], 1)
    """
    for name, v in (("b1", b1), ("b2", b2), ("eps", eps), ("weight_decay", weight_decay)):
        if not _concrete(v):
            raise ConfigError(f"rounding='torch': {name} is traced; allowed: a Python number")
    b1, b2, eps, weight_decay = float(b1), float(b2), float(eps), float(weight_decay)

    def init(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
        return TorchAdamState(count=jnp.zeros((), jnp.int32), exp_avg=zeros(), exp_avg_sq=zeros())

    def step(grads, state, params):
        count = optax.safe_increment(state.count)

        def leaf(g, p, m, v):
            dtype = _leaf_dtype(p)
            zero = opaque_zero(dtype)
            if weight_decay != 0.0:
                g = fma(_scalar(weight_decay, dtype), p, g)
            w = np.float64(1 - b1).astype(dtype)  # exp_avg.lerp_(grad, 1 - beta1)
            diff = g - m
            if w < 0.5:
                m = fma(_scalar(w, dtype), diff, m)
            else:
                m = fma(_scalar(w - dtype.type(1), dtype), diff, g)
            # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            v = fma(rounded_mul(_scalar(1 - b2, dtype), g, zero), g, rounded_mul(_scalar(b2, dtype), v, zero))
            traced = [x for x in (learning_rate, k) if not _concrete(x)]
            if callable(learning_rate):
                traced[0] = learning_rate(state.count)
            host = _adam_host_scalars(learning_rate, k, b1, b2, form, dtype)
            shape = jax.ShapeDtypeStruct(jnp.shape(count) + (2,), dtype)
            s = jax.pure_callback(host, shape, count, *traced, vmap_method="broadcast_all")
            s = jax.lax.optimization_barrier(s)
            neg_step, bc2_sqrt = s[..., 0], s[..., 1]
            denom = jnp.sqrt(v) / _spread_like(bc2_sqrt, v) + _scalar(eps, dtype)
            num = _scale_by_k(m, k, form)
            # param.addcdiv_(exp_avg, denom, value=-step_size)
            return p + rounded_mul(neg_step, num, zero) / denom, m, v

        out = jax.tree_util.tree_map(leaf, grads, params, state.exp_avg, state.exp_avg_sq)
        is_t = lambda x: isinstance(x, tuple)  # noqa: E731
        part = lambda i: jax.tree_util.tree_map(lambda t: t[i], out, is_leaf=is_t)  # noqa: E731
        return part(0), TorchAdamState(count=count, exp_avg=part(1), exp_avg_sq=part(2))

    return TorchRoundedOptimizer(init=init, step=step)
