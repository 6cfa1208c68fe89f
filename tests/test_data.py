"""Tests of eos_jax.data on small synthetic files written in the published formats.

The writers here are independent of the library (struct / pickle / gzip / tarfile), so
every reader is checked by a round trip; nothing touches the internet.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_equal_bits

from eos_jax import data
from eos_jax.data import sources
from eos_jax.errors import ChecksumError, ConfigError, DataError, DataNotFoundError, MalformedDataError

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ independent writers


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of an array (type code from its dtype)."""
    code = {
        np.dtype("uint8"): 0x08,
        np.dtype("int8"): 0x09,
        np.dtype("int16"): 0x0B,
        np.dtype("int32"): 0x0C,
        np.dtype("float32"): 0x0D,
        np.dtype("float64"): 0x0E,
    }[arr.dtype]
    head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist_dir(d: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 1) -> dict:
    """MNIST-layout IDX files in ``d``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        write_idx(d / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random CIFAR images in the file layout (N, 3, 32, 32) and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


def write_cifar_bin(path: Path, x_nchw: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = np.concatenate([y[:, None], x_nchw.reshape(len(y), -1)], axis=1)
    path.write_bytes(rec.astype(np.uint8).tobytes())


def write_cifar_py3(path: Path, x_nchw: np.ndarray, y: np.ndarray) -> None:
    """A python-format batch pickled by Python 3 with protocol 2 (bytes keys, numpy data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {
        b"batch_label": b"synthetic",
        b"labels": [int(v) for v in y],
        b"data": x_nchw.reshape(len(y), -1),
        b"filenames": [b"img%d.png" % i for i in range(len(y))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def py2_cifar_pickle(x_nchw: np.ndarray, y: np.ndarray) -> bytes:
    """A batch pickled as Python 2's cPickle did (str opcodes, numpy.core.multiarray), by hand."""

    def s(b: bytes) -> bytes:  # py2 str: SHORT_BINSTRING or BINSTRING
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)

    n = len(y)
    raw = x_nchw.reshape(n, -1).tobytes()
    arr = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + s(b"b")
        + b"\x87R"
        + b"(K\x01"
        + b"M"
        + struct.pack("<H", n)
        + b"M"
        + struct.pack("<H", 3072)
        + b"\x86"
        + b"cnumpy\ndtype\n"
        + s(b"u1")
        + b"K\x00K\x01\x87R"
        + b"(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89"
        + s(raw)
        + b"tb"
    )
    labels = b"](" + b"".join(b"K" + bytes([int(v)]) for v in y) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + labels + s(b"batch_label") + s(b"py2") + b"u."


def nhwc(x_nchw: np.ndarray) -> np.ndarray:
    return x_nchw.transpose(0, 2, 3, 1)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No EOS_JAX_DATA, an empty cache and no system directories: only what a test writes is found."""
    monkeypatch.delenv("EOS_JAX_DATA", raising=False)
    monkeypatch.delenv("EOS_JAX_NO_SYSTEM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", ())
    return tmp_path


# ------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64"])
def test_idx_round_trip(tmp_path, gz, dtype):
    arr = (RNG.standard_normal((3, 4, 5)) * 100).astype(dtype)
    p = write_idx(tmp_path / "a-idx3", arr, gz)
    back = data.read_idx(p)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    assert_tree_equal_bits(back, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_malformed_files_name_the_file(tmp_path, gz):
    good = idx_bytes(np.zeros((2, 3, 3), np.uint8))
    cases = {
        "badmagic": b"\x01\x02" + good[2:],
        "badtype": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "shortheader": good[:6],
    }
    for name, raw in cases.items():
        p = tmp_path / name
        p.write_bytes(gzip.compress(raw) if gz else raw)
        with pytest.raises(MalformedDataError, match=str(p)):
            data.read_idx(p)
    if gz:  # a cut gzip stream
        p = tmp_path / "cutgz"
        p.write_bytes(gzip.compress(good)[:-12])
        with pytest.raises(MalformedDataError, match="cutgz"):
            data.read_idx(p)
    p = tmp_path / "ndim"
    p.write_bytes(good)
    with pytest.raises(MalformedDataError, match="3 dimensions, expected 1"):
        data.read_idx(p, expected_ndim=1)


def test_idx_pair_checks_counts_and_label_range(tmp_path):
    x = np.zeros((4, 28, 28), np.uint8)
    xi = write_idx(tmp_path / "x", x, False)
    y3 = write_idx(tmp_path / "y3", np.zeros(3, np.uint8), False)
    with pytest.raises(MalformedDataError, match="4 images but .* 3 labels"):
        data.read_idx_pair(xi, y3)
    ybad = write_idx(tmp_path / "ybad", np.array([0, 1, 10, 2], np.uint8), False)
    with pytest.raises(MalformedDataError, match="ybad.*out of range"):
        data.read_idx_pair(xi, ybad)


@pytest.mark.parametrize("layout,gz", [("mnist", True), ("MNIST/raw", False)])
def test_load_mnist_layouts_scaling_and_subset(isolated, layout, gz):
    written = write_mnist_dir(isolated / "root" / layout, gz=gz)
    for split in ("train", "test"):
        x, y = written[split]
        ds = data.load("mnist", split, data_dir=isolated / "root")
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32 and ds.x.shape == (len(y), 28, 28, 1)
        # Scaling is one float32 division per pixel, bitwise.
        assert_tree_equal_bits(ds.x, (x.astype(np.float32) / np.float32(255))[..., None])
        assert_tree_equal_bits(ds.y, y.astype(np.int32))
        assert ds.num_classes == 10 and ds.split == split and len(ds.source) == 2
        assert ds.sha256 == tuple(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in ds.source)
        sub = data.load("mnist01", split, data_dir=isolated / "root")
        keep = y < 2
        assert sub.num_classes == 2 and sub.name == "mnist01"
        assert_tree_equal_bits(sub.y, y[keep].astype(np.int32))  # order kept
        assert_tree_equal_bits(sub.x, ds.x[keep])


def test_fashion_from_env_var_read_at_call_time(isolated, monkeypatch):
    written = write_mnist_dir(isolated / "env" / "fashion-mnist", seed=5)
    with pytest.raises(ConfigError, match="nothing does not exist"):  # a named directory: honoured or refused
        data.load("fashion_mnist01", data_dir=isolated / "nothing")
    with pytest.raises(ConfigError, match="nothing does not exist"):  # never a fallback past it
        data.load_first_available(["fashion_mnist01", "fashion_mnist01_bundled"], data_dir=isolated / "nothing")
    (isolated / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile is not a directory"):
        data.load("fashion_mnist01_bundled", data_dir=isolated / "afile")
    with pytest.raises(DataNotFoundError, match="no Fashion-MNIST"):
        data.load("fashion_mnist01")
    monkeypatch.setenv("EOS_JAX_DATA", str(isolated / "env"))
    ds = data.load("fashion_mnist01", "train")
    x, y = written["train"]
    assert_tree_equal_bits(ds.y, y[y < 2].astype(np.int32))
    # MNIST file names are the same, but a fashion directory is never read as MNIST.
    with pytest.raises(DataNotFoundError):
        data.load("mnist")


def test_search_order_explicit_then_env_then_cache(isolated, monkeypatch):
    a = write_mnist_dir(isolated / "explicit" / "mnist", seed=11)
    b = write_mnist_dir(isolated / "env" / "mnist", seed=12)
    c = write_mnist_dir(isolated / "xdg" / "eos_jax" / "mnist", seed=13)
    monkeypatch.setenv("EOS_JAX_DATA", str(isolated / "env"))
    got = lambda **kw: data.load("mnist", "test", **kw).x  # noqa: E731
    assert_tree_equal_bits(got(data_dir=isolated / "explicit")[..., 0] * 255, a["test"][0].astype(np.float32))
    assert_tree_equal_bits(got()[..., 0] * 255, b["test"][0].astype(np.float32))
    monkeypatch.delenv("EOS_JAX_DATA")
    assert_tree_equal_bits(got()[..., 0] * 255, c["test"][0].astype(np.float32))
    paths = data.search_paths("mnist", isolated / "explicit")
    assert paths[0] == isolated / "explicit" / "mnist" and isolated / "xdg" / "eos_jax" / "mnist" in paths


def test_not_found_is_one_line_listing_places_and_remedies(isolated):
    (isolated / "d" / "mnist").mkdir(parents=True)
    write_idx(isolated / "d" / "mnist" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), True)
    with pytest.raises(DataNotFoundError) as e:
        data.load("mnist01", data_dir=isolated / "d")
    msg = str(e.value)
    assert "\n" not in msg
    for part in (
        str(isolated / "d" / "mnist"),
        "incomplete: no train-labels-idx1-ubyte",
        str(isolated / "xdg" / "eos_jax" / "MNIST" / "raw"),
        "EOS_JAX_DATA",
        "data_dir=DIR",
        "download('mnist')",
    ):
        assert part in msg, part


def test_unknown_name_or_split(isolated):
    with pytest.raises(ConfigError, match="unknown dataset 'mnist02'.*mnist01"):
        data.load("mnist02")
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        data.load("mnist", "val")


# ------------------------------------------------------------------ bundled Fashion-MNIST 0/1, loose files, fresh machine

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
HAVE_DEBIAN_FASHION = all((DEBIAN_FASHION / (n + ".gz")).is_file() for n in sources.FASHION_IDX_SHA256)
needs_debian = pytest.mark.skipif(
    not HAVE_DEBIAN_FASHION,
    reason="needs the published Fashion-MNIST files of Debian's "
    "dataset-fashion-mnist in /usr/share/datasets/fashion-mnist (absent on CI)",
)
BUNDLED_NAME = "fashion_mnist01_bundled"
REPO = Path(__file__).resolve().parent.parent


def _parse_u8_idx(raw: bytes, ndim: int) -> np.ndarray:
    """An independent IDX parser for the tests: magic 0x0000080N, N big-endian sizes, uint8 data."""
    assert raw[:4] == bytes([0, 0, 8, ndim])
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    assert len(body) == int(np.prod(shape))
    return np.frombuffer(body, np.uint8).reshape(shape)


def test_bundled_files_digests_shapes_and_labels():
    spec = sources.BUNDLED[BUNDLED_NAME]
    d = sources.bundled_dir(BUNDLED_NAME)
    total = 0
    for split, n in (("train", 2000), ("test", 500)):
        assert spec.counts[split] == n
        img_f, lab_f = spec.files[split]
        raw_x, raw_y = (d / img_f.filename).read_bytes(), (d / lab_f.filename).read_bytes()
        assert hashlib.sha256(raw_x).hexdigest() == img_f.sha256 and len(raw_x) == img_f.size
        assert hashlib.sha256(raw_y).hexdigest() == lab_f.sha256 and len(raw_y) == lab_f.size
        total += len(raw_x) + len(raw_y)
        x, y = _parse_u8_idx(raw_x, 3), _parse_u8_idx(raw_y, 1)
        assert x.shape == (n, 28, 28) and y.shape == (n,) and set(np.unique(y)) == {0, 1}
        # Both classes are well represented (T-shirt/top 953 / trouser 1047 train, 248 / 252 test).
        assert min(np.bincount(y)) > 0.45 * n
        ds = data.load(BUNDLED_NAME, split)
        assert ds.name == BUNDLED_NAME and ds.num_classes == 2 and ds.split == split and len(ds) == n
        assert_tree_equal_bits((ds.x, ds.y), ((x.astype(np.float32) / np.float32(255))[..., None], y.astype(np.int32)))
        assert ds.sha256 == (img_f.sha256, lab_f.sha256) and ds.source == (
            str(d / img_f.filename),
            str(d / lab_f.filename),
        )
    assert total == 1_962_548 < 2_000_000
    assert data.search_paths(BUNDLED_NAME) == [d] and data.download(BUNDLED_NAME) == []


def test_bundled_package_data_is_declared_for_wheels():
    """pyproject's package-data covers the four files (a non-editable install must carry them)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = conf["tool"]["setuptools"]["package-data"]["eos_jax.data"]
    d = sources.bundled_dir(BUNDLED_NAME)
    rel = [str(p.relative_to(REPO / "eos_jax" / "data")) for p in sorted(d.iterdir())]
    assert len(rel) == 4 and all(any(fnmatch.fnmatch(r, pat) for pat in patterns) for r in rel), (rel, patterns)
    assert "Zalando SE" in (REPO / "NOTICE").read_text() and "MIT" in (REPO / "NOTICE").read_text()


@needs_debian
def test_bundled_is_a_prefix_of_fashion_mnist01(isolated, monkeypatch):
    """Same images, order, labels and float32 pixels as the first examples of the full fashion_mnist01."""
    monkeypatch.setattr(sources, "SYSTEM_DIRS", ("/usr/share/datasets",))
    for split, n in (("train", 2000), ("test", 500)):
        full = data.load("fashion_mnist01", split)
        assert full.source[0].startswith(str(DEBIAN_FASHION))
        b = data.load(BUNDLED_NAME, split)
        assert_tree_equal_bits((b.x, b.y), (full.x[:n], full.y[:n]))


def test_tampered_or_missing_bundled_file(tmp_path, monkeypatch):
    """A changed bundled file is an error naming it (never a silent fallback); a missing one falls back visibly."""
    import shutil

    copy = tmp_path / "bundled"
    shutil.copytree(sources.BUNDLED_ROOT, copy)
    monkeypatch.setattr(sources, "BUNDLED_ROOT", copy)
    assert len(data.load(BUNDLED_NAME, "train")) == 2000  # the copy itself is fine
    f = copy / "fashion_mnist01" / "train-images-idx3-ubyte"
    raw = bytearray(f.read_bytes())
    raw[5000] ^= 1  # one pixel, one bit
    f.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError) as e:
        data.load(BUNDLED_NAME, "train")
    msg = str(e.value)
    assert str(f) in msg and "\n" not in msg and sources.BUNDLED[BUNDLED_NAME].files["train"][0].sha256 in msg
    with pytest.raises(ChecksumError):
        data.load_first_available([BUNDLED_NAME, "digits01"])
    assert len(data.load(BUNDLED_NAME, "test")) == 500  # the test split's files are untouched
    f.unlink()
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        data.load(BUNDLED_NAME, "train")
    ds, skipped = data.load_first_available([BUNDLED_NAME, "digits01"])
    assert ds.name == "digits01" and skipped[0][0] == BUNDLED_NAME


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bundled_data", REPO / "scripts" / "make_bundled_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_debian
def test_make_bundled_data_check_reproduces_the_files_bit_for_bit(tmp_path, capsys):
    import shutil

    script = _script()
    assert script.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "equal the regenerated ones bit for bit" in out and out.count("SHA-256 ok (as Debian ships it)") == 4
    assert out.count("SHA-256 ok (published IDX content)") == 4
    # --check sees a one-byte change in a copy.
    copy = tmp_path / "copy"
    shutil.copytree(sources.bundled_dir(BUNDLED_NAME), copy)
    f = copy / "t10k-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:-1] + bytes([1 - f.read_bytes()[-1]]))
    assert script.main(["--check", "--out", str(copy)]) == 1
    assert "t10k-labels-idx1-ubyte: differs" in capsys.readouterr().err
    # Written files equal the committed ones (and are world-readable package data).
    assert script.main(["--out", str(tmp_path / "new")]) == 0
    for p in sources.bundled_dir(BUNDLED_NAME).iterdir():
        assert (tmp_path / "new" / p.name).read_bytes() == p.read_bytes()
        assert (tmp_path / "new" / p.name).stat().st_mode & 0o444 == 0o444


def test_make_bundled_data_refuses_unknown_sources(tmp_path, capsys):
    """Source files whose digests are not the published (or Debian's) ones are refused, nothing written."""
    script = _script()
    src = tmp_path / "src"
    write_mnist_dir(src, gz=True)
    assert script.main(["--source", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither the published" in err and "train-images-idx3-ubyte.gz" in err
    write_mnist_dir(src, gz=False)
    for p in src.glob("*.gz"):
        p.unlink()
    assert script.main(["--source", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "is not the published Fashion-MNIST content" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert script.main(["--source", str(tmp_path / "none")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def _fingerprinted(base: str, split: str, n: int, seed: int) -> np.ndarray:
    """Labels whose first ten are those of the published ``base`` file, then random."""
    head = np.asarray(sources.LABEL_FINGERPRINTS[(base, split)], np.uint8)
    return np.concatenate([head, np.random.default_rng(seed).integers(0, 10, n - head.size).astype(np.uint8)])


def write_loose(d: Path, base: str | None, gz: bool = True, seed: int = 0, n: int = 30) -> dict:
    """Tiny IDX files in the published format directly in ``d``; labels fingerprinted as ``base``
    (None: labels that identify nothing). Returns the arrays written."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = _fingerprinted(base, split, n, seed) if base else ((np.arange(n) * 7 + 3) % 10).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def test_fingerprints_and_digests_are_distinct():
    fps = list(sources.LABEL_FINGERPRINTS.values())
    assert len(set(fps)) == 4 and all(len(f) == 10 for f in fps)
    digests = [d for d, _ in sources.DEBIAN_FASHION_GZ.values()] + [d for d, _ in sources.FASHION_IDX_SHA256.values()]
    digests += [r.sha256 for b in ("mnist", "fashion_mnist") for r in sources.PUBLISHED[b]]
    assert len(set(digests)) == 16


@needs_debian
def test_fashion_fingerprints_match_the_published_files():
    for split, prefix in (("train", "train"), ("test", "t10k")):
        y = data.read_idx(DEBIAN_FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        assert tuple(int(v) for v in y[:10]) == sources.LABEL_FINGERPRINTS[("fashion_mnist", split)]


@pytest.mark.parametrize("base,other", [("fashion_mnist", "mnist"), ("mnist", "fashion_mnist")])
@pytest.mark.parametrize("gz", [True, False])
def test_loose_files_in_data_dir_are_used_and_identified(isolated, monkeypatch, base, other, gz):
    """Published-format files put directly in --data-dir are used, not passed over for a system copy."""
    system = isolated / "system"
    write_mnist_dir(system / ("fashion-mnist" if base == "fashion_mnist" else "mnist"), seed=3)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (str(system),))
    dd = isolated / "dd"
    written = write_loose(dd, base, gz=gz, seed=4)
    loose = data.identify_loose(dd)
    assert loose.base == base and not loose.conflict and len(loose.files) == 4
    name01 = base + "01"
    for split in ("train", "test"):
        ds = data.load(name01, split, data_dir=dd)
        assert all(Path(s).parent == dd for s in ds.source)
        x, y = written[split]
        assert_tree_equal_bits(ds.y, y[y < 2].astype(np.int32))
        assert_tree_equal_bits(ds.x[..., 0], x[y < 2].astype(np.float32) / np.float32(255))
    # Asked for the other dataset, the loose files are passed over with a note, never read as it.
    with pytest.raises(DataNotFoundError) as e:
        data.load(other + "01", data_dir=dd)
    assert f"{dd} (its loose IDX files are {sources.BASE_TITLES[base]}" in str(e.value)
    # A subfolder of --data-dir comes first.
    sub = write_mnist_dir(dd / ("fashion_mnist" if base == "fashion_mnist" else "mnist"), seed=8)
    assert_tree_equal_bits(data.load(base, "test", data_dir=dd).y, sub["test"][1].astype(np.int32))


def test_loose_files_identified_by_digest(isolated, monkeypatch):
    """A file with a known SHA-256 identifies the directory even when its labels match no fingerprint."""
    dd = isolated / "dd"
    write_loose(dd, None, gz=False)
    with pytest.raises(DataError):
        data.load("fashion_mnist01", data_dir=dd)
    f = dd / "train-labels-idx1-ubyte"
    table = dict(sources.FASHION_IDX_SHA256)
    table[f.name] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size)
    monkeypatch.setattr(sources, "FASHION_IDX_SHA256", table)
    loose = data.identify_loose(dd)
    assert loose.base == "fashion_mnist" and loose.evidence == ("train-labels-idx1-ubyte: known Fashion-MNIST SHA-256",)
    assert len(data.load("fashion_mnist01", data_dir=dd)) == int(
        (write_loose(isolated / "again", None, gz=False)["train"][1] < 2).sum()
    )


@needs_debian
def test_debian_files_copied_into_data_dir_are_identified(isolated):
    dd = isolated / "dd"
    dd.mkdir()
    for name in sources.DEBIAN_FASHION_GZ:
        (dd / name).symlink_to(DEBIAN_FASHION / name)
    loose = data.identify_loose(dd)
    assert loose.base == "fashion_mnist" and len(loose.evidence) == 4 + 2  # 4 digests, 2 label fingerprints
    assert len(data.load("fashion_mnist01", "test", data_dir=dd)) == 2000


def test_unidentifiable_or_conflicting_loose_files_are_refused(isolated, monkeypatch):
    system = isolated / "system"
    write_mnist_dir(system / "fashion-mnist", seed=3)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (str(system),))
    dd = isolated / "dd"
    write_loose(dd, None)
    for name in ("fashion_mnist01", "mnist"):
        with pytest.raises(DataError) as e:
            data.load(name, data_dir=dd)
        msg = str(e.value)
        assert not isinstance(e.value, DataNotFoundError)  # no fallback past the user's directory
        assert "\n" not in msg and f"{dd / 'mnist'}/" in msg and f"{dd / 'fashion_mnist'}/" in msg
        assert "neither a published SHA-256 nor the first labels" in msg
    with pytest.raises(DataError, match="put them in"):
        data.load_first_available(["mnist01", "fashion_mnist01", BUNDLED_NAME], data_dir=dd)
    # Train files of MNIST next to test files of Fashion-MNIST: refused too.
    write_idx(dd / "train-labels-idx1-ubyte", _fingerprinted("mnist", "train", 30, 0), True)
    write_idx(dd / "t10k-labels-idx1-ubyte", _fingerprinted("fashion_mnist", "test", 30, 0), True)
    with pytest.raises(DataError, match="they disagree"):
        data.load("mnist01", data_dir=dd)
    # Without --data-dir the same files elsewhere are simply not a root's dataset.
    assert data.load("fashion_mnist01").source[0].startswith(str(system))


def test_no_system_data_env_emulates_a_fresh_machine(isolated, monkeypatch):
    """EOS_JAX_NO_SYSTEM_DATA=1 (read at call time) switches off the cache and the system
    directories; the default cnn chain then lands on the bundled subset."""
    from experiments.eos import DEFAULT_DATASETS

    chain = DEFAULT_DATASETS["cnn"]
    assert chain == ("mnist01", "fashion_mnist01", BUNDLED_NAME, "digits01")
    assert DEFAULT_DATASETS["fc"][-2:] == (BUNDLED_NAME, "digits01")
    system = isolated / "system"
    write_mnist_dir(system / "fashion-mnist", seed=3)
    write_mnist_dir(isolated / "xdg" / "eos_jax" / "mnist", seed=2)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (str(system),))
    ds, skipped = data.load_first_available(chain)
    assert ds.name == "mnist01" and skipped == []
    (isolated / "xdg" / "eos_jax" / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    ds, skipped = data.load_first_available(chain)
    assert ds.name == "fashion_mnist01" and ds.source[0].startswith(str(system))
    for value in ("1", "yes"):
        monkeypatch.setenv("EOS_JAX_NO_SYSTEM_DATA", value)
        assert data.search_roots() == []
        ds, skipped = data.load_first_available(chain)
        assert ds.name == BUNDLED_NAME and [n for n, _ in skipped] == ["mnist01", "fashion_mnist01"]
        for _, reason in skipped:  # nothing was looked at, and the message says why
            assert "no directory to look in (EOS_JAX_NO_SYSTEM_DATA is set" in reason and "looked in" not in reason
            assert "download(" not in reason and "EOS_JAX_DATA=DIR" in reason
    monkeypatch.setenv("EOS_JAX_NO_SYSTEM_DATA", "0")
    assert data.search_roots() == [isolated / "xdg" / "eos_jax", system]
    # EOS_JAX_DATA and --data-dir stay on.
    monkeypatch.setenv("EOS_JAX_NO_SYSTEM_DATA", "1")
    monkeypatch.setenv("EOS_JAX_DATA", str(system))
    assert data.load_first_available(chain)[0].name == "fashion_mnist01"


def test_unused_files_in_data_dir_are_reported_only_when_passed_over(isolated, monkeypatch):
    chain = ["mnist01", "fashion_mnist01", BUNDLED_NAME, "digits01"]
    elsewhere = isolated / "env"
    write_mnist_dir(elsewhere / "mnist", seed=1)
    monkeypatch.setenv("EOS_JAX_DATA", str(elsewhere))
    dd = isolated / "dd"
    write_mnist_dir(dd / "fashion_mnist", seed=2)
    ds, _ = data.load_first_available(chain, data_dir=dd)
    assert ds.name == "mnist01"
    (u,) = data.unused_in_data_dir(dd, ds, chain)
    assert u["path"] == str(dd / "fashion_mnist") and u["holds"] == "Fashion-MNIST"
    assert "mnist01 comes before fashion_mnist01" in u["why"] and "request dataset fashion_mnist01" in u["why"]
    # Another dataset asked for.
    ds = data.load("digits01")
    (u,) = data.unused_in_data_dir(dd, ds, ["digits01"])
    assert "not among the requested datasets (digits01)" in u["why"]
    # Used from the directory, or no directory, or nothing in it: nothing to report.
    write_mnist_dir(dd / "mnist", seed=3)
    ds, _ = data.load_first_available(chain, data_dir=dd)
    assert ds.source[0].startswith(str(dd)) and data.unused_in_data_dir(dd, ds, chain) == []
    assert data.unused_in_data_dir(None, ds, chain) == []
    (isolated / "empty").mkdir()
    assert data.unused_in_data_dir(isolated / "empty", data.load("digits01"), ["digits01"]) == []
    # Loose files the search passed over are reported as such.
    write_loose(isolated / "loose", "fashion_mnist")
    ds, _ = data.load_first_available(chain, data_dir=isolated / "loose")
    assert ds.name == "mnist01"
    (u,) = data.unused_in_data_dir(isolated / "loose", ds, chain)
    assert u["holds"] == "Fashion-MNIST (loose IDX files)" and u["path"] == str(isolated / "loose")


# ------------------------------------------------------------------ CIFAR


def test_cifar_binary_round_trip_and_pixel_layout(tmp_path):
    x, y = cifar_records(3, seed=2)
    p = tmp_path / "b.bin"
    write_cifar_bin(p, x, y)
    xi, yi = data.read_cifar_binary(p)
    assert xi.shape == (3, 32, 32, 3) and xi.dtype == np.uint8
    assert_tree_equal_bits((xi, yi), (nhwc(x), y.astype(np.int32)))
    # Byte 1 + c*1024 + i*32 + j of a record is pixel (i, j) of channel c.
    rec = p.read_bytes()[3073 : 2 * 3073]
    assert xi[1, 5, 7, 2] == rec[1 + 2 * 1024 + 5 * 32 + 7]


def test_cifar_binary_malformed(tmp_path):
    x, y = cifar_records(2, seed=3)
    p = tmp_path / "short.bin"
    write_cifar_bin(p, x, y)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(MalformedDataError, match="short.bin.*multiple of the 3073"):
        data.read_cifar_binary(p)
    q = tmp_path / "label.bin"
    write_cifar_bin(q, x, np.array([3, 10], np.uint8))
    with pytest.raises(MalformedDataError, match="label.bin.*out of range"):
        data.read_cifar_binary(q)


@pytest.mark.parametrize("writer", ["py3_protocol2", "py2_cpickle"])
def test_cifar_python_round_trip(tmp_path, writer):
    x, y = cifar_records(4, seed=4)
    p = tmp_path / "data_batch_1"
    if writer == "py3_protocol2":
        write_cifar_py3(p, x, y)
    else:
        p.write_bytes(py2_cifar_pickle(x, y))
    xi, yi = data.read_cifar_python(p)
    assert_tree_equal_bits((xi, yi), (nhwc(x), y.astype(np.int32)))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_and_objects(tmp_path):
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(marker), b"labels": []}
    for proto in (2, 4):
        p = tmp_path / f"evil{proto}"
        p.write_bytes(pickle.dumps(evil, protocol=proto))
        with pytest.raises(MalformedDataError, match=r"refused global (posix|os|nt)\.system"):
            data.read_cifar_python(p)
    assert not marker.exists()
    with pytest.raises(MalformedDataError, match=r"refused global builtins\.eval"):
        data.restricted_loads(
            pickle.dumps({"data": (eval, ("1+1",))}, protocol=2).replace(b"c__builtin__", b"cbuiltins")
        )
    # Any object array (elements would be arbitrary objects) is refused at its dtype.
    with pytest.raises(MalformedDataError, match="refused non-numeric dtype"):
        data.restricted_loads(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
    # The numpy reconstruction stand-ins only take ndarray itself with the canonical arguments.
    with pytest.raises(MalformedDataError, match="refused _reconstruct"):
        data.restricted_loads(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R.")
    with pytest.raises(MalformedDataError, match="refused"):
        data.restricted_loads(b"\x80\x02cnumpy\nndarray\n.")  # a bare class never comes out
    nested = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."  # lists nested 100000 deep
    with pytest.raises(MalformedDataError, match="RecursionError"):
        data.restricted_loads(nested)
    # Plain data still loads.
    assert data.restricted_loads(pickle.dumps({"a": [1, 2.5, "s", b"b"]}, protocol=2)) == {"a": [1, 2.5, "s", b"b"]}


def test_cifar_python_wrong_contents(tmp_path):
    x, y = cifar_records(2, seed=5)
    p = tmp_path / "bad"
    p.write_bytes(pickle.dumps({b"data": x.reshape(2, -1), b"labels": [1]}, protocol=2))
    with pytest.raises(MalformedDataError, match="bad: 2 images but 1 labels"):
        data.read_cifar_python(p)
    p.write_bytes(pickle.dumps({b"data": x.reshape(2, -1).astype(np.float32), b"labels": [1, 2]}, protocol=2))
    with pytest.raises(MalformedDataError, match="expected a uint8 array"):
        data.read_cifar_python(p)
    p.write_bytes(pickle.dumps({b"data": x.reshape(2, -1), b"labels": [1, 2]}, protocol=2)[:-40])
    with pytest.raises(MalformedDataError, match="bad"):
        data.read_cifar_python(p)


def test_load_cifar10_formats_and_5k_subset(isolated):
    sizes = [3000, 2500, 1, 1, 2]
    batches = [cifar_records(n, seed=20 + i) for i, n in enumerate(sizes)]
    test = cifar_records(3, seed=30)
    for i, (x, y) in enumerate(batches, 1):
        write_cifar_py3(isolated / "py" / "cifar-10-batches-py" / f"data_batch_{i}", x, y)
        write_cifar_bin(isolated / "bin" / "cifar-10-batches-bin" / f"data_batch_{i}.bin", x, y)
    write_cifar_py3(isolated / "py" / "cifar-10-batches-py" / "test_batch", *test)
    write_cifar_bin(isolated / "bin" / "cifar-10-batches-bin" / "test_batch.bin", *test)
    all_x = np.concatenate([nhwc(b[0]) for b in batches])
    all_y = np.concatenate([b[1] for b in batches]).astype(np.int32)
    from_py = data.load("cifar10", data_dir=isolated / "py")
    from_bin = data.load("cifar10", data_dir=isolated / "bin")
    assert from_py.source[0].endswith("cifar-10-batches-py/data_batch_1")
    assert_tree_equal_bits((from_py.x, from_py.y), (from_bin.x, from_bin.y))
    assert_tree_equal_bits(from_bin.x, all_x.astype(np.float32) / np.float32(255))
    assert_tree_equal_bits(from_bin.y, all_y)
    k5 = data.load("cifar10_5k", data_dir=isolated / "bin")
    assert_tree_equal_bits((k5.x, k5.y), (from_bin.x[:5000], from_bin.y[:5000]))  # spans batches 1 and 2
    assert len(data.load("cifar10_5k", "test", data_dir=isolated / "py")) == 3


# ------------------------------------------------------------------ digits01, fallbacks, device


def test_digits01_deterministic_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    # The loader parses scikit-learn's CSV itself (no sklearn import): all 1,797 digits as sklearn gives them.
    from eos_jax.data.datasets import _load_digits

    images, labels, _ = _load_digits()
    assert_tree_equal_bits((images[..., 0], labels), (d.images.astype(np.uint8), d.target.astype(np.int32)))
    keep = d.target < 2
    ref_x = (d.images[keep].astype(np.float32) / np.float32(16))[..., None]
    tr, te = data.load("digits01", "train"), data.load("digits01", "test")
    assert (len(tr), len(te)) == (288, 72) and tr.x.shape[1:] == (8, 8, 1)
    test_pos = np.arange(keep.sum()) % 5 == 4
    assert_tree_equal_bits((tr.x, tr.y), (ref_x[~test_pos], d.target[keep][~test_pos].astype(np.int32)))
    assert_tree_equal_bits((te.x, te.y), (ref_x[test_pos], d.target[keep][test_pos].astype(np.int32)))
    assert float(tr.x.max()) == 1.0 and float(tr.x.min()) == 0.0 and set(np.unique(te.y)) == {0, 1}


def test_load_first_available_falls_back_but_not_on_malformed(isolated):
    ds, skipped = data.load_first_available(["mnist01", "fashion_mnist01", "digits01"], data_dir=isolated)
    assert ds.name == "digits01" and [s[0] for s in skipped] == ["mnist01", "fashion_mnist01"]
    assert "EOS_JAX_DATA" in skipped[0][1]
    write_mnist_dir(isolated / "fashion_mnist", seed=7)
    ds, skipped = data.load_first_available(["mnist01", "fashion_mnist01", "digits01"], data_dir=isolated)
    assert ds.name == "fashion_mnist01" and len(skipped) == 1
    (isolated / "mnist").mkdir()
    (isolated / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03junk")
    write_idx(isolated / "mnist" / "train-labels-idx1-ubyte", np.zeros(1, np.uint8), False)
    with pytest.raises(MalformedDataError, match="train-images-idx3-ubyte"):
        data.load_first_available(["mnist01", "fashion_mnist01"], data_dir=isolated)
    with pytest.raises(DataNotFoundError, match="none of cifar10"):
        data.load_first_available(["cifar10"], data_dir=isolated)


def test_dataset_to_device_is_a_pytree():
    ds = data.load("digits01", "test")
    dev = ds.to_device()
    assert isinstance(dev.x, jax.Array) and dev.name == ds.name and dev.sha256 == ds.sha256
    assert_tree_equal_bits((dev.x, dev.y), (ds.x, ds.y))
    total = jax.jit(lambda d: jnp.sum(d.y))(dev)  # static metadata does not become a tracer
    assert int(total) == int(ds.y.sum())


# ------------------------------------------------------------------ download (loopback only)


class _Server:
    """A quiet http.server on 127.0.0.1 serving one directory, counting GET requests."""

    def __init__(self, root: Path):
        self.count = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.count += 1
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_download_loopback_verified_atomic_and_loadable(isolated):
    served = isolated / "served"
    written = write_mnist_dir(served, gz=True, seed=9)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in served.iterdir()}
    cache = isolated / "cache"
    with _Server(served) as srv:
        # Published digests: the small files do not match -> clear error, nothing left behind.
        with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz.*does not match the expected 440fcabf"):
            data.download("mnist", cache_dir=cache, base_url=srv.url)
        assert list((cache / "mnist").iterdir()) == []
        files = data.download("mnist01", cache_dir=cache, base_url=srv.url, sha256=digests)
        assert sorted(p.name for p in files) == sorted(digests) and srv.count == 5
        assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(digests)  # no temp files
        data.download("mnist", cache_dir=cache, base_url=srv.url, sha256=digests)
        assert srv.count == 5  # verified files are not fetched again
        # A file longer than its published size is cut off early, and leaves nothing behind.
        with pytest.raises(ChecksumError, match="more than the published 10 bytes"):
            data.fetch(srv.url + "train-images-idx3-ubyte.gz", isolated / "big" / "f.gz", "0" * 64, size=10)
        assert list((isolated / "big").iterdir()) == []
    # The server is gone: a network failure is a DataError with a remedy, no partial file.
    with pytest.raises(DataError, match="download of .* failed.*data_dir=DIR"):
        data.fetch(srv.url + "train-labels-idx1-ubyte.gz", isolated / "gone" / "f.gz", "0" * 64, timeout=5)
    assert list((isolated / "gone").iterdir()) == []
    ds = data.load("mnist01", "test", data_dir=cache)
    x, y = written["test"]
    assert_tree_equal_bits(ds.y, y[y < 2].astype(np.int32))
    assert data.download("digits01", cache_dir=cache) == []


def test_download_cifar_archive_extracts_expected_members(isolated):
    served = isolated / "served"
    served.mkdir()
    batches = [cifar_records(2, seed=40 + i) for i in range(6)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name, (x, y) in zip(names, batches):
            rec = np.concatenate([y[:, None], x.reshape(2, -1)], axis=1).astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(rec)
            tar.addfile(info, io.BytesIO(rec))
    (served / "cifar-10-binary.tar.gz").write_bytes(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    with _Server(served) as srv:
        data.download(
            "cifar10_5k", cache_dir=isolated / "c", base_url=srv.url, sha256={"cifar-10-binary.tar.gz": digest}
        )
    te = data.load("cifar10", "test", data_dir=isolated / "c")
    assert_tree_equal_bits(te.y, batches[5][1].astype(np.int32))


# ------------------------------------------------------------------ preprocessing


def test_standardize_uses_training_statistics():
    tr = RNG.uniform(size=(6, 4, 4, 3)).astype(np.float32) * np.array([1.0, 2.0, 3.0], np.float32)
    te = RNG.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    s_tr, s_te = data.standardize(tr, te)
    mean = tr.astype(np.float64).mean(axis=(0, 1, 2))
    std = tr.astype(np.float64).std(axis=(0, 1, 2))
    np.testing.assert_allclose(s_tr.astype(np.float64).mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(s_tr.astype(np.float64).std(axis=(0, 1, 2)), 1.0, rtol=1e-5)
    assert_tree_equal_bits(s_te, (te - mean.astype(np.float32)) / std.astype(np.float32))
    # The jittable normalize gives the same bits on device.
    m, s = data.channel_stats(tr)
    assert_tree_equal_bits(jax.jit(data.normalize)(te, m, s), s_te)
    # Per-pixel statistics (Cohen et al.), a constant pixel divides by one.
    tr[:, 0, 0, 0] = 0.5
    (p_tr,) = data.standardize(tr, per="pixel")
    assert np.all(p_tr[:, 0, 0, 0] == 0.0)
    with pytest.raises(ConfigError, match="per='batch'"):
        data.standardize(tr, per="batch")


def test_one_hot():
    oh = data.one_hot(np.array([0, 2, 1], np.int32), 3, jnp.float32)
    assert oh.dtype == jnp.float32
    assert_tree_equal_bits(oh, np.eye(3, dtype=np.float32)[[0, 2, 1]])
    with pytest.raises(ConfigError, match=r"outside \[0, 3\)"):
        data.one_hot(np.array([3], np.int32), 3)


# ------------------------------------------------------------------ batching and augmentation


def test_epoch_permutation_and_batches_are_key_determined():
    key = jax.random.key(0)
    p0, p0b, p1 = (data.epoch_permutation(key, e, 50) for e in (0, 0, 1))
    assert_tree_equal_bits(p0, p0b)
    assert sorted(np.asarray(p0).tolist()) == list(range(50)) and p0.dtype == jnp.int32
    assert int(np.sum(np.asarray(p0) != np.asarray(p1))) > 40
    x = np.arange(50, dtype=np.float32)[:, None]
    y = np.arange(50, dtype=np.int32)
    b1 = list(data.iterate_batches(x, y, key, 3, 16))
    b2 = list(data.iterate_batches(x, y, key, 3, 16))
    assert [len(b[1]) for b in b1] == [16, 16, 16, 2]
    assert_tree_equal_bits(b1, b2)
    assert_tree_equal_bits(np.concatenate([b[1] for b in b1]), data.epoch_permutation(key, 3, 50))
    idx = jax.jit(data.batch_indices, static_argnums=(2, 3))(key, jnp.int32(3), 50, 16)
    assert idx.shape == (3, 16)
    assert_tree_equal_bits(idx.reshape(-1), np.concatenate([b[1] for b in b1[:3]]))
    assert len(list(data.iterate_batches(x, y, key, 0, 16, drop_remainder=True))) == 3


def _find_crop(out: np.ndarray, img: np.ndarray, pad: np.ndarray) -> list[tuple[int, int, bool]]:
    """All (offset_y, offset_x, flipped) whose crop of the padded ``img`` equals ``out``."""
    h, w, c = img.shape
    padded = np.broadcast_to(pad, (h + 8, w + 8, c)).copy()
    padded[4 : 4 + h, 4 : 4 + w] = img
    cands, keys = [], []
    for oy in range(9):
        for ox in range(9):
            crop = padded[oy : oy + h, ox : ox + w]
            cands += [crop, crop[:, ::-1]]
            keys += [(oy, ox, False), (oy, ox, True)]
    match = np.all(np.stack(cands) == out[None], axis=(1, 2, 3))
    return [k for k, m in zip(keys, match) if m]


def test_augment_cifar_is_a_keyed_crop_and_flip():
    x = RNG.uniform(0.1, 1.0, size=(64, 8, 8, 3)).astype(np.float32)  # small images, same rule
    key = jax.random.key(7)
    a1 = data.augment_cifar(key, x)
    a2 = jax.jit(data.augment_cifar)(key, x)
    assert a1.shape == x.shape and a1.dtype == jnp.float32
    assert_tree_equal_bits(a1, a2)  # same key -> same augmentation, jit or not
    a3 = data.augment_cifar(jax.random.key(8), x)
    assert not np.array_equal(np.asarray(a1), np.asarray(a3))
    pad = np.zeros(3, np.float32)
    hits = [_find_crop(np.asarray(a1)[i], x[i], pad) for i in range(len(x))]
    assert all(len(h) == 1 for h in hits), "every output is exactly one crop/flip of its own image"
    offsets = {h[0][:2] for h in hits}
    flips = sum(h[0][2] for h in hits)
    assert len(offsets) > 20 and 16 <= flips <= 48
    # Per-channel padding value (e.g. the standardized black).
    pv = np.array([-1.0, -2.0, -3.0], np.float32)
    a4 = np.asarray(data.augment_cifar(key, x, pad_value=pv))
    assert all(len(_find_crop(a4[i], x[i], pv)) == 1 for i in range(8))


@pytest.mark.parametrize("dtype,gz", [(np.uint8, False), (np.float32, True), (np.int16, False)])
def test_write_idx_is_the_independent_writer_and_reads_back(tmp_path, dtype, gz):
    """formats.write_idx gives the bytes of this file's own IDX writer (gzip decompressed), and read_idx inverts it."""
    arr = (np.arange(24).reshape(2, 3, 4) * 3 - 7).astype(dtype) if dtype != np.uint8 else np.arange(24, dtype=np.uint8)
    path = data.write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), arr)
    raw = path.read_bytes()
    assert (gzip.decompress(raw) if gz else raw) == idx_bytes(arr)
    assert_tree_equal_bits(data.read_idx(path), arr)
    with pytest.raises(ValueError, match="complex64"):
        data.write_idx(tmp_path / "c.idx", np.zeros(2, np.complex64))
