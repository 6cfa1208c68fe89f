"""The registry of dataset names: name -> base dataset, kept labels, first-n, classes.

The lowest module of :mod:`eos_jax.data`: :mod:`eos_jax.data.sources` (where files are
looked for) and :mod:`eos_jax.data.datasets` (loading) both read it, so neither imports
the other's caller.
"""

from __future__ import annotations

from eos_jax.errors import ConfigError

SPLITS = ("train", "test")

# name -> (base dataset or None for sklearn and the bundled subset, kept labels or None, first-n train
# examples or None, num_classes)
_REGISTRY: dict[str, tuple[str | None, tuple[int, ...] | None, int | None, int]] = {
    "mnist": ("mnist", None, None, 10),
    "fashion_mnist": ("fashion_mnist", None, None, 10),
    "cifar10": ("cifar10", None, None, 10),
    "mnist01": ("mnist", (0, 1), None, 2),
    "fashion_mnist01": ("fashion_mnist", (0, 1), None, 2),
    "cifar10_5k": ("cifar10", None, 5000, 10),
    "fashion_mnist01_bundled": (None, None, None, 2),
    "digits01": (None, (0, 1), None, 2),
}
NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _check_name_split(name: str, split: str) -> None:
    """Raises ConfigError for an unknown name or split."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(NAMES)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for dataset {name!r}; allowed: {', '.join(SPLITS)}")


def base_of(name: str) -> str | None:
    """The base dataset whose files are searched for ``name`` (None: bundled with the package or scikit-learn).

    Examples:
      >>> from eos_jax.data.registry import base_of
      >>> base_of("mnist01"), base_of("cifar10_5k"), base_of("fashion_mnist01_bundled")
      ('mnist', 'cifar10', None)
      >>> base_of("imagenet")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: unknown dataset 'imagenet'; allowed: mnist, fashion_mnist, ...
    """
    _check_name_split(name, "train")
    return _REGISTRY[name][0]
