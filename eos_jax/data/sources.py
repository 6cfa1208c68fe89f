"""Where dataset files are looked for, and how to download the published files.

Search order for the root directories (first match wins), read at call time:

1. the explicit ``data_dir`` argument;
2. ``$EOS_JAX_DATA`` (several directories separated by ``os.pathsep``);
3. the user cache ``$XDG_CACHE_HOME/eos_jax`` (default ``~/.cache/eos_jax``), where
   :func:`download` puts files;
4. known system locations: ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist``
   installs ``/usr/share/datasets/fashion-mnist/*-ubyte.gz``).

``EOS_JAX_NO_SYSTEM_DATA=1`` (read at call time, any value but empty or ``0``) switches
off the user cache and the system locations (3 and 4), so that a test or a user can see
what a fresh machine sees; the explicit ``data_dir``, ``$EOS_JAX_DATA`` and the data
bundled with the package stay on.

Layouts accepted under each root (``*`` = raw IDX or ``.gz``):

* MNIST: ``mnist/``, ``MNIST/raw/`` (torchvision), ``MNIST/`` holding
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
* Fashion-MNIST: ``fashion_mnist/``, ``fashion-mnist/`` (Debian), ``FashionMNIST/raw/``
  (torchvision), ``FashionMNIST/``, ``fashion/`` (the zalando repository) with the same names.
* CIFAR-10: ``cifar-10-batches-bin/`` (``data_batch_{1..5}.bin``, ``test_batch.bin``) or
  ``cifar-10-batches-py/`` (``data_batch_{1..5}``, ``test_batch``), also under ``cifar10/``.
  The binary format is preferred when both exist (it needs no unpickling).

Loose IDX files directly in the explicit ``data_dir`` (not in a subfolder) are used too,
after its subfolders. MNIST and Fashion-MNIST use the same file names, so such files are
identified first: by a known SHA-256 (the published ``.gz`` files in :data:`PUBLISHED`,
Debian's recompressed Fashion-MNIST ``.gz`` files, the decompressed Fashion-MNIST files),
else by the first ten labels of the labels files (:data:`LABEL_FINGERPRINTS`). Files that
neither identifies are refused (:class:`~eos_jax.errors.DataError` telling to put them in
``DIR/mnist/`` or ``DIR/fashion_mnist/``), never guessed. Other roots (``$EOS_JAX_DATA``,
the cache, the system) are never read as a dataset directory themselves.

The subset ``fashion_mnist01_bundled`` ships inside the package (:data:`BUNDLED`,
:func:`bundled_dir`): it needs no search and is checked against its SHA-256 on every load.

Published SHA-256 digests below are those listed by tensorflow-datasets
(``tensorflow_datasets/url_checksums/{mnist,fashion_mnist,cifar10}.txt``, cifar10.csv
for the python archive) and agree with Keras and torchvision's prototype datasets.
Debian's Fashion-MNIST files are recompressed (gzip header without the file name,
23 bytes shorter), so their digests are not the published ones; ``Dataset.sha256``
records what was actually read.

It keeps every dataset's locations, mirrors, file names and SHA-256 digests in one place, read by
the loader, the downloader and the bundled-data script alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from eos_jax.data.formats import read_idx, sha256_file
from eos_jax.data.registry import base_of
from eos_jax.errors import ChecksumError, ConfigError, DataError, MalformedDataError
from eos_jax.io import atomic_write_bytes

SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets",)
NO_SYSTEM_DATA_ENV = "EOS_JAX_NO_SYSTEM_DATA"

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_BIN_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
CIFAR_PY_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

# Base dataset (the files) -> subdirectories tried under every root, in order.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST", "fashion"),
    "cifar10": (
        "cifar-10-batches-bin",
        "cifar10/cifar-10-batches-bin",
        "cifar-10-batches-py",
        "cifar10/cifar-10-batches-py",
    ),
}


class Resource(NamedTuple):
    """One published file: name, default URL directory, SHA-256 and size in bytes.

    Examples:
      >>> from eos_jax.data.sources import PUBLISHED
      >>> r = PUBLISHED["mnist"][1]
      >>> r.filename, r.size
      ('train-labels-idx1-ubyte.gz', 28881)
    """

    filename: str
    base_url: str
    sha256: str
    size: int


_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

PUBLISHED: dict[str, tuple[Resource, ...]] = {
    "mnist": (
        Resource(
            "train-images-idx3-ubyte.gz",
            _MNIST_URL,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            9912422,
        ),
        Resource(
            "train-labels-idx1-ubyte.gz",
            _MNIST_URL,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            28881,
        ),
        Resource(
            "t10k-images-idx3-ubyte.gz",
            _MNIST_URL,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            1648877,
        ),
        Resource(
            "t10k-labels-idx1-ubyte.gz",
            _MNIST_URL,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            4542,
        ),
    ),
    "fashion_mnist": (
        Resource(
            "train-images-idx3-ubyte.gz",
            _FASHION_URL,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            26421880,
        ),
        Resource(
            "train-labels-idx1-ubyte.gz",
            _FASHION_URL,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            29515,
        ),
        Resource(
            "t10k-images-idx3-ubyte.gz",
            _FASHION_URL,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            4422102,
        ),
        Resource(
            "t10k-labels-idx1-ubyte.gz",
            _FASHION_URL,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            5148,
        ),
    ),
    # The binary archive: it needs no unpickling. (The python archive,
    # cifar-10-python.tar.gz, is 6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce.)
    "cifar10": (
        Resource(
            "cifar-10-binary.tar.gz",
            _CIFAR_URL,
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
            170052171,
        ),
    ),
}
# Fashion-MNIST as Debian ships it (package dataset-fashion-mnist 0.0~git20200523.55506a9-1,
# /usr/share/datasets/fashion-mnist/): the SAME content recompressed, so the .gz digests and
# sizes differ from the published ones above. Computed from the installed package.
DEBIAN_FASHION_GZ: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte.gz": ("b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7", 26421856),
    "train-labels-idx1-ubyte.gz": ("0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056", 29491),
    "t10k-images-idx3-ubyte.gz": ("cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa", 4422079),
    "t10k-labels-idx1-ubyte.gz": ("8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05", 5125),
}
# The DECOMPRESSED Fashion-MNIST IDX files (the published content, whichever gzip wrapped
# it): SHA-256 and size. Computed here by decompressing Debian's files; they agree with
# independent public listings of the digests of the decompressed upstream files.
FASHION_IDX_SHA256: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
# The first ten labels of each published labels file: they tell MNIST from Fashion-MNIST
# when loose files match no known digest (e.g. decompressed or recompressed MNIST).
# Fashion-MNIST's were read from Debian's files here. MNIST's could not be read here (no
# MNIST on this machine); they are the well-known ones that independent public test suites
# assert for the published files.
LABEL_FINGERPRINTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("mnist", "train"): (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
    ("mnist", "test"): (7, 2, 1, 0, 4, 1, 4, 9, 5, 9),
    ("fashion_mnist", "train"): (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
    ("fashion_mnist", "test"): (9, 2, 1, 1, 6, 1, 4, 6, 5, 7),
}
BASE_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


class BundledFile(NamedTuple):
    """One file of a dataset bundled with the package: name, SHA-256, size in bytes.

    Examples:
      >>> from eos_jax.data.sources import BUNDLED
      >>> images, labels = BUNDLED["fashion_mnist01_bundled"].files["test"]
      >>> labels.filename, labels.size  # 8 header bytes + 500 labels
      ('t10k-labels-idx1-ubyte', 508)
    """

    filename: str
    sha256: str
    size: int


class BundledSpec(NamedTuple):
    """A subset shipped inside the package (see scripts/make_bundled_data.py).

    ``counts[split]`` examples of ``classes`` of ``base`` (the first ones, in the published
    order), with their original labels, as UNCOMPRESSED IDX files: compressed bytes can
    differ between zlib builds, raw bytes regenerate bit for bit.

    Examples:
      >>> from eos_jax.data.sources import BUNDLED
      >>> spec = BUNDLED["fashion_mnist01_bundled"]
      >>> spec.base, spec.classes, spec.counts
      ('fashion_mnist', (0, 1), {'train': 2000, 'test': 500})
    """

    base: str
    classes: tuple[int, ...]
    counts: dict[str, int]
    subdir: str
    files: dict[str, tuple[BundledFile, BundledFile]]  # split -> (images, labels)


# The SHA-256 of the files that scripts/make_bundled_data.py writes; checked on every load
# and by the script (its --check mode regenerates them and compares bit for bit).
BUNDLED: dict[str, BundledSpec] = {
    "fashion_mnist01_bundled": BundledSpec(
        base="fashion_mnist",
        classes=(0, 1),
        counts={"train": 2000, "test": 500},
        subdir="fashion_mnist01",
        files={
            "train": (
                BundledFile(
                    "train-images-idx3-ubyte",
                    "baee76f6e74cd58024fb6cfb6cbcfa62477b532c57b982d7cedb0d4757a36b7d",
                    1568016,
                ),
                BundledFile(
                    "train-labels-idx1-ubyte", "88084dba9af6691dd387eaea1de39b829cb2387347b74f78ee4137b09e4013eb", 2008
                ),
            ),
            "test": (
                BundledFile(
                    "t10k-images-idx3-ubyte", "0b7c9339831f920f161dfea35fe36e3ff2c4d56d37868f13c586e37638b0647f", 392016
                ),
                BundledFile(
                    "t10k-labels-idx1-ubyte", "aafa90d0925a0ee20f6d2ae89dd60b9df3eea8e315417f4829c3c09a44296498", 508
                ),
            ),
        },
    ),
}
# Where the bundled files live (tests point it at a copy to check that tampering is refused).
BUNDLED_ROOT: Path = Path(__file__).resolve().parent / "bundled"


def bundled_dir(name: str) -> Path:
    """The directory of the bundled dataset ``name`` (read at call time from :data:`BUNDLED_ROOT`).

    Examples:
      >>> from eos_jax.data.sources import bundled_dir
      >>> d = bundled_dir("fashion_mnist01_bundled")
      >>> d.name, sorted(p.name for p in d.glob("t10k-*"))
      ('fashion_mnist01', ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'])
    """
    return BUNDLED_ROOT / BUNDLED[name].subdir


# Which published files the dataset directory must hold after download (CIFAR: extracted).
_CIFAR_ARCHIVE_MEMBERS = tuple(f"cifar-10-batches-bin/{n}" for n in CIFAR_BIN_FILES["train"] + CIFAR_BIN_FILES["test"])
_DOWNLOAD_SUBDIR = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "."}


def user_cache_dir() -> Path:
    """The user cache directory: ``$XDG_CACHE_HOME/eos_jax`` or ``~/.cache/eos_jax``.

    Examples:
      >>> import os
      >>> from unittest import mock
      >>> from eos_jax.data.sources import user_cache_dir
      >>> with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": "/scratch/me/cache"}):
      ...     str(user_cache_dir())
      '/scratch/me/cache/eos_jax'
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "eos_jax"


def system_data_disabled() -> bool:
    """True when ``$EOS_JAX_NO_SYSTEM_DATA`` is set to anything but empty or ``0`` (read at call time).

    Examples:
      >>> import os
      >>> from unittest import mock
      >>> from eos_jax.data.sources import system_data_disabled
      >>> with mock.patch.dict(os.environ, {"EOS_JAX_NO_SYSTEM_DATA": "1"}):
      ...     system_data_disabled()
      True
      >>> with mock.patch.dict(os.environ, {"EOS_JAX_NO_SYSTEM_DATA": "0"}):
      ...     system_data_disabled()
      False
    """
    return os.environ.get(NO_SYSTEM_DATA_ENV, "").strip() not in ("", "0")


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Root directories in search order (explicit, ``$EOS_JAX_DATA``, cache, system), deduplicated.

    With ``EOS_JAX_NO_SYSTEM_DATA=1`` the cache and the system directories are left out.

    Examples:
      >>> import os
      >>> from unittest import mock
      >>> from eos_jax.data.sources import search_roots
      >>> env = {"EOS_JAX_DATA": "/data/a" + os.pathsep + "/data/b", "XDG_CACHE_HOME": "/scratch/cache",
      ...        "EOS_JAX_NO_SYSTEM_DATA": ""}
      >>> with mock.patch.dict(os.environ, env):
      ...     [str(p) for p in search_roots("/data/mine")]
      ['/data/mine', '/data/a', '/data/b', '/scratch/cache/eos_jax', '/usr/share/datasets']
      >>> with mock.patch.dict(os.environ, dict(env, EOS_JAX_NO_SYSTEM_DATA="1")):
      ...     [str(p) for p in search_roots("/data/mine")]
      ['/data/mine', '/data/a', '/data/b']
    """
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get("EOS_JAX_DATA")
    if env:
        roots.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    if not system_data_disabled():
        roots.append(user_cache_dir())
        roots.extend(Path(p) for p in SYSTEM_DIRS)
    seen: set[Path] = set()
    out = []
    for r in roots:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def candidate_dirs(base: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every directory, in order, where the files of base dataset ``base`` are looked for.

    For MNIST and Fashion-MNIST the explicit ``data_dir`` itself comes right after its
    subfolders (loose files, identified before use: :func:`identify_loose`).

    Examples:
      >>> import os
      >>> from unittest import mock
      >>> from eos_jax.data.sources import candidate_dirs
      >>> with mock.patch.dict(os.environ, {"EOS_JAX_NO_SYSTEM_DATA": "1", "EOS_JAX_DATA": ""}):
      ...     [str(p) for p in candidate_dirs("mnist", "/data")]
      ['/data/mnist', '/data/MNIST/raw', '/data/MNIST', '/data']
    """
    if base not in LAYOUTS:
        raise ConfigError(f"unknown base dataset {base!r}; allowed: {', '.join(sorted(LAYOUTS))}")
    out = []
    explicit = Path(data_dir).expanduser() if data_dir is not None else None
    for root in search_roots(data_dir):
        out.extend(root / sub for sub in LAYOUTS[base])
        if root == explicit and base in ("mnist", "fashion_mnist"):
            out.append(root)
    return out


def required_files(base: str, directory: Path, split: str) -> list[list[Path]] | None:
    """For each file the split needs, the accepted spellings in ``directory`` (None: unknown layout).

    Examples:
      >>> from pathlib import Path
      >>> from eos_jax.data.sources import required_files
      >>> [[p.name for p in options] for options in required_files("mnist", Path("/data/mnist"), "test")]
      [['t10k-images-idx3-ubyte', 't10k-images-idx3-ubyte.gz'], ['t10k-labels-idx1-ubyte', 't10k-labels-idx1-ubyte.gz']]
      >>> [p[0].name for p in required_files("cifar10", Path("/data/cifar-10-batches-bin"), "test")]
      ['test_batch.bin']
    """
    if base in ("mnist", "fashion_mnist"):
        return [[directory / n, directory / (n + ".gz")] for n in IDX_FILES[split]]
    if directory.name == "cifar-10-batches-bin":
        return [[directory / n] for n in CIFAR_BIN_FILES[split]]
    return [[directory / n] for n in CIFAR_PY_FILES[split]]


def _known_digests() -> dict[str, list[tuple[str, str, int]]]:
    """SHA-256 -> [(base, file name, size)] of every MNIST/Fashion-MNIST IDX file we know."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for base in ("mnist", "fashion_mnist"):
        for r in PUBLISHED[base]:
            out.setdefault(r.sha256, []).append((base, r.filename, r.size))
    for table in (DEBIAN_FASHION_GZ, FASHION_IDX_SHA256):
        for name, (digest, size) in table.items():
            out.setdefault(digest, []).append(("fashion_mnist", name, size))
    return out


def _label_prefix(path: Path, n: int) -> tuple[int, ...] | None:
    """The first ``n`` labels of an IDX labels file (None: not a readable 1-d uint8 IDX file)."""
    try:
        labels = read_idx(path, expected_ndim=1, expected_dtype="uint8")
    except MalformedDataError:
        return None
    return tuple(int(v) for v in labels[:n]) if labels.shape[0] >= n else None


class LooseFiles(NamedTuple):
    """What :func:`identify_loose` found directly in a directory.

    Examples:
      >>> from pathlib import Path
      >>> from eos_jax.data.sources import LooseFiles
      >>> lf = LooseFiles(files=(Path("/data/t10k-labels-idx1-ubyte"),), base=None, evidence=(), conflict=False)
      >>> lf.base is None and not lf.conflict  # nothing identifies the file: it is refused
      True
    """

    files: tuple[Path, ...]  # the IDX files lying there (MNIST/Fashion-MNIST names)
    base: str | None  # "mnist" or "fashion_mnist"; None when nothing identifies them
    evidence: tuple[str, ...]  # how each identified file was recognised
    conflict: bool  # files were identified as different datasets


def identify_loose(directory: str | os.PathLike) -> LooseFiles:
    """Which dataset the MNIST-named IDX files lying directly in ``directory`` are.

    Each file of a known size is hashed and compared with the known digests (published
    ``.gz`` files, Debian's recompressed Fashion-MNIST, decompressed Fashion-MNIST); each
    labels file's first ten labels are compared with :data:`LABEL_FINGERPRINTS`.

    Returns:
      A :class:`LooseFiles`; ``files`` is empty when there are none.

    Examples:
      A labels file starting with MNIST's first ten test labels (7, 2, 1, 0, 4, ...):

      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import write_idx  # tiny uint8 files in MNIST's IDX format
      >>> from eos_jax.data.sources import identify_loose
      >>> d = tempfile.mkdtemp()
      >>> _ = write_idx(os.path.join(d, "t10k-labels-idx1-ubyte"), np.reshape(np.uint8([7, 2, 1, 0, 4, 1, 4, 9, 5, 9]), (10,)))
      >>> found = identify_loose(d)
      >>> found.base, found.evidence
      ('mnist', ('t10k-labels-idx1-ubyte: first labels of MNIST',))
    """
    d = Path(directory)
    names = [n for split in ("train", "test") for n in IDX_FILES[split]]
    files = [d / f for n in names for f in (n, n + ".gz") if (d / f).is_file()]
    known = _known_digests()
    sizes = {size for entries in known.values() for _, _, size in entries}
    votes: dict[str, list[str]] = {}
    for f in files:
        size = f.stat().st_size
        if size in sizes:
            for base, name, known_size in known.get(sha256_file(f), []):
                if name == f.name and known_size == size:
                    votes.setdefault(base, []).append(f"{f.name}: known {BASE_TITLES[base]} SHA-256")
        stem = f.name.removesuffix(".gz")
        for split in ("train", "test"):
            if stem == IDX_FILES[split][1]:
                n = len(LABEL_FINGERPRINTS[("mnist", split)])
                prefix = _label_prefix(f, n)
                for base in ("mnist", "fashion_mnist"):
                    if prefix is not None and prefix == LABEL_FINGERPRINTS[(base, split)]:
                        votes.setdefault(base, []).append(f"{f.name}: first labels of {BASE_TITLES[base]}")
    if len(votes) == 1:
        ((base, evidence),) = votes.items()
        return LooseFiles(tuple(files), base, tuple(evidence), False)
    return LooseFiles(tuple(files), None, tuple(e for ev in votes.values() for e in ev), len(votes) > 1)


def _refuse_loose(directory: Path, loose: LooseFiles) -> DataError:
    """The one-line error for loose IDX files that cannot be identified (or disagree)."""
    names = ", ".join(f.name for f in loose.files)
    why = (
        ("they disagree (" + "; ".join(loose.evidence) + ")")
        if loose.conflict
        else ("neither a published SHA-256 nor the first labels identify them as MNIST or Fashion-MNIST")
    )
    return DataError(
        f"{directory}: IDX files lie directly in data_dir ({names}) but {why}; "
        f"put them in {directory / 'mnist'}/ or {directory / 'fashion_mnist'}/"
    )


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """Refuses an explicit ``data_dir`` that does not exist, is not a directory or cannot be read.

    A named directory is honoured or refused, never silently passed over for the cache or
    the data shipped with the package (a typo would otherwise train on other data).

    Raises:
      ConfigError: naming the directory and what is wrong with it.

    Examples:
      >>> import tempfile
      >>> from eos_jax.data import check_data_dir
      >>> check_data_dir(tempfile.mkdtemp())  # an existing, readable directory: nothing to say
      >>> check_data_dir("/no/such/dir")
      Traceback (most recent call last):
      ...
      eos_jax.errors.ConfigError: data_dir=/no/such/dir does not exist; pass an existing directory as data_dir=DIR
    """
    if data_dir is None:
        return
    p = Path(data_dir).expanduser()
    if not p.exists():
        raise ConfigError(f"data_dir={data_dir} does not exist; pass an existing directory as data_dir=DIR")
    if not p.is_dir():
        raise ConfigError(f"data_dir={data_dir} is not a directory; pass an existing directory as data_dir=DIR")
    if not os.access(p, os.R_OK | os.X_OK):
        raise ConfigError(f"data_dir={data_dir} cannot be read (permission denied); pass a readable directory")


def find_files(base: str, split: str, data_dir: str | os.PathLike | None = None) -> tuple[list[Path] | None, list[str]]:
    """The first complete set of files for ``base``/``split``, and notes on where it looked.

    Returns:
      ``(files, looked)``: ``files`` is None when nothing complete was found; ``looked``
      lists every directory tried (with the missing files for incomplete ones).

    Raises:
      DataNotFoundError: ``data_dir`` is given but is not a directory.
      DataError: loose IDX files in ``data_dir`` that cannot be identified (see
        :func:`identify_loose`): refused rather than passed over or guessed.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import write_idx  # tiny uint8 files in MNIST's IDX format
      >>> from eos_jax.data.sources import find_files
      >>> d = tempfile.mkdtemp()
      >>> _ = write_idx(os.path.join(d, "mnist", "t10k-images-idx3-ubyte"), np.reshape(np.uint8([0, 1, 2, 3]), (1, 2, 2)))
      >>> _ = write_idx(os.path.join(d, "mnist", "t10k-labels-idx1-ubyte"), np.reshape(np.uint8([7]), (1,)))
      >>> files, looked = find_files("mnist", "test", d)  # data_dir is searched first
      >>> [os.path.relpath(f, d) for f in files], looked
      (['mnist/t10k-images-idx3-ubyte', 'mnist/t10k-labels-idx1-ubyte'], [])
    """
    check_data_dir(data_dir)  # a typo is not a reason to read whatever the cache or the system holds
    explicit = Path(data_dir).expanduser() if data_dir is not None else None
    looked: list[str] = []
    for d in candidate_dirs(base, data_dir):
        needs = required_files(base, d, split)
        if not d.is_dir():
            looked.append(str(d))
            continue
        if d == explicit:  # loose files directly in data_dir
            loose = identify_loose(d)
            if not loose.files:
                looked.append(f"{d} (no loose IDX files)")
                continue
            if loose.base is None:
                raise _refuse_loose(d, loose)
            if loose.base != base:
                looked.append(f"{d} (its loose IDX files are {BASE_TITLES[loose.base]}: {'; '.join(loose.evidence)})")
                continue
        found = [next((p for p in options if p.is_file()), None) for options in needs]
        if all(p is not None for p in found):
            return [p for p in found if p is not None], looked
        missing = [options[0].name for options, p in zip(needs, found) if p is None]
        looked.append(f"{d} (incomplete: no {', '.join(missing)})")
    return None, looked


def files_in(directory: str | os.PathLike) -> list[tuple[str, Path, str]]:
    """The dataset files a directory holds, as ``(base, where, note)`` (for the unused-files warning).

    Looks at every layout of :data:`LAYOUTS` under ``directory`` (a folder holding at least
    one of the expected files counts) and at loose IDX files in ``directory`` itself
    (``base`` is ``"unidentified"`` when :func:`identify_loose` cannot tell).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import write_idx  # tiny uint8 files in MNIST's IDX format
      >>> from eos_jax.data.sources import files_in
      >>> d = tempfile.mkdtemp()
      >>> _ = write_idx(os.path.join(d, "fashion-mnist", "train-labels-idx1-ubyte"), np.reshape(np.uint8([9]), (1,)))
      >>> _ = write_idx(os.path.join(d, "t10k-labels-idx1-ubyte"), np.reshape(np.uint8([3, 3]), (2,)))  # loose, unidentifiable
      >>> [(base, os.path.relpath(where, d), note) for base, where, note in files_in(d)]
      [('fashion_mnist', 'fashion-mnist', ''), ('unidentified', '.', 'loose IDX files')]
    """
    d = Path(directory).expanduser()
    out: list[tuple[str, Path, str]] = []
    if not d.is_dir():
        return out
    for base, subs in LAYOUTS.items():
        for sub in subs:
            sd = d / sub
            if not sd.is_dir():
                continue
            names = [
                o.name for split in ("train", "test") for options in required_files(base, sd, split) for o in options
            ]
            if any((sd / n).is_file() for n in names):
                out.append((base, sd, ""))
    loose = identify_loose(d)
    if loose.files:
        out.append((loose.base or "unidentified", d, "loose IDX files"))
    return out


# ----------------------------------------------------------------------------------------
# Download.


def fetch(url: str, dest: str | os.PathLike, sha256: str, *, size: int | None = None, timeout: float = 60.0) -> Path:
    """Downloads ``url`` to ``dest`` atomically, verifying its SHA-256.

    The bytes go to a temporary file next to ``dest``; only when the digest matches is it
    renamed to ``dest``. On a mismatch, a network error or more than ``size`` bytes, the
    temporary file is removed and ``dest`` is untouched.

    Raises:
      ChecksumError: the digest differs (names the URL, the expected and the actual digest).
      DataError: the download failed.

    Examples:
      A ``file://`` URL stands for a mirror here:

      >>> import hashlib, os, tempfile
      >>> from eos_jax.data.sources import fetch
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "published.bin"), "wb") as f:
      ...     _ = f.write(b"abc")
      >>> url = "file://" + os.path.join(d, "published.bin")
      >>> digest = hashlib.sha256(b"abc").hexdigest()
      >>> dest = fetch(url, os.path.join(d, "cache", "x.bin"), digest, size=3)
      >>> dest.read_bytes()
      b'abc'
      >>> fetch(url, os.path.join(d, "cache", "y.bin"), "0" * 64)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.ChecksumError: file://...published.bin: SHA-256 ba7816bf... (3 bytes) does not match the expected 000...; nothing was saved
      >>> sorted(os.listdir(os.path.join(d, "cache")))  # no y.bin, no temporary file
      ['x.bin']
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    n = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while block := resp.read(1 << 20):
                        n += len(block)
                        if size is not None and n > size:
                            raise ChecksumError(
                                f"{url}: more than the published {size} bytes; refusing (wrong file or mirror)"
                            )
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise DataError(
                    f"download of {url} failed ({e}); fetch it by hand and pass data_dir=DIR or set EOS_JAX_DATA"
                ) from None
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256.lower():
            raise ChecksumError(
                f"{url}: SHA-256 {h.hexdigest()} ({n} bytes) does not match the expected {sha256}; nothing was saved"
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def _file_matches(path: Path, sha256: str) -> bool:
    """True iff ``path`` exists and has the given digest."""
    return path.is_file() and sha256_file(path) == sha256.lower()


def _extract_cifar(archive: Path, root: Path) -> list[Path]:
    """Extracts only the expected regular-file members of the CIFAR-10 binary archive, atomically each."""
    out = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in _CIFAR_ARCHIVE_MEMBERS:
                m = members.get(name)
                if m is None or not m.isfile():
                    raise DataError(f"{archive}: has no regular file {name}; not the CIFAR-10 binary archive")
                f = tar.extractfile(m)
                assert f is not None
                dest = root / name
                atomic_write_bytes(dest, f.read())
                out.append(dest)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive}: cannot extract ({e})") from None
    return out


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = 60.0,
    sha256: Mapping[str, str] | None = None,
) -> list[Path]:
    """Downloads the published files of a dataset into the cache, SHA-256 verified.

    Files already present with the right digest are not fetched again. CIFAR-10 comes
    as the binary archive, whose six batch files are extracted into
    ``<cache>/cifar-10-batches-bin/`` (the archive is kept next to them).

    Args:
      name: a dataset name (subsets download their base: ``mnist01`` -> ``mnist``).
        ``digits01`` is bundled with scikit-learn: nothing to download (returns ``[]``).
      cache_dir: where to put the files; default :func:`user_cache_dir` (searched by ``load``).
      base_url: a mirror serving the same file names (default: the publisher's URL).
      timeout: seconds per network operation.
      sha256: per-file-name digests replacing the published ones, for a mirror that
        serves other bytes; files are still verified against these.

    Returns:
      The paths of the dataset's files in the cache.

    Raises:
      ConfigError: unknown name. ChecksumError: a digest mismatch (no file left behind).
      DataError: network or archive failure.

    Examples:
      From a local mirror (a ``file://`` URL) serving four small stand-in files, verified
      against the digests given for them:

      >>> import hashlib, os, tempfile
      >>> from eos_jax.data.sources import PUBLISHED, download
      >>> mirror, cache = tempfile.mkdtemp(), tempfile.mkdtemp()
      >>> digests = {}
      >>> for r in PUBLISHED["mnist"]:
      ...     with open(os.path.join(mirror, r.filename), "wb") as f:
      ...         _ = f.write(r.filename.encode())
      ...     digests[r.filename] = hashlib.sha256(r.filename.encode()).hexdigest()
      >>> paths = download("mnist01", cache_dir=cache, base_url="file://" + mirror, sha256=digests)
      >>> [os.path.relpath(p, cache) for p in paths][:2]
      ['mnist/train-images-idx3-ubyte.gz', 'mnist/train-labels-idx1-ubyte.gz']
      >>> download("digits01")  # bundled with scikit-learn: nothing to fetch
      []
    """
    base = base_of(name)
    if base is None:
        return []
    root = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()
    target = root / _DOWNLOAD_SUBDIR[base]
    digests = dict(sha256 or {})
    out: list[Path] = []
    for res in PUBLISHED[base]:
        digest = digests.get(res.filename, res.sha256)
        size = res.size if res.filename not in digests else None
        url = (base_url.rstrip("/") + "/" if base_url else res.base_url) + res.filename
        dest = target / res.filename
        if base == "cifar10":
            extracted = [root / m for m in _CIFAR_ARCHIVE_MEMBERS]
            if all(p.is_file() for p in extracted) and _file_matches(dest, digest):
                out.extend(extracted)
                continue
        if not _file_matches(dest, digest):
            fetch(url, dest, digest, size=size, timeout=timeout)
        out.extend(_extract_cifar(dest, root) if base == "cifar10" else [dest])
    return out


def describe_sources(base: str, split: str, looked: Sequence[str]) -> str:
    """The one-line 'not found' message: where we looked and how to provide the files.

    Examples:
      >>> import os
      >>> from unittest import mock
      >>> from eos_jax.data.sources import describe_sources
      >>> with mock.patch.dict(os.environ, {"EOS_JAX_NO_SYSTEM_DATA": "1"}):
      ...     print(describe_sources("mnist", "train", ["/data/mnist"]))
      no MNIST IDX files (train-images-idx3-ubyte.gz, ...) for split 'train'; looked in: /data/mnist (EOS_JAX_NO_SYSTEM_DATA is set: the user cache and /usr/share/datasets are not searched). Pass data_dir=DIR or set EOS_JAX_DATA=DIR
    """
    names = {
        "mnist": "MNIST IDX files (train-images-idx3-ubyte.gz, ...)",
        "fashion_mnist": "Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...)",
        "cifar10": "CIFAR-10 batches (cifar-10-batches-bin/ or cifar-10-batches-py/)",
    }[base]
    where = f"looked in: {'; '.join(looked)}" if looked else "no directory to look in"
    if system_data_disabled():
        where += f" ({NO_SYSTEM_DATA_ENV} is set: the user cache and {', '.join(SYSTEM_DIRS)} are not searched)"
        remedy = "pass data_dir=DIR or set EOS_JAX_DATA=DIR"
    else:
        remedy = (
            f"put the files in one of these directories, pass data_dir=DIR, set EOS_JAX_DATA=DIR, "
            f"or run eos_jax.data.download({base!r}) to fetch them into {user_cache_dir()}"
        )
    return f"no {names} for split {split!r}; {where}. {remedy[0].upper()}{remedy[1:]}"
