"""Datasets for eos-jax: readers, named datasets, downloads, preprocessing and batching.

Typical use::

    from eos_jax import data
    train = data.load("mnist01", "train", data_dir=args.data_dir).to_device()
    ds, skipped = data.load_first_available(["mnist01", "fashion_mnist01", "digits01"])

See :mod:`eos_jax.data.sources` for where files are looked for, and
:mod:`eos_jax.data.formats` for the file formats and the restricted unpickler.
"""

from eos_jax.data.datasets import NAMES, SPLITS, Dataset, load, load_first_available, search_paths
from eos_jax.data.formats import (
    RestrictedUnpickler,
    read_cifar_binary,
    read_cifar_python,
    read_idx,
    read_idx_pair,
    restricted_loads,
    sha256_file,
)
from eos_jax.data.sources import PUBLISHED, download, fetch, search_roots, user_cache_dir
from eos_jax.data.transforms import (
    augment_cifar,
    batch_indices,
    channel_stats,
    epoch_permutation,
    iterate_batches,
    normalize,
    num_batches,
    one_hot,
    standardize,
)

__all__ = [
    "NAMES", "SPLITS", "Dataset", "load", "load_first_available", "search_paths",
    "RestrictedUnpickler", "read_cifar_binary", "read_cifar_python", "read_idx", "read_idx_pair",
    "restricted_loads", "sha256_file", "PUBLISHED", "download", "fetch", "search_roots", "user_cache_dir",
    "augment_cifar", "batch_indices", "channel_stats", "epoch_permutation", "iterate_batches", "normalize",
    "num_batches", "one_hot", "standardize",
]
