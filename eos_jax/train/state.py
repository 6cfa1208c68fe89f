"""Lanes, their traced hyperparameters, and the state pytree one lane carries from step to step.

A run trains one or more *lanes*, each a point of the product of lists of learning
rate, perturbation factor k, seed, initialization seed and weight decay (:func:`make_lanes`). Their
hyperparameters are stacked into an :class:`HParams` of arrays with a leading lane
axis (:func:`stack_hparams`), in the dtype of the parameters (:func:`hparam_dtype`).

Randomness is a pure function of the lane's seed and initialization seed. The key tree
(every edge a ``jax.random.fold_in``; no key is used for two purposes)::

    key(0) -> init_seed -> 0: init key      problem.init_params
    key(0) -> seed      -> 1: data key      TrainState.key
                                -> STREAM_BATCH_ORDER (0) -> epoch e: permutation of epoch e
                                -> STREAM_SHARPNESS (1)   -> step t:  eigensolver key at step t
                                -> STREAM_AUGMENT (2)     -> step t:  augmentation key at step t
                                -> STREAM_CURVATURE (3)   -> step t:  trace / density probes at step t
                        -> 2: eigenvector key   first guess of TrainState.eigvec

``init_seed`` defaults to ``seed`` (``Lane.init_seed=None``), which is the tree of every run
made before the two were separated, bit for bit: ``fold_in(fold_in(key(0), seed), 0)`` is
the init key either way. A separate ``init_seed`` fixes the initialization across lanes of
different seeds (batch orders), as Section 4 of the paper does ("we repeat this experiment
over different seeds for the stochastic batch selection ... fixing the initialization"); the
authors' ``instability/main6.py`` instead seeds both with one ``torch.manual_seed(args.r)``.

The two streams of the data key hang off distinct tags, so the sharpness key of step
``t`` and the batch-order key of epoch ``e`` differ even when ``t == e`` (before the
tags, both were ``fold_in(data key, n)`` and collided whenever step == epoch).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eos_jax.errors import ConfigError
from eos_jax.train.config import Problem, PyTree
from eos_jax.train.stats import REL_L1_WINDOW, init_loss_stats

_ROOT_SEED = 0  # every lane key is fold_in(key(_ROOT_SEED), seed): seeds are plain integers.
_MAX_SEED = 2**31 - 1
STREAM_BATCH_ORDER = 0  # fold_in tag of the data key's batch-order stream (one key per epoch)
STREAM_SHARPNESS = 1  # fold_in tag of the data key's eigensolver stream (one key per step)
STREAM_AUGMENT = 2  # fold_in tag of the data key's augmentation stream (one key per step)
STREAM_CURVATURE = 3  # fold_in tag of the data key's trace / density probe stream (one key per step)


def batch_order_key(key_data: jax.Array) -> jax.Array:
    """The batch-order stream of a lane's data key (raw ``uint32[2]``); epoch ``e`` folds in ``e``.

    Examples:
      >>> import jax
      >>> kd = jax.random.key_data(jax.random.key(1))
      >>> a = jax.random.key_data(jax.random.fold_in(batch_order_key(kd), 3))  # epoch 3's permutation key
      >>> b = jax.random.key_data(sharpness_key(kd, 3))  # step 3's eigensolver key
      >>> bool((a != b).any())
      True
    """
    return jax.random.fold_in(jax.random.wrap_key_data(key_data), STREAM_BATCH_ORDER)


def sharpness_key(key_data: jax.Array, step: jax.Array | int) -> jax.Array:
    """The eigensolver key of a lane at ``step``: ``fold_in(fold_in(data key, STREAM_SHARPNESS), step)``.

    Examples:
      >>> import jax
      >>> kd = jax.random.key_data(jax.random.key(1))
      >>> bool((jax.random.key_data(sharpness_key(kd, 3)) == jax.random.key_data(sharpness_key(kd, 3))).all())  # pure
      True
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), STREAM_SHARPNESS), step)


def augment_key(key_data: jax.Array, step: jax.Array | int) -> jax.Array:
    """The augmentation key of a lane at ``step``: ``fold_in(fold_in(data key, STREAM_AUGMENT), step)``.

    Examples:
      >>> import jax
      >>> kd = jax.random.key_data(jax.random.key(1))
      >>> bool((jax.random.key_data(augment_key(kd, 3)) != jax.random.key_data(sharpness_key(kd, 3))).any())
      True
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), STREAM_AUGMENT), step)


def curvature_key(key_data: jax.Array, step: jax.Array | int) -> jax.Array:
    """The probe key of a lane's tracked trace and density at ``step``: ``fold_in(fold_in(data key, STREAM_CURVATURE), step)``.

    Examples:
      >>> import jax
      >>> kd = jax.random.key_data(jax.random.key(1))
      >>> bool((jax.random.key_data(curvature_key(kd, 3)) != jax.random.key_data(sharpness_key(kd, 3))).any())
      True
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), STREAM_CURVATURE), step)


# ----------------------------------------------------------------------------- lanes


@dataclasses.dataclass(frozen=True)
class Lane:
    """One run of a sweep: Python values of its hyperparameters.

    ``seed`` drives the batch order, the eigensolver and the eigenvector's first guess;
    ``init_seed`` the initial parameters (None: ``seed``, the tree of the module docstring).
    :meth:`asdict` records the initialization seed actually used.

    ``hyper`` holds any other named hyperparameters of the lane (momentum, Adam's ``b2``, a
    loss temperature, ...): the optimizer factory reads them as attributes of its
    :class:`HParams` (``hp.momentum``). A mapping is kept as sorted ``(name, value)`` pairs,
    so lanes stay hashable and compare by value.

    Examples:
      >>> Lane(0.1, k=3).asdict()
      {'learning_rate': 0.1, 'k': 3, 'seed': 0, 'weight_decay': 0.0, 'init_seed': 0}
      >>> Lane(0.1, seed=4, init_seed=7).used_init_seed
      7
      >>> Lane(0.1, hyper={"momentum": 0.9}).asdict()["momentum"], Lane(0.1, hyper={"momentum": 0.9}).hyper
      (0.9, (('momentum', 0.9),))
    """

    learning_rate: float
    k: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    init_seed: int | None = None
    hyper: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        items = self.hyper.items() if isinstance(self.hyper, dict) else self.hyper
        pairs = tuple(sorted((str(n), float(v)) for n, v in items))
        for name, _ in pairs:
            if name in _RESERVED or not name.isidentifier() or name.startswith("_"):
                raise ConfigError(
                    f"hyperparameter name {name!r} is not allowed; expected an identifier not starting with '_', "
                    f"other than {', '.join(sorted(_RESERVED))}"
                )
        object.__setattr__(self, "hyper", pairs)

    @property
    def used_init_seed(self) -> int:
        """The seed of the init key: ``init_seed``, or ``seed`` when it is None."""
        return self.seed if self.init_seed is None else self.init_seed

    def asdict(self) -> dict[str, Any]:
        """The lane's values as a flat dict (the named hyperparameters after the fixed ones)."""
        d = {f: getattr(self, f) for f in _LANE_FIELDS if f != "hyper"}
        return {**d, "init_seed": self.used_init_seed, **dict(self.hyper)}


_LANE_FIELDS = ("learning_rate", "k", "seed", "weight_decay", "init_seed", "hyper")
# Names a hyperparameter cannot take: the fixed fields, and what HParams (a tuple) already answers to.
_RESERVED = frozenset(_LANE_FIELDS) | {"count", "index"}


def _as_list(name: str, values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        out = list(values)
    else:
        out = [values]
    if not out:
        raise ConfigError(f"{name}: empty list; give at least one value")
    return out


def make_lanes(
    learning_rates: float | Sequence[float],
    ks: int | Sequence[int] = 1,
    seeds: int | Sequence[int] = 0,
    weight_decays: float | Sequence[float] = 0.0,
    init_seeds: int | Sequence[int] | None = None,
    **hyper: float | Sequence[float],
) -> list[Lane]:
    """The product of the hyperparameter lists, learning rate varying slowest.

    Args:
      learning_rates: finite values > 0.
      ks: perturbation factors, integers >= 1 (k=1 is plain SGD/GD; Section 4.1).
      seeds: integers in [0, 2**31 - 1]: batch order and eigensolver keys.
      weight_decays: finite values >= 0.
      init_seeds: None (each lane initializes from its ``seed``, as before the two were
        separated), or integers in [0, 2**31 - 1]: the initialization seeds, one factor of the
        product, between seed and weight decay.
      **hyper: any other named hyperparameter, a value or a list of finite values (e.g.
        ``momentum=[0, 0.9]``, ``b2=[0.99, 0.999]``): axes of the product right after the
        learning rate, in the order given, so the k lanes of one point stay adjacent. The
        optimizer factory reads them as ``hp.<name>`` (:class:`HParams`).

    Returns:
      ``len(lr) * prod(len(h) for h in hyper) * len(k) * len(seed) * len(init_seeds) *
      len(wd)`` lanes (``len(init_seeds)`` is 1 for None).

    Raises:
      ConfigError: a bad value (named) or a duplicated lane.

    Examples:
      >>> [(l.learning_rate, l.k) for l in make_lanes([0.1, 0.2], ks=[1, 3])]
      [(0.1, 1), (0.1, 3), (0.2, 1), (0.2, 3)]
      >>> make_lanes(0.1, ks=0)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: k=0 is not allowed; expected an integer >= 1

      One initialization for three batch orders (Table 1 of the paper):

      >>> [(l.seed, l.init_seed) for l in make_lanes(0.1, seeds=[0, 1, 2], init_seeds=7)]
      [(0, 7), (1, 7), (2, 7)]

      Momentum as a lane axis (the k twins of each point stay adjacent):

      >>> [(l.learning_rate, dict(l.hyper)["momentum"], l.k) for l in make_lanes([1, 2], ks=[1, 3], momentum=[0, 0.9])]
      [(1.0, 0.0, 1), (1.0, 0.0, 3), (1.0, 0.9, 1), (1.0, 0.9, 3), (2.0, 0.0, 1), (2.0, 0.0, 3), (2.0, 0.9, 1), (2.0, 0.9, 3)]
    """
    lrs = _as_list("learning rate", learning_rates)
    kk = _as_list("k", ks)
    ss = _as_list("seed", seeds)
    wds = _as_list("weight decay", weight_decays)
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rate {lr!r} is not allowed; expected a finite float > 0")
    for k in kk:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k={k!r} is not allowed; expected an integer >= 1")
    for s in ss:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= _MAX_SEED:
            raise ConfigError(f"seed {s!r} is not allowed; expected an integer in [0, {_MAX_SEED}]")
    for wd in wds:
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ConfigError(f"weight decay {wd!r} is not allowed; expected a finite float >= 0")
    iss: list[Any] = _as_list("init seed", init_seeds) if init_seeds is not None else []
    for s in iss:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= _MAX_SEED:
            raise ConfigError(f"init seed {s!r} is not allowed; expected an integer in [0, {_MAX_SEED}]")
    axes = {name: _as_list(name, v) for name, v in hyper.items()}
    for name, values in axes.items():
        for v in values:
            if isinstance(v, bool) or not (isinstance(v, (int, float, np.number)) and math.isfinite(v)):
                raise ConfigError(f"{name} {v!r} is not allowed; expected a finite number")
    points = [dict(zip(axes, p)) for p in itertools.product(*axes.values())]
    lanes = [
        Lane(float(lr), int(k), int(s), float(wd), None if i is None else int(i), hyper=h)
        for lr, h, k, s, i, wd in itertools.product(lrs, points, kk, ss, iss or [None], wds)
    ]
    if len(set(lanes)) != len(lanes):
        raise ConfigError("the hyperparameter lists contain duplicates; every lane must be distinct")
    return lanes


class HParams(NamedTuple):
    """Traced hyperparameters of one lane (a leading lane axis when stacked): a pytree.

    ``init_seed`` is last but one and optional, so ``HParams(lr, k, wd, seed)`` still builds:
    None initializes from ``seed`` (:func:`init_state`); :func:`stack_hparams` always fills it.
    ``hyper`` maps the lanes' other named hyperparameters (:attr:`Lane.hyper`) to arrays in the
    parameters' dtype; they read as attributes, so an optimizer factory writes
    ``lambda hp: optim.sgd(hp.learning_rate, k=hp.k, momentum=hp.momentum)``, the pattern of
    ``optax.inject_hyperparams`` with the values carried by the lane instead of the state.

    Examples:
      >>> hp = stack_hparams(make_lanes([0.1, 0.2], ks=3, seeds=1, init_seeds=5), jnp.float32)
      >>> hp.k.tolist(), hp.learning_rate.dtype, hp.seed.tolist(), hp.init_seed.tolist()
      ([3, 3], dtype('float32'), [1, 1], [5, 5])
      >>> stack_hparams(make_lanes(0.1, b2=[0.99, 0.999]), jnp.float32).b2.tolist()
      [0.9900000095367432, 0.9990000128746033]
    """

    learning_rate: jax.Array  # working float dtype
    k: jax.Array  # int32
    weight_decay: jax.Array  # working float dtype
    seed: jax.Array  # int32
    init_seed: jax.Array | None = None  # int32; None: seed
    hyper: dict[str, jax.Array] = {}  # working float dtype; never mutated (a shared default)

    def __getattr__(self, name: str) -> jax.Array:
        hyper = self.hyper  # a field: normal lookup finds it, so this does not recurse
        if name in hyper:
            return hyper[name]
        raise AttributeError(
            f"HParams has no hyperparameter {name!r}; the lanes carry {sorted(hyper) or 'none'} besides "
            "learning_rate, k, weight_decay, seed, init_seed (make_lanes(..., name=[values]) adds one)"
        )


def stack_hparams(lanes: Sequence[Lane], dtype: Any = jnp.float32) -> HParams:
    """Stacks lanes into an :class:`HParams` of arrays with a leading lane axis.

    Learning rate and weight decay are rounded once to ``dtype``, which must be the
    dtype of the parameters (:func:`hparam_dtype`; :func:`init_state` and the step
    refuse another): float64 parameters get ``float64(lr)``, never
    ``float64(float32(lr))``.

    Examples:
      >>> import jax
      >>> with jax.enable_x64(True):  # float64 parameters get float64(lr), not float64(float32(lr))
      ...     hp = stack_hparams(make_lanes([0.1]), np.float64)
      ...     print(hp.learning_rate.dtype, float(hp.learning_rate[0]) == 0.1)
      float64 True
    """
    names = {tuple(n for n, _ in l.hyper) for l in lanes}
    if len(names) > 1:
        raise ConfigError(
            f"the lanes name different hyperparameters ({' / '.join(str(list(n)) for n in sorted(names))}); "
            "every lane of a sweep must carry the same names"
        )
    hyper = {
        name: jnp.asarray(np.array([dict(l.hyper)[name] for l in lanes], dtype=dtype))
        for name in (names.pop() if names else ())
    }
    return HParams(
        learning_rate=jnp.asarray(np.array([l.learning_rate for l in lanes], dtype=dtype)),
        k=jnp.asarray(np.array([l.k for l in lanes], dtype=np.int32)),
        weight_decay=jnp.asarray(np.array([l.weight_decay for l in lanes], dtype=dtype)),
        seed=jnp.asarray(np.array([l.seed for l in lanes], dtype=np.int32)),
        init_seed=jnp.asarray(np.array([l.used_init_seed for l in lanes], dtype=np.int32)),
        hyper=hyper,
    )


# ----------------------------------------------------------------------------- state


class TrainState(NamedTuple):
    """Everything a run carries from one step to the next (jitted, vmapped, checkpointed).

    Attributes:
      step: steps taken (int32 scalar).
      params: the parameter pytree.
      opt_state: the optax state.
      key: raw key data (uint32[2]) of the lane's data key (minibatch order).
      eigvec: last top Hessian eigenvector, shaped like ``params`` (warm start).
      finite: False once a step produced a non-finite loss, parameter or optimizer state.
      nonfinite_step: the first such step (meaningful only when ``finite`` is False);
        the state is frozen at the parameters of that step.
      loss_stats: running statistics of EVERY step's loss (:func:`init_loss_stats`),
        updated inside the scan, so the stability verdict does not depend on
        ``log_every`` (an even ``log_every`` would hide a period-2 oscillation).
      rel_buf: the last :data:`REL_L1_WINDOW` values of the lane's RelL1 to its k=1
        twin (a ring buffer, for the moving average the authors plot).
      rel_count: RelL1 values pushed so far.
      stop_step: ``-1`` while the lane trains; the step at which it met the run's stopping
        rule (``EngineConfig.loss_goal`` / ``acc_goal``, Cohen et al.'s ``gd.py``), after
        which its state is frozen.
      model_state: the model's non-parameter state (batch norm's running statistics,
        :attr:`Problem.init_model_state`); ``{}`` (no arrays) without one.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> state = jax.jit(lambda h: tr.init_state(problem, h))(tr.HParams(jnp.float32(0.1), jnp.int32(1), jnp.float32(0.0), jnp.int32(0)))
      >>> int(state.step), bool(state.finite), state.params["w"].tolist(), state.rel_buf.shape
      (0, True, [1.0, 1.0], (100,))
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    key: jax.Array
    eigvec: PyTree
    finite: jax.Array
    nonfinite_step: jax.Array
    loss_stats: dict[str, jax.Array]
    rel_buf: jax.Array
    rel_count: jax.Array
    stop_step: jax.Array
    model_state: PyTree = {}  # never mutated (a shared NamedTuple default)


def _lane_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init key, data key, eigenvector key) of a lane, all derived with fold_in."""
    lane = jax.random.fold_in(jax.random.key(_ROOT_SEED), seed)
    return jax.random.fold_in(lane, 0), jax.random.fold_in(lane, 1), jax.random.fold_in(lane, 2)


def lane_init_key(seed: int | jax.Array) -> jax.Array:
    """The key ``problem.init_params`` receives for a lane of init seed ``seed`` (the key tree above).

    Pass the lane's :attr:`Lane.used_init_seed` (its ``seed`` unless ``init_seed`` is set).

    Examples:
      >>> import jax
      >>> from eos_jax.train import lane_init_key
      >>> k = lane_init_key(7)
      >>> bool((jax.random.key_data(k) == jax.random.key_data(
      ...     jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 7), 0))).all())
      True
    """
    return _lane_keys(jnp.asarray(seed, jnp.int32))[0]


def hparam_dtype(problem: Problem, dtype: Any = None) -> np.dtype:
    """The dtype of a run's learning rate and weight decay: that of the parameters.

    Args:
      problem: whose ``init_params`` gives the parameters (traced abstractly, not run).
      dtype: None, or the dtype the caller expects (must then equal the parameters').

    Raises:
      ConfigError: ``dtype`` is given and is not the parameters' dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> hparam_dtype(problem)
      dtype('float32')
      >>> hparam_dtype(problem, np.float64)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: dtype=float64 for the hyperparameters, but the parameters are float32: ...
    """
    shapes = jax.eval_shape(problem.init_params, jax.random.key(_ROOT_SEED))
    want = np.dtype(param_dtype(shapes))
    if dtype is not None and np.dtype(dtype) != want:
        raise ConfigError(
            f"dtype={np.dtype(dtype)} for the hyperparameters, but the parameters are {want}: "
            "learning rate and weight decay take the parameters' dtype (pass dtype=None)"
        )
    return want


def check_hparams(hp: HParams, params: PyTree) -> None:
    """Refuses (at trace time) hyperparameters of another float dtype than the parameters.

    Examples:
      >>> check_hparams(HParams(jnp.float16(0.1), jnp.int32(1), jnp.float16(0), jnp.int32(0)), {"w": jnp.ones(2)})
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: learning_rate is float16 but the parameters are float32: ...
    """
    want = np.dtype(param_dtype(params))
    named = {"learning_rate": hp.learning_rate, "weight_decay": hp.weight_decay, **hp.hyper}
    for name, value in named.items():
        got = np.dtype(jnp.result_type(value))
        if got != want:
            raise ConfigError(
                f"{name} is {got} but the parameters are {want}: stack the hyperparameters with "
                f"stack_hparams(lanes, {want}) (hyperparameters take the parameters' dtype)"
            )


def _random_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Unit-norm Gaussian pytree shaped like ``tree`` (per-leaf dtype).

    One Gaussian draw of the total size in the parameters' dtype, cut into the leaves: a
    draw per leaf compiles a threefry-and-erfinv kernel per leaf (about 0.45 s each on a
    2-core CPU: most of the compile time of a small model's init program).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return tree
    sizes = [int(np.size(x)) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), param_dtype(tree))
    vs, start = [], 0
    for x, n in zip(leaves, sizes):
        vs.append(flat[start : start + n].reshape(jnp.shape(x)).astype(jnp.result_type(x)))
        start += n
    sq = sum(jnp.sum(jnp.square(v)).astype(jnp.float32) for v in vs)
    inv = jax.lax.rsqrt(sq)
    return jax.tree_util.tree_unflatten(treedef, [v * inv.astype(v.dtype) for v in vs])


def init_state(problem: Problem, hp: HParams) -> TrainState:
    """The state of one lane at step 0 (pure; vmap it over stacked HParams).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from eos_jax import optim, train as tr
      >>> def loss(p, b):  # 0.5 w^T diag(h) w: Hessian diag(1, 4)
      ...     return jnp.float32(0.5) * jnp.sum(b["h"][0] * p["w"] ** 2)
      >>> problem = tr.Problem(lambda key: {"w": jnp.ones(2, jnp.float32)}, loss,
      ...                      lambda hp: optim.sgd(hp.learning_rate, k=hp.k), {"h": jnp.array([[1.0, 4.0]], jnp.float32)})

      >>> hp = jax.tree_util.tree_map(lambda a: a[0], tr.stack_hparams(tr.make_lanes([0.25], seeds=4), jnp.float32))
      >>> state = jax.jit(lambda h: init_state(problem, h))(hp)
      >>> int(state.step), state.params["w"].tolist(), round(float(jnp.linalg.norm(state.eigvec["w"])), 5)
      (0, [1.0, 1.0], 1.0)
    """
    _, data_key, eig_key = _lane_keys(hp.seed)
    # The init key from the init seed (the seed itself when HParams was built without one):
    # the same fold_in path as the seed's, so init_seed == seed gives the same bits.
    init_key = _lane_keys(hp.seed if hp.init_seed is None else hp.init_seed)[0]
    params = problem.init_params(init_key)
    check_hparams(hp, params)
    opt_state = problem.make_optimizer(hp).init(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        key=jax.random.key_data(data_key),
        eigvec=_random_like(eig_key, params),
        finite=jnp.ones((), jnp.bool_),
        nonfinite_step=jnp.zeros((), jnp.int32),
        loss_stats=init_loss_stats(param_dtype(params)),
        rel_buf=jnp.zeros((REL_L1_WINDOW,), param_dtype(params)),
        rel_count=jnp.zeros((), jnp.int32),
        stop_step=jnp.full((), -1, jnp.int32),
        model_state=problem.init_model_state(init_key) if problem.init_model_state is not None else {},
    )


def param_dtype(params: PyTree) -> Any:
    """The floating dtype of the parameters (RelL1 and loss statistics are kept in it).

    Examples:
      >>> param_dtype({"w": jnp.ones(2, jnp.float16), "n": jnp.int32(3)})
      dtype('float16')
    """
    leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.result_type(*leaves) if leaves else jnp.float32


def all_finite(tree: PyTree) -> jax.Array:
    """True iff every inexact leaf of ``tree`` is finite.

    Examples:
      >>> bool(all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])})), bool(all_finite({"n": jnp.int32(1)}))
      (False, True)
    """
    ok = jnp.ones((), jnp.bool_)
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok
