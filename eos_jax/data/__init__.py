"""Datasets for eos-jax: readers, named datasets, downloads, preprocessing and batching.

Typical use::

    from eos_jax import data
    train = data.load("mnist01", "train", data_dir=args.data_dir).to_device()
    ds, skipped = data.load_first_available(["mnist01", "fashion_mnist01", "fashion_mnist01_bundled"])
    ds = data.load("fashion_mnist01_bundled", "train")  # ships with the package: always there

See :mod:`eos_jax.data.datasets` for the named datasets (including the Fashion-MNIST 0/1
subset bundled with the package, SHA-256 checked on every load),
:mod:`eos_jax.data.sources` for where files are looked for (and ``EOS_JAX_NO_SYSTEM_DATA=1``,
which switches off the user cache and the system locations), and
:mod:`eos_jax.data.formats` for the file formats and the restricted unpickler.
"""

from eos_jax.data.datasets import (
    NAMES,
    SPLITS,
    Dataset,
    load,
    load_first_available,
    search_paths,
    unused_in_data_dir,
)
from eos_jax.data.formats import (
    RestrictedUnpickler,
    read_cifar_binary,
    read_cifar_python,
    read_idx,
    read_idx_pair,
    restricted_loads,
    sha256_file,
    write_idx,
)
from eos_jax.data.sources import (
    BUNDLED,
    PUBLISHED,
    bundled_dir,
    check_data_dir,
    download,
    fetch,
    identify_loose,
    search_roots,
    user_cache_dir,
)
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
    "NAMES",
    "SPLITS",
    "Dataset",
    "load",
    "load_first_available",
    "search_paths",
    "unused_in_data_dir",
    "BUNDLED",
    "bundled_dir",
    "check_data_dir",
    "identify_loose",
    "RestrictedUnpickler",
    "read_cifar_binary",
    "read_cifar_python",
    "read_idx",
    "read_idx_pair",
    "restricted_loads",
    "sha256_file",
    "PUBLISHED",
    "download",
    "fetch",
    "search_roots",
    "user_cache_dir",
    "augment_cifar",
    "batch_indices",
    "channel_stats",
    "epoch_permutation",
    "iterate_batches",
    "normalize",
    "num_batches",
    "one_hot",
    "standardize",
    "write_idx",
]
