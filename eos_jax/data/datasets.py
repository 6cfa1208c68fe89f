"""Named datasets: ``load(name, split)`` returns images in [0, 1] and integer labels.

=======================  =======  ==================================================
name                     classes  what
=======================  =======  ==================================================
mnist                    10       MNIST, 60000 train / 10000 test, (28, 28, 1)
fashion_mnist            10       Fashion-MNIST, 60000 / 10000, (28, 28, 1)
cifar10                  10       CIFAR-10, 50000 / 10000, (32, 32, 3)
mnist01                  2        MNIST digits 0 and 1 (paper Sec. 5.6, Figs. 7 and 9)
fashion_mnist01          2        Fashion-MNIST classes 0 (T-shirt/top) and 1
                                  (trouser)
fashion_mnist01_bundled  2        the first 2000 training / 500 test examples of
                                  ``fashion_mnist01``, shipped inside the package
                                  (1.96 MB, MIT licence, Zalando SE: see NOTICE),
                                  SHA-256 checked on every load; needs nothing
                                  installed
cifar10_5k               10       first 5000 CIFAR-10 training images (Cohen et al.
                                  2021, paper Fig. 8); its test split is the full
                                  test set
digits01                 2        scikit-learn's bundled 8x8 digits 0 and 1,
                                  (8, 8, 1)
=======================  =======  ==================================================

Pixels are scaled exactly as ``uint8.astype(float32) / float32(255)`` (digits:
``/ float32(16)``, their values are 0..16): one correctly rounded float32 division per
pixel. Subsets keep the original order of the examples.

``fashion_mnist01_bundled`` is a prefix of ``fashion_mnist01`` (same images, same
order, same labels 0/1, same float32 pixels), so a run on its first ``n <= 2000``
training examples equals the same run on the full dataset. It is made from the
published files by ``python scripts/make_bundled_data.py`` (``--check`` regenerates it
and compares bit for bit); its digests are :data:`eos_jax.data.sources.BUNDLED`. A
changed file is an error naming the file, never a silent fallback.

``digits01`` has no official split: of the 360 examples of digits 0 and 1 in
scikit-learn's order, those at positions ``i % 5 == 4`` form the test split (72) and the
others the training split (288).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from eos_jax.data import formats, sources
from eos_jax.data.registry import _REGISTRY, NAMES, SPLITS, _check_name_split, base_of  # noqa: F401 (re-exported)
from eos_jax.errors import ChecksumError, ConfigError, DataNotFoundError, MalformedDataError

DIGITS01_TEST_EVERY = 5  # position i among digits 0/1 is a test example iff i % 5 == 4


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images and labels of one split, with where they came from.

    A pytree whose leaves are ``x`` and ``y`` (the rest is static metadata), so
    ``jax.device_put(ds)`` or :meth:`to_device` moves both arrays at once and a
    ``Dataset`` can be passed to jitted functions.

    Attributes:
      x: float32 images, NHWC, in [0, 1].
      y: int32 labels in ``[0, num_classes)``.
      name: registry name, e.g. ``"mnist01"``.
      split: ``"train"`` or ``"test"``.
      num_classes: number of classes (2 for the binary subsets).
      source: the files read (paths as strings), or the scikit-learn data file.
      sha256: SHA-256 of each file in ``source``, in the same order.

    Examples:
      >>> import jax
      >>> from eos_jax.data import load
      >>> ds = load("fashion_mnist01_bundled", "test")  # ships with the package
      >>> len(ds), ds.x.shape, ds.x.dtype, ds.y.dtype, ds.num_classes
      (500, (500, 28, 28, 1), dtype('float32'), dtype('int32'), 2)
      >>> ds.info["example_shape"], sorted(set(ds.y.tolist()))
      ([28, 28, 1], [0, 1])
      >>> on_device = ds.to_device()  # a pytree of (x, y): one transfer
      >>> isinstance(on_device.x, jax.Array), on_device.name
      (True, 'fashion_mnist01_bundled')
    """

    x: np.ndarray | jax.Array
    y: np.ndarray | jax.Array
    name: str
    split: str
    num_classes: int
    source: tuple[str, ...]
    sha256: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def info(self) -> dict:
        """JSON-able description for run metadata (no arrays)."""
        return {
            "name": self.name,
            "split": self.split,
            "num_examples": len(self),
            "example_shape": list(self.x.shape[1:]),
            "num_classes": self.num_classes,
            "source": list(self.source),
            "sha256": list(self.sha256),
        }

    def to_device(self, device: jax.Device | jax.sharding.Sharding | None = None) -> Dataset:
        """Returns a copy whose ``x`` and ``y`` live on ``device`` (one transfer; datasets here fit)."""
        return jax.device_put(self, device)


jax.tree_util.register_dataclass(
    Dataset, data_fields=["x", "y"], meta_fields=["name", "split", "num_classes", "source", "sha256"]
)


def search_paths(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories, in search order, where the files of dataset ``name`` are looked for.

    Empty for ``digits01`` (bundled with scikit-learn); the package's own directory for
    ``fashion_mnist01_bundled``. See :mod:`eos_jax.data.sources` for the order of roots
    and the accepted layouts.

    Examples:
      >>> import os
      >>> from unittest import mock
      >>> from eos_jax.data import search_paths
      >>> with mock.patch.dict(os.environ, {"EOS_JAX_NO_SYSTEM_DATA": "1", "EOS_JAX_DATA": ""}):
      ...     [str(p) for p in search_paths("fashion_mnist01", "/data")]
      ['/data/fashion_mnist', '/data/fashion-mnist', '/data/FashionMNIST/raw', '/data/FashionMNIST', '/data/fashion', '/data']
      >>> search_paths("digits01"), search_paths("fashion_mnist01_bundled")[0].name
      ([], 'fashion_mnist01')
    """
    if name in sources.BUNDLED:
        return [sources.bundled_dir(name)]
    base = base_of(name)
    return [] if base is None else sources.candidate_dirs(base, data_dir)


def _scale(images_u8: np.ndarray, maximum: int) -> np.ndarray:
    """uint8/int images -> float32 in [0, 1], one correctly rounded division per pixel."""
    return images_u8.astype(np.float32) / np.float32(maximum)


def _load_base(base: str, split: str, data_dir: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Reads a base dataset's files: uint8 NHWC images, int32 labels, files read."""
    files, looked = sources.find_files(base, split, data_dir)
    if files is None:
        raise DataNotFoundError(sources.describe_sources(base, split, looked))
    if base in ("mnist", "fashion_mnist"):
        images, labels = formats.read_idx_pair(files[0], files[1], num_classes=10)
        return images[..., None], labels, files
    reader = formats.read_cifar_binary if files[0].parent.name == "cifar-10-batches-bin" else formats.read_cifar_python
    parts = [reader(f, num_classes=10) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), files


def _digits_file() -> Path:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn (~3 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("digits01 needs scikit-learn's bundled 8x8 digits: pip install scikit-learn")
    for root in spec.submodule_search_locations:
        f = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if f.is_file():
            return f
    raise DataNotFoundError(f"scikit-learn is installed but has no datasets/data/digits.csv.gz under {spec.origin}")


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 NHWC, labels, the data file.

    Parsed as ``sklearn.datasets.load_digits`` parses it (``np.loadtxt`` of the gzipped CSV:
    64 pixel columns, then the label), without importing scikit-learn; the suite checks
    that both give the same arrays.
    """
    data_file = _digits_file()
    with gzip.open(data_file, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    if table.ndim != 2 or table.shape[1] != 65:
        raise MalformedDataError(f"{data_file}: expected 65 comma-separated columns, got shape {table.shape}")
    images = table[:, :-1].reshape(-1, 8, 8)
    labels = table[:, -1]
    if (
        images.min() < 0
        or images.max() > 16
        or np.any(images != np.round(images))
        or np.any(labels != np.round(labels))
    ):
        raise MalformedDataError(f"{data_file}: scikit-learn digits are not 8x8 integers in 0..16")
    return images.astype(np.uint8)[..., None], labels.astype(np.int32), [data_file]


def _load_bundled(name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[Path], list[str]]:
    """A subset shipped with the package: uint8 NHWC images, int32 labels, files, their SHA-256.

    Every file is checked against :data:`eos_jax.data.sources.BUNDLED` before it is parsed.
    """
    spec = sources.BUNDLED[name]
    d = sources.bundled_dir(name)
    files = [d / f.filename for f in spec.files[split]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataNotFoundError(
            f"bundled dataset {name}: missing {', '.join(missing)} (package data not installed; "
            f"reinstall eos-jax or run python scripts/make_bundled_data.py)"
        )
    digests = []
    for f, want in zip(files, spec.files[split]):
        got = formats.sha256_file(f)
        if got != want.sha256:
            raise ChecksumError(
                f"{f}: SHA-256 {got} does not match the bundled {want.sha256}; the package data was "
                f"changed: reinstall eos-jax or regenerate it with python scripts/make_bundled_data.py"
            )
        digests.append(got)
    images, labels = formats.read_idx_pair(files[0], files[1], num_classes=len(spec.classes))
    if labels.shape[0] != spec.counts[split]:  # pragma: no cover - the digest fixes the count
        raise MalformedDataError(f"{files[1]}: {labels.shape[0]} examples, expected {spec.counts[split]}")
    return images[..., None], labels, files, digests


def load(name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a named dataset split into host memory.

    Args:
      name: one of :data:`NAMES`.
      split: ``"train"`` or ``"test"``.
      data_dir: a root directory searched first (see :mod:`eos_jax.data.sources`).

    Returns:
      A :class:`Dataset` with float32 NHWC images in [0, 1] and int32 labels.

    Raises:
      ConfigError: unknown name or split.
      DataNotFoundError: no files found (the message lists where it looked and how to
        provide them).
      MalformedDataError: a file is not in the published format (names the file).
      ChecksumError: a bundled file does not have its recorded SHA-256 (names the file).
      DataError: loose IDX files in ``data_dir`` that cannot be identified.
      ConfigError: ``data_dir`` does not exist, is not a directory or cannot be read.

    Examples:
      ``mnist01`` keeps the digits 0 and 1 of MNIST files found in ``data_dir``:

      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import write_idx  # tiny uint8 files in MNIST's IDX format
      >>> d = tempfile.mkdtemp()  # three 2x2 MNIST images of the digits 0, 7, 1 per split
      >>> for prefix in ("train", "t10k"):
      ...     _ = write_idx(os.path.join(d, "mnist", f"{prefix}-images-idx3-ubyte"), np.reshape(np.uint8([255] * 12), (3, 2, 2)))
      ...     _ = write_idx(os.path.join(d, "mnist", f"{prefix}-labels-idx1-ubyte"), np.reshape(np.uint8([0, 7, 1]), (3,)))
      >>> from eos_jax.data import load
      >>> ds = load("mnist01", "train", data_dir=d)
      >>> ds.x.shape, ds.y.tolist(), float(ds.x.max())  # pixels / 255
      ((2, 2, 2, 1), [0, 1], 1.0)
      >>> load("mnist01", "validation")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: unknown split 'validation' for dataset 'mnist01'; allowed: train, test
    """
    _check_name_split(name, split)
    sources.check_data_dir(data_dir)  # a named directory is honoured or refused, never passed over
    base, keep, first_n, num_classes = _REGISTRY[name]
    if name in sources.BUNDLED:
        images, labels, files, digests = _load_bundled(name, split)
        return Dataset(
            _scale(images, 255), labels, name, split, num_classes, tuple(str(f) for f in files), tuple(digests)
        )
    if base is None:
        images, labels, files = _load_digits()
        sha = tuple(formats.sha256_file(f) for f in files)
        mask = np.isin(labels, np.asarray(keep, dtype=np.int32))
        images, labels = images[mask], labels[mask]
        is_test = np.arange(labels.shape[0]) % DIGITS01_TEST_EVERY == DIGITS01_TEST_EVERY - 1
        pick = is_test if split == "test" else ~is_test
        return Dataset(
            _scale(images[pick], 16),
            labels[pick].astype(np.int32),
            name,
            split,
            num_classes,
            tuple(str(f) for f in files),
            sha,
        )
    images, labels, files = _load_base(base, split, data_dir)
    if keep is not None:
        mask = np.isin(labels, np.asarray(keep, dtype=np.int32))
        images, labels = images[mask], labels[mask]
        # The kept classes are 0..len(keep)-1 already for the 01 subsets; remap in general.
        labels = np.searchsorted(np.asarray(keep, dtype=np.int32), labels).astype(np.int32)
    if first_n is not None and split == "train":
        if labels.shape[0] < first_n:
            raise MalformedDataError(
                f"{files[0].parent}: {name} needs {first_n} training images, the files hold {labels.shape[0]}"
            )
        images, labels = images[:first_n], labels[:first_n]
    sha = tuple(formats.sha256_file(f) for f in files)
    return Dataset(
        _scale(images, 255), labels.astype(np.int32), name, split, num_classes, tuple(str(f) for f in files), sha
    )


def load_first_available(
    names: Sequence[str], split: str = "train", *, data_dir: str | os.PathLike | None = None
) -> tuple[Dataset, list[tuple[str, str]]]:
    """Loads the first dataset in ``names`` whose files are found.

    Only a missing dataset (DataNotFoundError) moves on to the next name; a malformed
    file is an error, never a silent fallback. The caller warns about the skipped ones.

    Returns:
      ``(dataset, skipped)`` where ``skipped`` lists ``(name, reason)`` for the names
      tried before it.

    Raises:
      ConfigError: an unknown name or split, or an empty ``names``.
      DataNotFoundError: none was found (lists every reason).

    Examples:
      On a machine without CIFAR-10 (the user cache and system directories switched off),
      the MNIST files of ``data_dir`` are used:

      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import write_idx  # tiny uint8 files in MNIST's IDX format
      >>> d = tempfile.mkdtemp()  # three 2x2 MNIST images of the digits 0, 7, 1 per split
      >>> for prefix in ("train", "t10k"):
      ...     _ = write_idx(os.path.join(d, "mnist", f"{prefix}-images-idx3-ubyte"), np.reshape(np.uint8([255] * 12), (3, 2, 2)))
      ...     _ = write_idx(os.path.join(d, "mnist", f"{prefix}-labels-idx1-ubyte"), np.reshape(np.uint8([0, 7, 1]), (3,)))
      >>> from unittest import mock
      >>> from eos_jax.data import load_first_available
      >>> with mock.patch.dict(os.environ, {"EOS_JAX_NO_SYSTEM_DATA": "1", "EOS_JAX_DATA": ""}):
      ...     ds, skipped = load_first_available(["cifar10", "mnist01"], "test", data_dir=d)
      >>> ds.name, len(ds), [name for name, why in skipped]
      ('mnist01', 2, ['cifar10'])
    """
    names = list(names)
    if not names:
        raise ConfigError("load_first_available: names is empty; give at least one of " + ", ".join(NAMES))
    sources.check_data_dir(data_dir)  # a named directory is honoured or refused, never passed over
    for n in names:
        _check_name_split(n, split)
    skipped: list[tuple[str, str]] = []
    for n in names:
        try:
            return load(n, split, data_dir=data_dir), skipped
        except DataNotFoundError as e:
            skipped.append((n, str(e)))
    raise DataNotFoundError(
        "none of " + ", ".join(names) + " is available: " + " | ".join(f"{n}: {r}" for n, r in skipped)
    )


def unused_in_data_dir(
    data_dir: str | os.PathLike | None, used: Dataset, requested: Sequence[str]
) -> list[dict[str, str]]:
    """Dataset files in the user's ``data_dir`` that were passed over, and why.

    Nothing is reported when ``data_dir`` is None or when ``used`` was read from it (the
    directory was honoured). Otherwise every dataset ``data_dir`` holds (any layout of
    :mod:`eos_jax.data.sources`, or loose IDX files) is listed with the reason it was not
    used: not requested, another requested dataset comes first and was found elsewhere, or
    it could not be loaded.

    Returns:
      ``[{"path", "holds", "why"}]``, JSON-able, for the warning and metadata.json.

    Examples:
      MNIST files in ``data_dir`` while the run asked for the bundled Fashion-MNIST subset:

      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import write_idx  # tiny uint8 files in MNIST's IDX format
      >>> d = tempfile.mkdtemp()  # three 2x2 MNIST images of the digits 0, 7, 1 per split
      >>> for prefix in ("train", "t10k"):
      ...     _ = write_idx(os.path.join(d, "mnist", f"{prefix}-images-idx3-ubyte"), np.reshape(np.uint8([255] * 12), (3, 2, 2)))
      ...     _ = write_idx(os.path.join(d, "mnist", f"{prefix}-labels-idx1-ubyte"), np.reshape(np.uint8([0, 7, 1]), (3,)))
      >>> from eos_jax.data import load, unused_in_data_dir
      >>> used = load("fashion_mnist01_bundled", "test")
      >>> [u["why"] for u in unused_in_data_dir(d, used, ["fashion_mnist01_bundled"])]
      ['MNIST is not among the requested datasets (fashion_mnist01_bundled)']
    """
    if data_dir is None:
        return []
    root = Path(data_dir).expanduser().resolve()
    if any(Path(s).resolve().is_relative_to(root) for s in used.source):
        return []
    requested = list(requested)
    rank = {n: i for i, n in enumerate(requested)}
    used_rank = rank.get(used.name, len(requested))
    used_where = str(Path(used.source[0]).parent) if used.source else "?"
    out = []
    for base, where, note in sources.files_in(root):
        title = sources.BASE_TITLES.get(base, "unidentified IDX")
        names = [n for n in requested if n in _REGISTRY and _REGISTRY[n][0] == base]
        if base not in sources.BASE_TITLES:
            why = "neither a published SHA-256 nor the first labels identify them as MNIST or Fashion-MNIST"
        elif not names:
            why = f"{title} is not among the requested datasets ({', '.join(requested)})"
        elif rank[names[0]] > used_rank:
            why = (
                f"{used.name} comes before {names[0]} in the search order and was found in {used_where} "
                f"(request dataset {names[0]} to use it)"
            )
        else:
            why = f"{names[0]} could not be loaded from it (see fallback_from)"
        out.append({"path": str(where), "holds": title + (f" ({note})" if note else ""), "why": why})
    return out
