"""Losses from logits, averaged over examples; labels are integer arrays.

* :func:`binary_cross_entropy`: the cross-entropy ``l(y, yhat)`` of Eq. (7) with
  ``yhat = s(logit)`` (the sigmoid of Eq. (6)/(20) lives here, not in the model),
  computed from log-sigmoids so it neither overflows nor loses the small loss of a
  confident correct prediction. Its gradient w.r.t. the logit is ``yhat - y``, the
  factor ``a`` of Eq. (8) and Theorem 5.2.
* :func:`cross_entropy`: multi-class cross-entropy (log-softmax).
* :func:`mse`: squared loss on one-hot targets as in Cohen et al. (2021),
  locuslab/edge-of-stability ``src/utilities.py``: ``SquaredLoss = 0.5 * ((f - t)**2).sum()``
  summed over the dataset and divided by the number of examples, with 0/1 one-hot
  targets (``src/cifar.py``: ``_one_hot(y, 10, 0)``), i.e.
  ``(1/n) sum_i 0.5 * ||f(x_i) - e_{y_i}||^2``: half the sum over classes, mean over
  examples.

All reductions are in the logits' dtype; labels are converted explicitly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eos_jax.errors import ConfigError


def _check_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Validates integer labels of shape (N,) matching logits (N, ...)."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ConfigError(f"labels have dtype {labels.dtype}; allowed: an integer dtype")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ConfigError(f"labels shape {labels.shape} does not match logits shape {logits.shape}; expected (N,)")
    return labels


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 labels (Eq. (7) without decay).

    Args:
      logits: ``(N, 1)`` or ``(N,)`` logits (before the sigmoid).
      labels: ``(N,)`` integer labels in {0, 1}.

    Returns:
      Scalar ``mean(-y log s(z) - (1 - y) log(1 - s(z)))`` in the logits' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.losses import binary_cross_entropy
      >>> round(float(binary_cross_entropy(jnp.array([0.0, 0.0]), jnp.array([0, 1]))), 4)  # log 2
      0.6931
      >>> float(binary_cross_entropy(jnp.array([[-100.0]]), jnp.array([0])))  # confident and right
      0.0
    """
    if logits.ndim == 2:
        if logits.shape[1] != 1:
            raise ConfigError(f"binary_cross_entropy needs logits (N, 1) or (N,), got {logits.shape}")
        logits = logits[:, 0]
    elif logits.ndim != 1:
        raise ConfigError(f"binary_cross_entropy needs logits (N, 1) or (N,), got {logits.shape}")
    y = _check_labels(logits, labels).astype(logits.dtype)
    # -log s(z) = softplus(-z) and -log(1 - s(z)) = softplus(z): both exact for large |z|.
    per_example = y * jax.nn.softplus(-logits) + (1 - y) * jax.nn.softplus(logits)
    return jnp.mean(per_example)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean multi-class cross-entropy ``mean(logsumexp(z) - z[y])``.

    Args:
      logits: ``(N, C)``.
      labels: ``(N,)`` integers in ``[0, C)``.

    Returns:
      Scalar in the logits' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.losses import cross_entropy
      >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
      1.3863
      >>> cross_entropy(jnp.zeros((2, 4)), jnp.array([0.0, 3.0]))
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: labels have dtype float32; allowed: an integer dtype
    """
    if logits.ndim != 2:
        raise ConfigError(f"cross_entropy needs logits (N, C), got {logits.shape}")
    labels = _check_labels(logits, labels)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=1)[:, 0])


def mse(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Cohen et al.'s squared loss on one-hot targets: ``mean_i 0.5 * sum_c (z_ic - [y_i == c])^2``.

    Args:
      logits: ``(N, num_classes)``.
      labels: ``(N,)`` integers in ``[0, num_classes)``.
      num_classes: number of classes (must equal ``logits.shape[1]``).

    Returns:
      Scalar in the logits' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from eos_jax.losses import mse
      >>> logits = jnp.array([[1.0, 0.0], [1.0, 0.0]])  # right on example 0, wrong on example 1
      >>> float(mse(logits, jnp.array([0, 1]), num_classes=2))  # (0 + 0.5 * 2) / 2
      0.5
    """
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ConfigError(f"mse needs logits (N, num_classes={num_classes}), got {logits.shape}")
    labels = _check_labels(logits, labels)
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    return jnp.mean(0.5 * jnp.sum(jnp.square(logits - targets), axis=1))
