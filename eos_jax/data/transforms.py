"""Preprocessing, deterministic batching and on-device CIFAR augmentation.

Randomness comes only from keys: the permutation of epoch ``e`` is drawn with
``fold_in(key, e)``, and augmentation takes the key it is given (derive it per step,
e.g. ``fold_in(fold_in(aug_key, epoch), step)``), so a run is a pure function of its
config on any device. All arrays here broadcast explicitly and name their dtypes
(tests run with strict dtype promotion and ``rank_promotion="raise"``).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from eos_jax.errors import ConfigError

CIFAR_PAD = 4  # pixels of padding before the random 32x32 crop (He et al. 2016)


def channel_stats(train_x: ArrayLike, *, per: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the training images, as float32.

    Computed on the host in float64 (a fixed summation order, so the same on every
    device) and rounded once to float32. A zero standard deviation (a constant pixel,
    e.g. MNIST's border with ``per="pixel"``) is replaced by 1 so it divides by one.

    Args:
      train_x: NHWC training images.
      per: ``"channel"`` (shape (C,), the usual per-channel statistics) or ``"pixel"``
        (shape (H, W, C), per-feature, as Cohen et al. 2021 do for CIFAR-5k).

    Returns:
      ``(mean, std)``, float32 arrays of shape (C,) or (H, W, C).

    Examples:
      >>> import numpy as np
      >>> from eos_jax.data.transforms import channel_stats
      >>> x = np.arange(8, dtype=np.float32).reshape(2, 2, 2, 1)  # N=2 images of 2x2, one channel
      >>> mean, std = channel_stats(x)
      >>> mean.tolist(), round(float(std[0]) ** 2, 4), mean.dtype  # std**2 = var(0..7) = 5.25
      ([3.5], 5.25, dtype('float32'))
      >>> channel_stats(x, per="pixel")[0].shape
      (2, 2, 1)
    """
    x = np.asarray(train_x, dtype=np.float64)
    if x.ndim != 4:
        raise ConfigError(f"channel_stats: expected NHWC images, got shape {x.shape}")
    if per == "channel":
        axes: tuple[int, ...] = (0, 1, 2)
    elif per == "pixel":
        axes = (0,)
    else:
        raise ConfigError(f"standardize per={per!r} is not allowed; use 'channel' or 'pixel'")
    mean = x.mean(axis=axes)
    std = x.std(axis=axes)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def normalize(x: ArrayLike, mean: ArrayLike, std: ArrayLike) -> jax.Array:
    """``(x - mean) / std`` in ``x``'s dtype, with mean/std of shape (C,) or (H, W, C); jittable.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.data.transforms import normalize
      >>> normalize(jnp.array([[1.0, 4.0]]), mean=jnp.array([1.0, 2.0]), std=jnp.array([2.0, 4.0])).tolist()
      [[0.0, 0.5]]
    """
    x = jnp.asarray(x)
    shape = (1,) * (x.ndim - jnp.ndim(mean)) + tuple(jnp.shape(mean))
    m = jnp.reshape(jnp.asarray(mean, dtype=x.dtype), shape)
    s = jnp.reshape(jnp.asarray(std, dtype=x.dtype), shape)
    # XLA's algebraic simplifier rewrites ``a / broadcast(s)`` into ``a * broadcast(1/s)``
    # (two roundings, up to 1 ulp off the correctly rounded quotient; seen on CPU, jaxlib
    # 0.10.2). The barrier hides the broadcast, so jit gives the same bits as NumPy.
    s_b = jax.lax.optimization_barrier(jnp.broadcast_to(s, x.shape))
    return (x - jnp.broadcast_to(m, x.shape)) / s_b


def standardize(train_x: ArrayLike, *xs: ArrayLike, per: str = "channel") -> tuple[np.ndarray, ...]:
    """Standardizes training images and any others with the TRAINING statistics.

    Args:
      train_x: NHWC training images (the statistics come from these only).
      *xs: other NHWC arrays (test set, ...) standardized with the same statistics.
      per: ``"channel"`` or ``"pixel"``, see :func:`channel_stats`.

    Returns:
      ``(train_x_std, *xs_std)`` as float32 numpy arrays, computed as
      ``(x - mean) / std`` in float32.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.data.transforms import standardize
      >>> train = np.arange(8, dtype=np.float32).reshape(2, 2, 2, 1)
      >>> test = train[:1] + 16
      >>> train_s, test_s = standardize(train, test)
      >>> round(float(train_s.mean()), 6), round(float(train_s.std()), 6)
      (0.0, 1.0)
      >>> test_s.shape, test_s.dtype, bool(test_s.min() > 2)  # the test set uses the TRAINING statistics
      ((1, 2, 2, 1), dtype('float32'), True)
    """
    mean, std = channel_stats(train_x, per=per)
    out = []
    for a in (train_x, *xs):
        a = np.asarray(a, dtype=np.float32)
        if a.shape[1:] != np.asarray(train_x).shape[1:]:
            raise ConfigError(f"standardize: shape {a.shape} does not match the training images {np.shape(train_x)}")
        out.append(((a - mean) / std).astype(np.float32))
    return tuple(out)


def one_hot(y: ArrayLike, num_classes: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """One-hot labels of shape ``y.shape + (num_classes,)`` in ``dtype``; jittable.

    Concrete labels outside ``[0, num_classes)`` raise ConfigError (under ``jit`` they
    cannot be checked and give an all-zero row, as ``jax.nn.one_hot``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.data.transforms import one_hot
      >>> one_hot(jnp.array([0, 2]), 3).tolist()
      [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
      >>> one_hot(jnp.array([0, 3]), 3)
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: one_hot: labels in [0, 3] are outside [0, 3)
    """
    if not isinstance(y, jax.core.Tracer):
        yn = np.asarray(y)
        if not np.issubdtype(yn.dtype, np.integer):
            raise ConfigError(f"one_hot: labels must be integers, got {yn.dtype}")
        if yn.size and (yn.min() < 0 or yn.max() >= num_classes):
            raise ConfigError(f"one_hot: labels in [{yn.min()}, {yn.max()}] are outside [0, {num_classes})")
    return jax.nn.one_hot(y, num_classes, dtype=dtype)


def epoch_permutation(key: jax.Array, epoch: int | jax.Array, n: int) -> jax.Array:
    """The permutation of ``range(n)`` for one epoch: ``permutation(fold_in(key, epoch), n)``.

    Args:
      key: the run's batch-order key.
      epoch: the epoch number (may be traced).
      n: number of examples (static).

    Returns:
      An int32 array of shape (n,).

    Examples:
      >>> import jax
      >>> from eos_jax.data.transforms import epoch_permutation
      >>> key = jax.random.key(0)
      >>> p = epoch_permutation(key, 3, 5)
      >>> sorted(p.tolist()), p.dtype
      ([0, 1, 2, 3, 4], dtype('int32'))
      >>> p.tolist() == epoch_permutation(key, 3, 5).tolist()  # a pure function of (key, epoch)
      True
    """
    return jax.random.permutation(jax.random.fold_in(key, epoch), n).astype(jnp.int32)


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = False) -> int:
    """How many batches an epoch of ``n`` examples has.

    Examples:
      >>> from eos_jax.data.transforms import num_batches
      >>> num_batches(10, 4), num_batches(10, 4, drop_remainder=True)
      (3, 2)
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is not allowed; expected an integer >= 1")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batch_indices(key: jax.Array, epoch: int | jax.Array, n: int, batch_size: int) -> jax.Array:
    """The epoch's full batches as an index array of shape (n // batch_size, batch_size); jittable.

    The remainder (the last ``n % batch_size`` indices of the permutation) is dropped,
    which gives every step the same shape inside ``lax.scan``.

    Examples:
      >>> import jax
      >>> from eos_jax.data.transforms import batch_indices
      >>> idx = batch_indices(jax.random.key(0), 0, n=10, batch_size=4)
      >>> idx.shape, len(set(idx.reshape(-1).tolist()))  # 2 full batches of distinct examples
      ((2, 4), 8)
    """
    nb = num_batches(n, batch_size, drop_remainder=True)
    return epoch_permutation(key, epoch, n)[: nb * batch_size].reshape(nb, batch_size)


def iterate_batches(
    x: ArrayLike, y: ArrayLike, key: jax.Array, epoch: int, batch_size: int, *, drop_remainder: bool = False
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Yields the epoch's ``(x_batch, y_batch)`` in the order of :func:`epoch_permutation`.

    Gathers with ``jnp.take`` where ``x``/``y`` live (put the dataset on the device once
    with :meth:`Dataset.to_device`). Without ``drop_remainder`` the last batch is the
    short remainder (as PyTorch's ``DataLoader``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.data.transforms import iterate_batches
      >>> x, y = jnp.arange(5.0), jnp.arange(5)
      >>> batches = list(iterate_batches(x, y, jax.random.key(0), epoch=0, batch_size=2))
      >>> [bx.shape[0] for bx, by in batches], all(bool((bx == by).all()) for bx, by in batches)
      ([2, 2, 1], True)
    """
    n = int(np.shape(y)[0])
    if int(np.shape(x)[0]) != n:
        raise ConfigError(f"iterate_batches: {np.shape(x)[0]} images but {n} labels")
    perm = epoch_permutation(key, epoch, n)
    for b in range(num_batches(n, batch_size, drop_remainder=drop_remainder)):
        idx = perm[b * batch_size : (b + 1) * batch_size]
        yield jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)


def augment_cifar(key: jax.Array, x_NHWC: ArrayLike, *, pad_value: ArrayLike = 0.0) -> jax.Array:
    """Random crop with 4-pixel padding and random horizontal flip, per example; jittable.

    Each image is padded by 4 pixels on every side with ``pad_value`` (a scalar or one
    value per channel; 0 = black for images in [0, 1], as torchvision's
    ``RandomCrop(32, padding=4)`` before ``Normalize``), an HxW window is cut at an
    offset drawn uniformly from ``{0..8}^2``, and the result is mirrored left-right with
    probability 1/2. Offsets and flips come from ``key`` only.

    Args:
      key: PRNG key for this batch.
      x_NHWC: images (N, H, W, C).
      pad_value: padding value, scalar or shape (C,).

    Returns:
      Augmented images, same shape and dtype as ``x_NHWC``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from eos_jax.data.transforms import augment_cifar
      >>> augment = jax.jit(augment_cifar)  # one compile; eager dispatch of its many ops is slower
      >>> images = jnp.ones((2, 8, 8, 3))  # any H x W; CIFAR's is 32 x 32
      >>> out = augment(jax.random.key(0), images)
      >>> out.shape, out.dtype, bool(jnp.array_equal(out, augment(jax.random.key(0), images)))
      ((2, 8, 8, 3), dtype('float32'), True)
    """
    x = jnp.asarray(x_NHWC)
    n, h, w, c = x.shape
    p = CIFAR_PAD
    key_y, key_x, key_f = jax.random.split(key, 3)
    off_y = jax.random.randint(key_y, (n,), 0, 2 * p + 1, dtype=jnp.int32)
    off_x = jax.random.randint(key_x, (n,), 0, 2 * p + 1, dtype=jnp.int32)
    flip = jax.random.bernoulli(key_f, 0.5, (n,))
    pv = jnp.reshape(jnp.asarray(pad_value, dtype=x.dtype), (1, 1, 1, -1))
    padded = jnp.broadcast_to(pv, (n, h + 2 * p, w + 2 * p, c)).at[:, p : p + h, p : p + w, :].set(x)
    zero = jnp.zeros((), jnp.int32)

    def crop(img: jax.Array, oy: jax.Array, ox: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (oy, ox, zero), (h, w, c))

    cropped = jax.vmap(crop)(padded, off_y, off_x)
    mask = jnp.broadcast_to(jnp.reshape(flip, (n, 1, 1, 1)), cropped.shape)
    return jnp.where(mask, cropped[:, :, ::-1, :], cropped)
