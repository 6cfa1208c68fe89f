"""Readers for the published file formats of MNIST, Fashion-MNIST and CIFAR-10.

* IDX (http://yann.lecun.com/exdb/mnist/): a 4-byte magic ``00 00 TT NN`` (type code
  ``TT``, ``NN`` dimensions), ``NN`` big-endian uint32 sizes, then the row-major data.
  Read raw or gzip-compressed (detected from the gzip magic, not from the file name).
* CIFAR-10 binary (``cifar-10-batches-bin/*.bin``): records of 1 label byte followed by
  3072 pixel bytes (1024 red, 1024 green, 1024 blue; each plane row-major 32x32).
* CIFAR-10 python (``cifar-10-batches-py/*``): a pickled dict (protocol 2, written by
  Python 2) whose ``data`` is a numpy uint8 array. Read ONLY through
  :class:`RestrictedUnpickler`, which never imports or calls anything from the file:
  every global a pickle names is refused except the three numpy reconstruction
  callables (and ``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes),
  and those are replaced by local stand-ins that validate their arguments and build
  only a plain numeric ``np.ndarray`` from raw bytes.

Every reader checks the header against the data length (truncated or trailing bytes,
wrong counts) and raises :class:`~eos_jax.errors.MalformedDataError` naming the file;
it never returns a silent garbage array.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from eos_jax import io as eio
from eos_jax.errors import MalformedDataError

# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

CIFAR_IMAGE_SHAPE = (32, 32, 3)
_CIFAR_PIXELS = 32 * 32 * 3
_CIFAR_RECORD = 1 + _CIFAR_PIXELS


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks.

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.data.formats import sha256_file
      >>> path = os.path.join(tempfile.mkdtemp(), "abc.txt")
      >>> with open(path, "wb") as f:
      ...     _ = f.write(b"abc")
      >>> sha256_file(path)  # the FIPS 180-2 test vector
      'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_exact(f: Any, n: int, path: Path, what: str) -> bytes:
    """Reads exactly ``n`` bytes or raises MalformedDataError (truncated)."""
    data = f.read(n)
    if len(data) != n:
        raise MalformedDataError(f"{path}: truncated {what} (expected {n} bytes, got {len(data)})")
    return data


def read_idx(
    path: str | os.PathLike, *, expected_ndim: int | None = None, expected_dtype: str | None = None
) -> np.ndarray:
    """Reads an IDX file, raw or gzip-compressed.

    Args:
      path: the file.
      expected_ndim: if given, the number of dimensions the header must declare.
      expected_dtype: if given (e.g. ``"uint8"``), the element type the header must declare.

    Returns:
      The array in native byte order, with the shape from the header.

    Raises:
      MalformedDataError: bad magic, unknown type code, unexpected ndim or dtype,
        truncated data, trailing bytes, or a corrupt gzip stream (names the file).

    Examples:
      >>> import gzip, os, struct, tempfile
      >>> from eos_jax.data.formats import read_idx
      >>> d = tempfile.mkdtemp()
      >>> raw = struct.pack(">BBBBI", 0, 0, 0x08, 1, 3) + bytes([7, 0, 1])  # uint8, 1 dim of size 3
      >>> with open(os.path.join(d, "labels-idx1-ubyte.gz"), "wb") as f:
      ...     _ = f.write(gzip.compress(raw))
      >>> y = read_idx(os.path.join(d, "labels-idx1-ubyte.gz"), expected_ndim=1)
      >>> y.tolist(), y.dtype
      ([7, 0, 1], dtype('uint8'))
      >>> with open(os.path.join(d, "short"), "wb") as f:
      ...     _ = f.write(raw[:-1])
      >>> read_idx(os.path.join(d, "short"))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.MalformedDataError: .../short: truncated IDX data for shape (3,) (expected 3 bytes, got 2)
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            f: Any = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            magic = _read_exact(f, 4, path, "IDX header")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise MalformedDataError(
                    f"{path}: bad IDX magic {magic.hex()} (expected 0000TTNN with type TT in 08,09,0b,0c,0d,0e)"
                )
            dtype = _IDX_DTYPES[magic[2]]
            ndim = magic[3]
            if expected_ndim is not None and ndim != expected_ndim:
                raise MalformedDataError(f"{path}: IDX header declares {ndim} dimensions, expected {expected_ndim}")
            if expected_dtype is not None and dtype.newbyteorder("=") != np.dtype(expected_dtype):
                raise MalformedDataError(f"{path}: IDX element type {dtype.name}, expected {expected_dtype}")
            shape = tuple(int(d) for d in np.frombuffer(_read_exact(f, 4 * ndim, path, "IDX sizes"), dtype=">u4"))
            nbytes = math.prod(shape) * dtype.itemsize
            # Read exactly the declared size: a lying header cannot make us allocate more
            # than the file holds, and a short file is an error, never a padded array.
            data = _read_exact(f, nbytes, path, f"IDX data for shape {shape}")
            if f.read(1):
                raise MalformedDataError(f"{path}: trailing bytes after the IDX data of shape {shape}")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise MalformedDataError(f"{path}: corrupt gzip stream ({e})") from None
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def check_labels(labels: np.ndarray, num_classes: int, path: str | os.PathLike) -> np.ndarray:
    """Returns ``labels`` as int32 after checking they lie in ``[0, num_classes)``.

    Examples:
      >>> import numpy as np
      >>> from eos_jax.data.formats import check_labels
      >>> check_labels(np.array([0, 1, 1], np.uint8), 2, "y.idx").dtype
      dtype('int32')
      >>> check_labels(np.array([0, 2], np.uint8), 2, "y.idx")
      Traceback (most recent call last):
      ...
      eos_jax.errors.MalformedDataError: y.idx: labels out of range [0, 2], expected 0..1
    """
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise MalformedDataError(
            f"{path}: labels out of range [{int(labels.min())}, {int(labels.max())}], expected 0..{num_classes - 1}"
        )
    return labels.astype(np.int32)


def write_idx(path: str | os.PathLike, arr: Any) -> Path:
    """Writes ``arr`` as an IDX file (MNIST's format), gzip-compressed when ``path`` ends in ``.gz``.

    The inverse of :func:`read_idx` for the IDX types (uint8, int8, int16, int32, float32,
    float64; big-endian, C order). Parent directories are created; the file appears whole or
    not at all (:func:`eos_jax.io.atomic_open`).

    Raises:
      ValueError: a dtype IDX has no code for.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import read_idx, write_idx
      >>> path = write_idx(os.path.join(tempfile.mkdtemp(), "mnist", "t10k-labels-idx1-ubyte"), np.uint8([7, 2, 1]))
      >>> read_idx(path).tolist(), open(path, "rb").read(4)  # magic: 0, 0, type 0x08, 1 dimension
      ([7, 2, 1], b'\\x00\\x00\\x08\\x01')
    """
    arr = np.asarray(arr)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"write_idx: dtype {arr.dtype} has no IDX type code; allowed: uint8, int8, int16, int32, float32, float64"
        )
    head = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    raw = head + np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eio.atomic_open(path, "wb") as f:
        f.write(raw)
    return path


def read_idx_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Reads an MNIST-style (images, labels) pair: uint8 (N, H, W) and labels (N,) int32.

    Examples:
      >>> import os, struct, tempfile
      >>> from eos_jax.data.formats import read_idx_pair
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "x"), "wb") as f:  # two 2x2 uint8 images
      ...     _ = f.write(struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2, 2, 2) + bytes(range(8)))
      >>> with open(os.path.join(d, "y"), "wb") as f:
      ...     _ = f.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, 2) + bytes([1, 0]))
      >>> x, y = read_idx_pair(os.path.join(d, "x"), os.path.join(d, "y"), num_classes=2)
      >>> x.shape, x[1].tolist(), y.tolist(), y.dtype
      ((2, 2, 2), [[4, 5], [6, 7]], [1, 0], dtype('int32'))
    """
    images = read_idx(images_path, expected_ndim=3, expected_dtype="uint8")
    labels = read_idx(labels_path, expected_ndim=1, expected_dtype="uint8")
    if images.shape[0] != labels.shape[0]:
        raise MalformedDataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    return images, check_labels(labels, num_classes, labels_path)


def read_cifar_binary(path: str | os.PathLike, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 binary batch.

    Returns:
      ``(images, labels)``: uint8 (N, 32, 32, 3) NHWC and int32 (N,).

    Raises:
      MalformedDataError: the size is not a positive multiple of 3073 bytes, or a label
        is out of range (names the file).

    Examples:
      >>> import os, tempfile
      >>> from eos_jax.data.formats import read_cifar_binary
      >>> path = os.path.join(tempfile.mkdtemp(), "data_batch_1.bin")
      >>> red = bytes([255] * 1024)  # one record: label 3, a pure red image (R, G, B planes)
      >>> with open(path, "wb") as f:
      ...     _ = f.write(bytes([3]) + red + bytes(1024) + bytes(1024))
      >>> x, y = read_cifar_binary(path)
      >>> x.shape, x[0, 0, 0].tolist(), y.tolist()
      ((1, 32, 32, 3), [255, 0, 0], [3])
    """
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise MalformedDataError(
            f"{path}: {len(raw)} bytes is not a positive multiple of the {_CIFAR_RECORD}-byte CIFAR-10 record"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = check_labels(records[:, 0], num_classes, path)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels


# ----------------------------------------------------------------------------------------
# Restricted unpickling (CIFAR-10 python format).

_NUMERIC_KINDS = frozenset("biuf")  # bool, signed, unsigned, float: no objects, no strings


class _NDArrayClass:
    """Stand-in for the global ``numpy.ndarray``; only usable as ``_reconstruct``'s argument."""

    def __repr__(self) -> str:
        return "<numpy.ndarray placeholder>"


_NDARRAY = _NDArrayClass()


class _DType:
    """A numeric numpy dtype rebuilt from a pickle, validated on construction and on state."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str) or len(spec) > 4:
            raise pickle.UnpicklingError(f"refused dtype spec {spec!r}")
        try:
            dt = np.dtype(spec)
        except TypeError:
            raise pickle.UnpicklingError(f"refused dtype spec {spec!r}") from None
        if dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise pickle.UnpicklingError(f"refused non-numeric dtype {spec!r}")
        self.dtype = dt

    def __setstate__(self, state: Any) -> None:
        # numpy writes (version, byteorder, subdescr, names, fields, elsize, alignment, flags);
        # we accept only the plain numeric form and apply the byte order.
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[2:5] != (None, None, None):
            raise pickle.UnpicklingError(f"refused dtype state {state!r}")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"refused dtype byte order {order!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayStub:
    """What ``_reconstruct`` returns; its ``__setstate__`` builds ``self.array`` from raw bytes."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("refused ndarray state (expected a 5-tuple)")
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType):
            raise pickle.UnpicklingError("refused ndarray state: dtype is not a numeric numpy dtype")
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise pickle.UnpicklingError(f"refused ndarray shape {shape!r}")
        if isinstance(raw, str):  # Python 2 str decoded with encoding="latin1"
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("refused ndarray data (not raw bytes)")
        if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
            raise pickle.UnpicklingError(
                f"ndarray data has {len(raw)} bytes, shape {shape} needs {math.prod(shape) * dtype.dtype.itemsize}"
            )
        arr = np.frombuffer(bytes(raw), dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C")
        self.array = np.array(arr, dtype=dtype.dtype.newbyteorder("="), order="C")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``."""
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError(f"refused _reconstruct arguments ({cls!r}, {shape!r}, {typecode!r})")
    return _ArrayStub()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode(str, "latin1")`` (how protocol-2 pickles spell bytes)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, tuples, strings, bytes, numbers and numeric arrays.

    ``find_class`` never imports anything: it maps the few numpy/codecs globals that
    ndarray pickles use to local validating stand-ins and refuses every other global
    (``os.system``, ``builtins.eval``, any class), so loading a hostile file cannot run
    code. Persistent ids are refused too (the base class raises on them).

    Examples:
      >>> import io, pickle
      >>> from eos_jax.data.formats import RestrictedUnpickler
      >>> RestrictedUnpickler(io.BytesIO(pickle.dumps({"labels": [1, 2], "name": "batch"}))).load()
      {'labels': [1, 2], 'name': 'batch'}
      >>> RestrictedUnpickler(io.BytesIO(pickle.dumps(print))).load()
      Traceback (most recent call last):
      ...
      _pickle.UnpicklingError: refused global builtins.print
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _finish(obj: Any) -> Any:
    """Replaces array stubs by their arrays and bytes dict keys by str, recursively."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError("ndarray without state")
        return obj.array
    if isinstance(obj, (_DType, _NDArrayClass)) or callable(obj):
        raise pickle.UnpicklingError(f"refused {type(obj).__name__} outside an ndarray")
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _finish(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finish(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finish(v) for v in obj)
    return obj


def restricted_loads(data: bytes, *, source: str | os.PathLike = "<bytes>") -> Any:
    """Unpickles ``data`` with :class:`RestrictedUnpickler`; any failure is a MalformedDataError.

    Examples:
      >>> import os, pickle
      >>> import numpy as np
      >>> from eos_jax.data.formats import restricted_loads
      >>> obj = restricted_loads(pickle.dumps({"data": np.arange(3, dtype=np.uint8)}, protocol=2))
      >>> obj["data"].tolist(), obj["data"].dtype
      ([0, 1, 2], dtype('uint8'))
      >>> restricted_loads(pickle.dumps(os.system), source="evil.pkl")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      eos_jax.errors.MalformedDataError: evil.pkl: not a safe CIFAR-10 python pickle (UnpicklingError: refused global ...system)
    """
    try:
        # encoding="latin1": Python 2 str objects (the CIFAR raw pixel data) come back as
        # str with one code point per byte, converted back to bytes losslessly.
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
        return _finish(obj)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        RecursionError,
        OverflowError,
    ) as e:
        raise MalformedDataError(f"{source}: not a safe CIFAR-10 python pickle ({type(e).__name__}: {e})") from None


def read_cifar_python(path: str | os.PathLike, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch through the restricted unpickler.

    Returns:
      ``(images, labels)``: uint8 (N, 32, 32, 3) NHWC and int32 (N,).

    Raises:
      MalformedDataError: the pickle names a refused global, is not a dict with a uint8
        ``data`` array of shape (N, 3072) and ``labels`` list of N ints in range, or is
        truncated (names the file).

    Examples:
      >>> import os, pickle, tempfile
      >>> import numpy as np
      >>> from eos_jax.data.formats import read_cifar_python
      >>> path = os.path.join(tempfile.mkdtemp(), "data_batch_1")
      >>> batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [3, 9]}
      >>> with open(path, "wb") as f:
      ...     pickle.dump(batch, f, protocol=2)
      >>> x, y = read_cifar_python(path)
      >>> x.shape, x.dtype, y.tolist()
      ((2, 32, 32, 3), dtype('uint8'), [3, 9])
    """
    path = Path(path)
    batch = restricted_loads(path.read_bytes(), source=path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise MalformedDataError(f"{path}: expected a dict with 'data' and 'labels'")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MalformedDataError(f"{path}: 'data' is {desc}, expected a uint8 array of shape (N, {_CIFAR_PIXELS})")
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise MalformedDataError(f"{path}: 'labels' is not a list of ints")
    if len(labels) != data.shape[0]:
        raise MalformedDataError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    y = check_labels(np.asarray(labels, dtype=np.int64), num_classes, path)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, y
