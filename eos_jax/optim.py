"""Perturbed optimizers of Section 4.1 ("PERTURBED SGD") as optax transforms.

The paper replaces the update ``theta <- theta - eta * g_t`` (SGD) by

    theta <- theta - (eta / k) * (k * g_t)                       (PERTURBED SGD)

with an integer ``k``: equal in exact arithmetic, but in floating point the right-hand
side is ``fl(fl(eta/k) * fl(k*g))`` instead of ``fl(eta*g)``, a perturbation of the last
bit(s) of the update. Powers of two change nothing (only the exponent moves); odd ``k``
change a fraction of the elements by one or two ulps.

What this module computes, per leaf, in the leaf's (= parameter's) dtype ``D``:

0. ``lr_D = D(lr)`` and ``k_D = D(k)``: casts. ``k_D`` is exact for ``k <= 2**(mant+1)``
   (checked for concrete ``k``); ``lr_D`` is the learning rate rounded to ``D``.
1. ``q = fl(lr_D / k_D)``           (one rounding)
2. ``p = fl(k_D * u)``              (one rounding per element)
3. ``fl(q * p)``                    (one rounding per element), then the sign (exact).
   ``form="reference"`` computes ``-(fl(lr_D * k_D) * fl(u / k_D))`` instead, which is
   what the authors' public PyTorch code does.

Two compiler hazards are kept away:

* Constant folding. With compile-time constants ``lr`` and ``k``, XLA's algebraic
  simplifier rewrites ``c1 * (c2 * x)`` into ``(c1 * c2) * x`` (and ``x / c`` into
  ``x * (1/c)``): with ``lr=0.1`` and ``k=7`` or ``9`` the perturbation silently vanishes.
  ``lr_D`` and ``k_D`` therefore pass through ``jax.lax.optimization_barrier``, after
  which they are not constants to the simplifier.
* FMA contraction. XLA:CPU (and LLVM in general) contracts ``theta + (-(q * p))`` into
  one fused multiply-add when the update is fused with ``optax.apply_updates``; that
  drops rounding 3. The update is therefore returned as ``-(q * p) + z`` with ``z = +0``
  from the same barrier: adding ``+0`` is exact (it only turns an update of ``-0.0`` into
  ``+0.0``) and the add is no longer a bare product, so it cannot be contracted.
  ``params + updates`` then rounds exactly once more, as in the equation.
  The same contraction hits every ``a*b + c`` of the update rules (weight decay ``g + wd*p``,
  momentum ``mu*b + g``, Nesterov, Adam's moments: 23,613 of 100,000 float32 weight-decay terms
  came out once-rounded in a jitted step), so each such product is ``a*b + z`` as well
  (``_mul``); where LLVM can prove a product non-negative (Adam's ``(1-b2)*g*g``) it drops a
  constant ``+0``, and that zero is computed from runtime bits instead (``eos_jax.fma.runtime_zero``).
  Tested bitwise against NumPy's separately rounded operations, jitted.
* Division by a broadcast. XLA rewrites ``a / broadcast(b)`` into ``a * broadcast(1/b)``,
  which is not correctly rounded; under vmap a lane's divisor becomes such a broadcast
  (``vmap(lambda lr: lr_b / k_b)`` over 1000 lrs with a fixed k=3, each passed through
  its own barrier, got ``fl(lr/3)`` wrong in 317 lanes).
  ``lr`` and ``k`` therefore enter the barrier as one stacked array (batched together),
  and the ``form="reference"`` divisor is spread to the update's shape before a barrier.

``learning_rate`` and ``k`` may be traced scalars (a sweep builds the optimizer inside a
vmapped function); ``init`` never looks at their values, so state shapes do not depend
on them, and every state carries a step ``count`` (which drives schedules).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eos_jax.errors import ConfigError
from eos_jax.fma import opaque_zero, rounded_mul, runtime_zero
from eos_jax.optim_cfl import cfl_scale  # noqa: F401 - the adaptive step of Section 7, as eos_jax.optim.cfl_scale
from eos_jax.optim_torch import TorchRoundedOptimizer, torch_adam, torch_sgd

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
FORMS = ("paper", "reference")
ROUNDINGS = ("paper", "torch")


class PerturbedScaleState(NamedTuple):
    """State of :func:`perturbed_scale`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import optim
      >>> opt = optim.perturbed_scale(0.1, k=3)
      >>> state = opt.init({"w": jnp.zeros(2)})
      >>> type(state).__name__, int(state.count)
      ('PerturbedScaleState', 0)
      >>> _, state = jax.jit(opt.update)({"w": jnp.ones(2)}, state)
      >>> int(state.count)
      1
    """

    count: jax.Array  # int32: number of updates so far; the schedule is evaluated at it


class TorchMomentumState(NamedTuple):
    """State of the PyTorch-style momentum of :func:`sgd`.

    Examples:
      PyTorch copies the first (weight-decayed) gradient into the buffer:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import optim
      >>> opt = optim.sgd(0.1, momentum=0.9)
      >>> p = jnp.zeros(2); g = jnp.array([0.5, -0.25])
      >>> state = opt.init(p)
      >>> type(state[0]).__name__, state[0].momentum_buffer.tolist()
      ('TorchMomentumState', [0.0, 0.0])
      >>> _, state = jax.jit(opt.update)(g, state, p)
      >>> int(state[0].count), state[0].momentum_buffer.tolist()
      (1, [0.5, -0.25])
    """

    count: jax.Array  # int32: number of updates so far (0: the buffer is not yet set)
    momentum_buffer: optax.Updates


class TorchAdamState(NamedTuple):
    """State of the PyTorch-style Adam direction of :func:`adam`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim
      >>> opt = optim.adam(0.1)
      >>> state = opt.init(jnp.zeros(3))
      >>> type(state[0]).__name__, int(state[0].count), state[0].exp_avg_sq.shape
      ('TorchAdamState', 0, (3,))
    """

    count: jax.Array  # int32: number of updates so far
    exp_avg: optax.Updates  # first moment m
    exp_avg_sq: optax.Updates  # second moment v


# ----------------------------------------------------------------------------- validation


def _is_tracer(x: Any) -> bool:
    """Whether ``x`` is an abstract value (inside jit/vmap/grad) whose value is unknown."""
    return isinstance(x, jax.core.Tracer)


def _check_k(k: Any) -> None:
    """Raises ConfigError unless ``k`` is an integer >= 1 (a traced integer scalar is accepted)."""
    allowed = "allowed: an integer >= 1 (Python int or integer scalar array, possibly traced)"
    if isinstance(k, (bool, np.bool_)):
        raise ConfigError(f"k={k!r} is a bool; {allowed}")
    if _is_tracer(k) or isinstance(k, (jax.Array, np.ndarray, np.generic)):
        dtype, shape = np.dtype(k.dtype), tuple(k.shape)
        if dtype == np.bool_ or not np.issubdtype(dtype, np.integer) or shape != ():
            raise ConfigError(f"k has dtype {dtype} and shape {shape}; {allowed}")
        if _is_tracer(k):
            return  # value unknown here: the caller vouches for it
        k = int(np.asarray(k))
    elif not isinstance(k, numbers.Integral):
        raise ConfigError(f"k={k!r} ({type(k).__name__}) is not an integer; {allowed}")
    if int(k) < 1:
        raise ConfigError(f"k={k!r}; {allowed}")


def _check_nonnegative(name: str, value: Any, *, below_one: bool = False) -> None:
    """Raises ConfigError unless a concrete scalar is finite and >= 0 (and < 1 if asked)."""
    if callable(value) or _is_tracer(value):
        if _is_tracer(value) and tuple(value.shape) != ():
            raise ConfigError(f"{name} has shape {tuple(value.shape)}; allowed: a scalar")
        return
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name}={value!r} is a bool; allowed: a real number >= 0")
    arr = np.asarray(value)
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"{name}={value!r}; allowed: a real scalar >= 0")
    v = float(arr)
    upper = "1" if below_one else "inf"
    if not np.isfinite(v) or v < 0 or (below_one and v >= 1):
        raise ConfigError(f"{name}={value!r}; allowed: a finite real number in [0, {upper})")


def _check_form(form: str) -> None:
    """Raises ConfigError unless ``form`` is one of FORMS."""
    if form not in FORMS:
        raise ConfigError(f"form={form!r}; allowed: {', '.join(FORMS)}")


def _check_rounding(rounding: str) -> None:
    """Raises ConfigError unless ``rounding`` is one of ROUNDINGS."""
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding={rounding!r}; allowed: {', '.join(ROUNDINGS)}")


def _is_zero(value: Any) -> bool:
    """True iff ``value`` is a concrete zero (a traced value is never known to be zero)."""
    return not _is_tracer(value) and float(np.asarray(value)) == 0.0


def _float_dtype(x: jax.Array, who: str) -> np.dtype:
    """The dtype of a leaf, which must be a real floating type."""
    dtype = np.dtype(x.dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ConfigError(f"{who}: leaf of dtype {dtype}; allowed: floating-point parameters")
    return dtype


def _spread_like(s: jax.Array, x: jax.Array) -> jax.Array:
    """Scalar ``s`` at every element of ``x``, batched under vmap wherever ``x`` is."""
    return jnp.where(jnp.isnan(x), s, s)  # data-dependent on x only through its batching


def _opaque_scalars(lr: Any, k: Any, dtype: np.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(D(lr), D(k), D(+0))`` behind an optimization barrier, opaque to XLA's simplifier."""
    # The barrier hides the values, so (lr/k)*(k*u) cannot become lr*u at compile time.
    # lr and k go through it as ONE array so that under vmap both are batched or neither
    # is: XLA rewrites a / broadcast(b) into a * broadcast(1/b) (not correctly rounded),
    # so the divisor k must not reach the division as a broadcast of an unbatched k.
    lr_k, zero = jax.lax.optimization_barrier((jnp.stack([_cast(lr, dtype), _cast(k, dtype)]), jnp.zeros((), dtype)))
    return lr_k[0], lr_k[1], zero


def _cast(x: Any, dtype: np.dtype) -> jax.Array:
    """``x`` as a scalar of ``dtype`` (one rounding when ``x`` is wider)."""
    return jnp.asarray(x).astype(dtype)


def _mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``fl(a * b)``, kept rounded when a sum follows (see "FMA contraction" above).

    Inside a jitted step XLA:CPU contracts ``g + wd*p``, ``mu*b + g`` and Adam's moment updates
    into fused multiply-adds (23,613 of 100,000 float32 weight-decay terms came out once-rounded);
    ``a*b + z`` with the opaque ``z = +0`` is ``fl(a*b)`` whether or not it is contracted, and the
    following add is then not a bare product. Signed zeros: a product of ``-0`` becomes ``+0``.
    """
    return rounded_mul(a, b, opaque_zero(np.dtype(jnp.result_type(a, b))))


# ----------------------------------------------------------------------------- transforms


def perturbed_scale(
    learning_rate: ScalarOrSchedule,
    k: int | jax.Array = 1,
    form: str = "paper",
) -> optax.GradientTransformation:
    """Scales updates ``u`` to ``-(lr/k) * (k*u)``: the perturbed step of Section 4.1.

    Implements the right-hand side of (PERTURBED SGD), ``theta - (eta/k) x (k g_t)``,
    with exactly three roundings in the parameter dtype ``D`` after ``lr`` and ``k`` are
    cast to ``D``: ``q = fl(lr/k)``, ``p = fl(k*u)``, ``fl(q*p)``, then the (exact)
    sign. ``k=1`` gives ``-fl(lr*u)``, plain SGD; powers of two give the same bits as
    ``k=1`` (barring under/overflow). See the module docstring for how XLA is kept from
    folding the two products or contracting the last one into the parameter addition.

    Args:
      learning_rate: ``eta >= 0``: a float, a scalar array (possibly traced) or an optax
        schedule ``count -> lr`` (evaluated at the number of previous updates).
      k: the perturbation integer ``k >= 1``: a Python int or an integer scalar array,
        possibly traced (e.g. vmapped over).
      form: ``"paper"`` for ``-(fl(lr/k) * fl(k*u))``; ``"reference"`` for
        ``-(fl(lr*k) * fl(u/k))`` (the authors' PyTorch code).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`PerturbedScaleState`.

    Raises:
      ConfigError (a ValueError): ``k`` is zero, negative, not an integer or a bool;
        ``learning_rate`` is negative or not finite; ``form`` is unknown.

    Examples:
      In float32, ``lr = 0.1`` and ``u = 0.3``: ``k = 3`` moves the update by one ulp,
      ``k = 2`` (a power of two) does not, and NumPy's three separate roundings agree:

      >>> import jax, numpy as np
      >>> import jax.numpy as jnp
      >>> from eos_jax import optim
      >>> u = jnp.float32(0.3)
      >>> @jax.jit  # k may be traced: one compilation for every k
      ... def update(k):
      ...     opt = optim.perturbed_scale(0.1, k=k)
      ...     return opt.update(u, opt.init(u))[0]
      >>> [float(update(k)) for k in (1, 2, 3)]
      [-0.030000001192092896, -0.030000001192092896, -0.030000003054738045]
      >>> lr, k3 = np.float32(0.1), np.float32(3)
      >>> float(update(3)) == float(-((lr / k3) * (k3 * np.float32(0.3))))
      True
      >>> optim.perturbed_scale(0.1, k=0)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: k=0; allowed: an integer >= 1 (Python int or integer scalar array, possibly traced)
    """
    _check_k(k)
    _check_nonnegative("learning_rate", learning_rate)
    _check_form(form)
    k_int = None if _is_tracer(k) else int(np.asarray(k))

    def init_fn(params: optax.Params) -> PerturbedScaleState:
        del params
        return PerturbedScaleState(count=jnp.zeros((), jnp.int32))

    def update_fn(
        updates: optax.Updates, state: PerturbedScaleState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, PerturbedScaleState]:
        del params
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(u: jax.Array) -> jax.Array:
            dtype = _float_dtype(u, "perturbed_scale")
            k_max_bits = np.finfo(dtype).nmant + 1  # integers up to 2**k_max_bits are exact
            if k_int is not None and k_int > 2**k_max_bits:
                raise ConfigError(f"k={k_int} is not exactly representable in {dtype}; allowed: k <= 2**{k_max_bits}")
            lr_d, k_d, zero = _opaque_scalars(lr, k, dtype)
            if form == "paper":
                q = lr_d / k_d  # rounding 1: fl(lr/k), a scalar
                p = k_d * u  # rounding 2: fl(k*u), exact when k is a power of two
            else:
                q = lr_d * k_d  # fl(lr*k)
                # The divisor k is spread to u's shape (and batching) behind a barrier.
                k_full = jax.lax.optimization_barrier(_spread_like(k_d, u))
                p = u / k_full  # fl(u/k)
            # rounding 3: fl(q*p); negation is exact; "+ zero" is exact and keeps the
            # product from being fused into an FMA with the later parameter addition.
            return -(q * p) + zero

        new_updates = jax.tree_util.tree_map(leaf, updates)
        return new_updates, PerturbedScaleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _torch_weight_decay(weight_decay: float | jax.Array) -> optax.GradientTransformation:
    """PyTorch's L2 weight decay: ``g <- g + wd * theta`` (in the parameter dtype)."""

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ConfigError("weight_decay needs params: call update(grads, state, params)")
        new = jax.tree_util.tree_map(
            lambda g, p: g + _mul(_cast(weight_decay, _float_dtype(p, "weight_decay")), p), updates, params
        )
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)


def _torch_momentum(momentum: float | jax.Array, nesterov: bool) -> optax.GradientTransformation:
    """PyTorch SGD momentum (dampening 0): ``b <- g`` at step 1, then ``b <- mu*b + g``;
    the direction is ``g + mu*b`` (Nesterov) or ``b``."""

    def init_fn(params: optax.Params) -> TorchMomentumState:
        return TorchMomentumState(
            count=jnp.zeros((), jnp.int32),
            momentum_buffer=jax.tree_util.tree_map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0

        def buf(g, b):
            mu = _cast(momentum, _float_dtype(g, "sgd momentum"))
            # PyTorch clones d into the buffer on the first step (not mu*0 + d).
            return jnp.where(first, g, _mul(mu, b) + g)

        new_buf = jax.tree_util.tree_map(buf, updates, state.momentum_buffer)
        if nesterov:
            direction = jax.tree_util.tree_map(
                lambda g, b: g + _mul(_cast(momentum, np.dtype(g.dtype)), b), updates, new_buf
            )
        else:
            direction = new_buf
        return direction, TorchMomentumState(count=optax.safe_increment(state.count), momentum_buffer=new_buf)

    return optax.GradientTransformation(init_fn, update_fn)


def _torch_adam_direction(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """PyTorch Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` (non-amsgrad), before the lr."""

    def init_fn(params: optax.Params) -> TorchAdamState:
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
        return TorchAdamState(count=jnp.zeros((), jnp.int32), exp_avg=zeros(), exp_avg_sq=zeros())

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def moments(g, m, v):
            dtype = _float_dtype(g, "adam")
            b1_d, b2_d = _cast(b1, dtype), _cast(b2, dtype)
            one = jnp.ones((), dtype)
            m = m + _mul(one - b1_d, g - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            # (1 - b2) * g*g is never -0, so LLVM drops a constant `+ 0` there and contracts the product
            # into the sum (623 of 4,000 elements once-rounded): its zero must be unknown to the compiler.
            zero = runtime_zero(state.count, dtype)
            v = _mul(b2_d, v) + rounded_mul(one - b2_d, g * g, zero)  # torch: mul_(beta2).addcmul_(g, g, 1 - beta2)
            return m, v

        mv = jax.tree_util.tree_map(moments, updates, state.exp_avg, state.exp_avg_sq)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        new_m = jax.tree_util.tree_map(lambda t: t[0], mv, is_leaf=is_pair)
        new_v = jax.tree_util.tree_map(lambda t: t[1], mv, is_leaf=is_pair)

        def direction(m, v):
            dtype = np.dtype(m.dtype)
            t = count.astype(dtype)
            one = jnp.ones((), dtype)
            bias_correction1 = one - _cast(b1, dtype) ** t
            bias_correction2 = one - _cast(b2, dtype) ** t
            # torch: denom = sqrt(v) / sqrt(bc2) + eps; step = (lr / bc1) * m / denom.
            # Here u = (m / bc1) / denom, and lr enters through the perturbed scale.
            denom = jnp.sqrt(v) / jnp.sqrt(bias_correction2) + _cast(eps, dtype)
            return (m / bias_correction1) / denom

        u = jax.tree_util.tree_map(direction, new_m, new_v)
        return u, TorchAdamState(count=count, exp_avg=new_m, exp_avg_sq=new_v)

    return optax.GradientTransformation(init_fn, update_fn)


def sgd(
    learning_rate: ScalarOrSchedule,
    *,
    k: int | jax.Array = 1,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    form: str = "paper",
    rounding: str = "paper",
) -> optax.GradientTransformation | TorchRoundedOptimizer:
    """Perturbed SGD (Section 4.1, (PERTURBED SGD)) with ``torch.optim.SGD`` semantics.

    Per step, with dampening 0 as in PyTorch: ``d = g + wd*theta``; with momentum
    ``b = d`` on the first step and ``b = mu*b + d`` afterwards, then ``d = d + mu*b``
    (Nesterov) or ``d = b``; finally ``theta <- theta - (lr/k) * (k*d)`` through
    :func:`perturbed_scale`. As in the paper, ``g_t`` in the perturbed update is the
    momentum vector when momentum is used.

    Args:
      learning_rate: ``eta >= 0``, float, scalar array (possibly traced) or schedule.
      k: perturbation integer ``>= 1`` (Python int or integer scalar, possibly traced).
      momentum: ``mu >= 0``; 0 means no momentum buffer in the state.
      nesterov: Nesterov momentum (needs ``momentum > 0``, as in PyTorch).
      weight_decay: L2 coefficient added to the gradient (PyTorch's ``weight_decay``).
      form: ``"paper"`` or ``"reference"``, see :func:`perturbed_scale`.
      rounding: ``"paper"`` (default): every operation above rounds separately in the
        parameter dtype, and the update is the three-rounding (PERTURBED SGD) term added
        by ``params + updates`` (a fourth rounding). ``"torch"``: PyTorch 2.13's CPU
        kernels bit for bit (:mod:`eos_jax.optim_torch`): weight decay and Nesterov are
        fused multiply-adds, the momentum buffer rounds ``mu*b`` and ``+ d`` apart, and
        the parameter update ``p - D(lr*k) * RN(d/k)`` rounds once (an FMA).

    Returns:
      ``rounding="paper"``: an ``optax.GradientTransformation``; ``update`` needs
      ``params`` when ``weight_decay`` is nonzero. ``rounding="torch"``: a
      :class:`~eos_jax.optim_torch.TorchRoundedOptimizer`, stepped with :func:`apply_step`.

    Examples:
      One step from ``theta = 0`` with ``g = 0.3`` (float32): ``k = 3`` changes the last
      bit of the new parameter, ``k = 2`` does not:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import optim
      >>> p = jnp.zeros(1, jnp.float32); g = jnp.full(1, 0.3, jnp.float32)
      >>> @jax.jit
      ... def step(p, k):
      ...     opt = optim.sgd(0.1, k=k)
      ...     return optim.apply_step(opt, g, opt.init(p), p)[0]
      >>> [step(p, k).tolist() for k in (1, 2, 3)]
      [[-0.030000001192092896], [-0.030000001192092896], [-0.030000003054738045]]

      ``rounding="torch"`` rounds ``p - lr*g`` once, as PyTorch's ``p.add_(g, alpha=-lr)``,
      where the default rounds the product and the sum apart:

      >>> p = jnp.ones(1, jnp.float32)
      >>> step(p, 1).tolist()
      [0.9700000286102295]
      >>> opt = optim.sgd(0.1, rounding="torch")
      >>> jax.jit(lambda p: optim.apply_step(opt, g, opt.init(p), p)[0])(p).tolist()
      [0.9699999690055847]

    Raises:
      ConfigError: (a ValueError) on an invalid ``k``, learning rate or hyperparameter.
    """
    _check_nonnegative("momentum", momentum)
    _check_nonnegative("weight_decay", weight_decay)
    if not isinstance(nesterov, (bool, np.bool_)):
        raise ConfigError(f"nesterov={nesterov!r}; allowed: True or False")
    if nesterov and _is_zero(momentum):
        raise ConfigError("nesterov=True with momentum=0; allowed: momentum > 0 (as torch.optim.SGD)")
    _check_rounding(rounding)
    scale = perturbed_scale(learning_rate, k=k, form=form)  # validates lr, k, form
    if rounding == "torch":
        return torch_sgd(
            learning_rate, k=k, momentum=momentum, nesterov=bool(nesterov), weight_decay=weight_decay, form=form
        )
    parts = []
    if not _is_zero(weight_decay):
        parts.append(_torch_weight_decay(weight_decay))
    if not _is_zero(momentum):
        parts.append(_torch_momentum(momentum, bool(nesterov)))
    parts.append(scale)
    return optax.chain(*parts)


def adam(
    learning_rate: ScalarOrSchedule,
    *,
    k: int | jax.Array = 1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    form: str = "paper",
    rounding: str = "paper",
) -> optax.GradientTransformation | TorchRoundedOptimizer:
    """Perturbed Adam (Section 4.1 applied to Adam, Appendix C) with ``torch.optim.Adam`` semantics.

    Per step ``t``: ``g = g + wd*theta`` (L2, not AdamW); ``m = b1*m + (1-b1)*g``;
    ``v = b2*v + (1-b2)*g^2``; ``u = (m/(1-b1^t)) / (sqrt(v)/sqrt(1-b2^t) + eps)``;
    then ``theta <- theta - (lr/k) * (k*u)`` through :func:`perturbed_scale`.
    Non-amsgrad. Moments are kept in the parameter dtype.

    Args:
      learning_rate: ``eta >= 0``, float, scalar array (possibly traced) or schedule.
      k: perturbation integer ``>= 1`` (Python int or integer scalar, possibly traced).
      b1: first-moment decay in ``[0, 1)``.
      b2: second-moment decay in ``[0, 1)``.
      eps: added to ``sqrt(v_hat)``, ``>= 0``.
      weight_decay: L2 coefficient added to the gradient.
      form: ``"paper"`` or ``"reference"``, see :func:`perturbed_scale`.
      rounding: ``"paper"`` (default): each operation above rounds separately in the
        parameter dtype, then the three-rounding perturbed scale and ``params + updates``.
        ``"torch"``: PyTorch 2.13's CPU single-tensor Adam (:mod:`eos_jax.optim_torch`):
        ``lerp_`` and ``addcmul_`` as fused multiply-adds, double-precision bias
        corrections, ``addcdiv_``, with ``lr*k`` in the step size and ``m/k`` in the
        numerator (form ``"reference"``). Bit for bit except where PyTorch's CPU ``sqrt``
        is not correctly rounded (see that module).

    Returns:
      ``rounding="paper"``: an ``optax.GradientTransformation``. ``rounding="torch"``: a
      :class:`~eos_jax.optim_torch.TorchRoundedOptimizer`, stepped with :func:`apply_step`.

    Raises:
      ConfigError: (a ValueError) on an invalid ``k``, learning rate or hyperparameter.

    Examples:
      Adam's first step is ``-lr * sign(g)`` up to ``eps``, whatever ``k``:

      >>> import jax, jax.numpy as jnp
      >>> from eos_jax import optim
      >>> p = jnp.ones(2, jnp.float32); g = jnp.array([0.5, -0.25], jnp.float32)
      >>> opt = optim.adam(0.1, k=3)
      >>> step = jax.jit(lambda g, state, p: optim.apply_step(opt, g, state, p))
      >>> new_p, state = step(g, opt.init(p), p)
      >>> [round(float(x), 6) for x in new_p], int(state[0].count)
      ([0.9, 1.1], 1)
      >>> optim.adam(0.1, b2=1.0)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: b2=1.0; allowed: a finite real number in [0, 1)
    """
    _check_nonnegative("b1", b1, below_one=True)
    _check_nonnegative("b2", b2, below_one=True)
    _check_nonnegative("eps", eps)
    _check_nonnegative("weight_decay", weight_decay)
    _check_rounding(rounding)
    scale = perturbed_scale(learning_rate, k=k, form=form)  # validates lr, k, form
    if rounding == "torch":
        return torch_adam(learning_rate, k=k, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, form=form)
    parts = []
    if not _is_zero(weight_decay):
        parts.append(_torch_weight_decay(weight_decay))
    parts += [_torch_adam_direction(b1, b2, eps), scale]
    return optax.chain(*parts)


def apply_step(
    opt: optax.GradientTransformation | TorchRoundedOptimizer,
    grads: optax.Updates,
    state: Any,
    params: optax.Params,
    **extra_args: Any,
) -> tuple[optax.Params, Any]:
    """One optimizer step, ``(new_params, new_state)``, for either rounding mode.

    An optax transformation is applied as ``update`` then ``optax.apply_updates`` (one
    more rounding per element); a ``rounding="torch"`` optimizer computes the new
    parameters itself (its last operation is a fused multiply-add). ``extra_args`` (the
    training step gives ``batch``) reach an ``optax.GradientTransformationExtraArgs``, such
    as :func:`eos_jax.optim_cfl.cfl_scale` or an ``optax.chain`` holding it; other
    transformations are called without them.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.optim import apply_step, sgd
      >>> p = jnp.zeros(2, jnp.float32); g = jnp.ones(2, jnp.float32)
      >>> opt = sgd(0.5)
      >>> new_p, state = jax.jit(lambda g, s, p: apply_step(opt, g, s, p))(g, opt.init(p), p)
      >>> new_p.tolist()
      [-0.5, -0.5]
    """
    if isinstance(opt, TorchRoundedOptimizer):
        return opt.step(grads, state, params)
    if extra_args and isinstance(opt, optax.GradientTransformationExtraArgs):
        updates, state = opt.update(grads, state, params, **extra_args)
    else:
        updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
