"""Where dataset files are looked for, and how to download the published files.

Search order for the root directories (first match wins), read at call time:

1. the explicit ``data_dir`` argument (``--data-dir`` on the command line);
2. ``$EOS_JAX_DATA``;
3. the user cache ``$XDG_CACHE_HOME/eos_jax`` (default ``~/.cache/eos_jax``), where
   :func:`download` puts files;
4. known system locations: ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist``
   installs ``/usr/share/datasets/fashion-mnist/*-ubyte.gz``).

Layouts accepted under each root (``*`` = raw IDX or ``.gz``):

* MNIST: ``mnist/``, ``MNIST/raw/`` (torchvision), ``MNIST/`` holding
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
* Fashion-MNIST: ``fashion_mnist/``, ``fashion-mnist/`` (Debian), ``FashionMNIST/raw/``
  (torchvision), ``FashionMNIST/``, ``fashion/`` (the zalando repository) with the same names.
* CIFAR-10: ``cifar-10-batches-bin/`` (``data_batch_{1..5}.bin``, ``test_batch.bin``) or
  ``cifar-10-batches-py/`` (``data_batch_{1..5}``, ``test_batch``), also under ``cifar10/``.
  The binary format is preferred when both exist (it needs no unpickling).

A root directory is never read as a dataset directory itself: MNIST and Fashion-MNIST
use the same file names, and guessing would silently load the wrong one.

Published SHA-256 digests below are those listed by tensorflow-datasets
(``tensorflow_datasets/url_checksums/{mnist,fashion_mnist,cifar10}.txt``, cifar10.csv
for the python archive) and agree with Keras and torchvision's prototype datasets.
Debian's Fashion-MNIST files are recompressed (gzip header without the file name,
23 bytes shorter), so their digests are not the published ones; ``Dataset.sha256``
records what was actually read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from eos_jax.errors import ChecksumError, ConfigError, DataError, DataNotFoundError

SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets",)

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
    "cifar10": ("cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
}


class Resource(NamedTuple):
    """One published file: name, default URL directory, SHA-256 and size in bytes."""

    filename: str
    base_url: str
    sha256: str
    size: int


_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

PUBLISHED: dict[str, tuple[Resource, ...]] = {
    "mnist": (
        Resource("train-images-idx3-ubyte.gz", _MNIST_URL, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
        Resource("train-labels-idx1-ubyte.gz", _MNIST_URL, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
        Resource("t10k-images-idx3-ubyte.gz", _MNIST_URL, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
        Resource("t10k-labels-idx1-ubyte.gz", _MNIST_URL, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
    ),
    "fashion_mnist": (
        Resource("train-images-idx3-ubyte.gz", _FASHION_URL, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
        Resource("train-labels-idx1-ubyte.gz", _FASHION_URL, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
        Resource("t10k-images-idx3-ubyte.gz", _FASHION_URL, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
        Resource("t10k-labels-idx1-ubyte.gz", _FASHION_URL, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
    ),
    # The binary archive: it needs no unpickling. (The python archive,
    # cifar-10-python.tar.gz, is 6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce.)
    "cifar10": (
        Resource("cifar-10-binary.tar.gz", _CIFAR_URL, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", 170052171),
    ),
}
# Which published files the dataset directory must hold after download (CIFAR: extracted).
_CIFAR_ARCHIVE_MEMBERS = tuple(f"cifar-10-batches-bin/{n}" for n in CIFAR_BIN_FILES["train"] + CIFAR_BIN_FILES["test"])
_DOWNLOAD_SUBDIR = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "."}


def user_cache_dir() -> Path:
    """The user cache directory: ``$XDG_CACHE_HOME/eos_jax`` or ``~/.cache/eos_jax``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "eos_jax"


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Root directories in search order (explicit, ``$EOS_JAX_DATA``, cache, system), deduplicated."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get("EOS_JAX_DATA")
    if env:
        roots.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
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
    """Every directory, in order, where the files of base dataset ``base`` are looked for."""
    if base not in LAYOUTS:
        raise ConfigError(f"unknown base dataset {base!r}; allowed: {', '.join(sorted(LAYOUTS))}")
    return [root / sub for root in search_roots(data_dir) for sub in LAYOUTS[base]]


def required_files(base: str, directory: Path, split: str) -> list[list[Path]] | None:
    """For each file the split needs, the accepted spellings in ``directory`` (None: unknown layout)."""
    if base in ("mnist", "fashion_mnist"):
        return [[directory / n, directory / (n + ".gz")] for n in IDX_FILES[split]]
    if directory.name == "cifar-10-batches-bin":
        return [[directory / n] for n in CIFAR_BIN_FILES[split]]
    return [[directory / n] for n in CIFAR_PY_FILES[split]]


def find_files(base: str, split: str, data_dir: str | os.PathLike | None = None) -> tuple[list[Path] | None, list[str]]:
    """The first complete set of files for ``base``/``split``, and notes on where it looked.

    Returns:
      ``(files, looked)``: ``files`` is None when nothing complete was found; ``looked``
      lists every directory tried (with the missing files for incomplete ones).
    """
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        # An explicit directory that does not exist is a typo, not a reason to read
        # whatever the cache or the system happens to hold.
        raise DataNotFoundError(f"data_dir {data_dir} is not a directory; pass an existing --data-dir (or data_dir=)")
    looked: list[str] = []
    for d in candidate_dirs(base, data_dir):
        needs = required_files(base, d, split)
        if not d.is_dir():
            looked.append(str(d))
            continue
        found = [next((p for p in options if p.is_file()), None) for options in needs]
        if all(p is not None for p in found):
            return [p for p in found if p is not None], looked
        missing = [options[0].name for options, p in zip(needs, found) if p is None]
        looked.append(f"{d} (incomplete: no {', '.join(missing)})")
    return None, looked


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
                            raise ChecksumError(f"{url}: more than the published {size} bytes; refusing (wrong file or mirror)")
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise DataError(f"download of {url} failed ({e}); fetch it by hand and pass --data-dir or set EOS_JAX_DATA") from None
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256.lower():
            raise ChecksumError(f"{url}: SHA-256 {h.hexdigest()} ({n} bytes) does not match the expected {sha256}; nothing was saved")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def _file_matches(path: Path, sha256: str) -> bool:
    """True iff ``path`` exists and has the given digest."""
    from eos_jax.data.formats import sha256_file

    return path.is_file() and sha256_file(path) == sha256.lower()


def _extract_cifar(archive: Path, root: Path) -> list[Path]:
    """Extracts only the expected regular-file members of the CIFAR-10 binary archive, atomically each."""
    from eos_jax.io import atomic_write_bytes

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
    """
    from eos_jax.data.datasets import base_of

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
    """The one-line 'not found' message: where we looked and how to provide the files."""
    names = {
        "mnist": "MNIST IDX files (train-images-idx3-ubyte.gz, ...)",
        "fashion_mnist": "Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...)",
        "cifar10": "CIFAR-10 batches (cifar-10-batches-bin/ or cifar-10-batches-py/)",
    }[base]
    return (
        f"no {names} for split {split!r}; looked in: {'; '.join(looked)}. "
        f"Put the files in one of these directories, pass --data-dir DIR (or data_dir=), set EOS_JAX_DATA=DIR, "
        f"or run eos_jax.data.download({base!r}) to fetch them into {user_cache_dir()}"
    )
