"""Makes the Fashion-MNIST 0/1 subset bundled with eos-jax, bit for bit, from the published files.

    python scripts/make_bundled_data.py            # (re)write eos_jax/data/bundled/fashion_mnist01/
    python scripts/make_bundled_data.py --check    # regenerate into a temp dir, compare bit for bit
    python scripts/make_bundled_data.py --source DIR   # DIR holds {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]

The source directory defaults to where Debian's ``dataset-fashion-mnist`` package installs
the published files (``apt-get install dataset-fashion-mnist``). Each source file is
checked twice: the ``.gz`` file against the digests of the files as published by Zalando
(``eos_jax.data.sources.PUBLISHED``) or as Debian ships them (recompressed:
``DEBIAN_FASHION_GZ``), and the decompressed IDX bytes, which are the published content
whoever compressed them, against ``FASHION_IDX_SHA256``. Uncompressed source files are
accepted and checked against the latter only.

Output (a few seconds): the first ``counts["train"]`` (2000) training and the first
``counts["test"]`` (500) test examples of classes 0 (T-shirt/top) and 1 (Trouser), in the
published order, labels kept as 0/1, written as UNCOMPRESSED IDX files (type 0x08, the
published header layout): raw bytes regenerate bit for bit, compressed bytes can differ
between zlib builds. 1,962,548 bytes in all. The digests of what is written must equal
those committed in ``eos_jax.data.sources.BUNDLED`` (checked on every load too); a
mismatch writes nothing and exits 1.

Why 2000/500: the main job (``python -m experiments.eos``) trains on the first 2000
training examples by default, so the bundled set is the default run's whole data and a
prefix of ``fashion_mnist01`` (a run on it equals the same run on the full dataset), while
the files stay under 2 MB; 500 test examples (248 T-shirts, 252 trousers) estimate a test
error to about +-2 % at 95 %.

Fashion-MNIST: Copyright (c) 2017 Zalando SE, MIT licence (see NOTICE); Xiao, Rasul,
Vollgraf (2017), arXiv:1708.07747.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout this script lives in, not another installed copy

import numpy as np  # noqa: E402

from eos_jax.data import sources  # noqa: E402

NAME = "fashion_mnist01_bundled"
DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"


class SourceError(Exception):
    """A source file is missing or does not have a known digest."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(directory: Path, name: str) -> bytes:
    """The decompressed bytes of published file ``name``, after checking both digests."""
    want_raw, want_size = sources.FASHION_IDX_SHA256[name]
    gz, raw = directory / (name + ".gz"), directory / name
    if gz.is_file():
        blob = gz.read_bytes()
        published = {r.filename: r.sha256 for r in sources.PUBLISHED["fashion_mnist"]}
        known = {published[gz.name]: "as published", sources.DEBIAN_FASHION_GZ[gz.name][0]: "as Debian ships it"}
        got = sha256(blob)
        if got not in known:
            raise SourceError(
                f"{gz}: SHA-256 {got} is neither the published {published[gz.name]} nor Debian's "
                f"{sources.DEBIAN_FASHION_GZ[gz.name][0]}; decompress it next to it as {raw.name} to "
                f"check its content instead"
            )
        print(f"  {gz}: SHA-256 ok ({known[got]})")
        data = gzip.decompress(blob)
        what = f"{gz} (decompressed)"
    elif raw.is_file():
        data = raw.read_bytes()
        what = str(raw)
    else:
        raise SourceError(
            f"{directory}: no {name}.gz or {name}; pass --source DIR holding the published Fashion-MNIST "
            f"files (apt-get install dataset-fashion-mnist puts them in {DEFAULT_SOURCE})"
        )
    got = sha256(data)
    if got != want_raw or len(data) != want_size:
        raise SourceError(
            f"{what}: SHA-256 {got} ({len(data)} bytes) is not the published Fashion-MNIST content "
            f"{want_raw} ({want_size} bytes)"
        )
    print(f"  {what}: SHA-256 ok (published IDX content)")
    return data


def parse_idx_u8(data: bytes, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (its digest was checked, so the header is the published one)."""
    (magic,) = struct.unpack(">I", data[:4])
    assert magic == 0x0800 + ndim, hex(magic)
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_u8_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, header as in the published files (magic 0x0000080N)."""
    assert arr.dtype == np.uint8
    return struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes(order="C")


def build(source: Path) -> dict[str, bytes]:
    """File name -> bytes of the bundled subset, from the published files in ``source``."""
    spec = sources.BUNDLED[NAME]
    out: dict[str, bytes] = {}
    for split in ("train", "test"):
        img_file, lab_file = spec.files[split]
        images = parse_idx_u8(read_source(source, img_file.filename), 3)
        labels = parse_idx_u8(read_source(source, lab_file.filename), 1)
        keep = np.flatnonzero(np.isin(labels, spec.classes))[: spec.counts[split]]
        if keep.shape[0] != spec.counts[split]:
            raise SourceError(f"{source}: only {keep.shape[0]} {split} examples of classes {spec.classes}")
        # Labels stay as published: the kept classes are 0 and 1.
        out[img_file.filename] = idx_u8_bytes(np.ascontiguousarray(images[keep]))
        out[lab_file.filename] = idx_u8_bytes(np.ascontiguousarray(labels[keep]))
    return out


def expected() -> dict[str, tuple[str, int]]:
    spec = sources.BUNDLED[NAME]
    return {f.filename: (f.sha256, f.size) for split in ("train", "test") for f in spec.files[split]}


def compare_digests(files: dict[str, bytes]) -> list[str]:
    """Mismatches between built bytes and the digests committed in the package (empty: all equal)."""
    bad = []
    for name, (digest, size) in expected().items():
        got = sha256(files[name])
        status = "ok" if (got == digest and len(files[name]) == size) else "DIFFERS"
        print(f"  {name}: {len(files[name])} bytes, SHA-256 {got} {status}")
        if status != "ok":
            bad.append(f"{name}: built {got} ({len(files[name])} bytes), committed {digest} ({size} bytes)")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/make_bundled_data.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"directory of the published files (default {DEFAULT_SOURCE})"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and compare bit for bit with the package's files",
    )
    p.add_argument("--out", default=None, help="write here instead of the package's directory")
    args = p.parse_args(argv)
    target = Path(args.out) if args.out else sources.bundled_dir(NAME)
    try:
        print(f"reading {args.source}")
        files = build(Path(args.source))
    except SourceError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print("built (against eos_jax.data.sources.BUNDLED):")
    bad = compare_digests(files)
    if bad:
        print(
            f"{p.prog}: error: the built files differ from the committed digests, nothing written: " + "; ".join(bad),
            file=sys.stderr,
        )
        return 1
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            diffs = []
            for name in files:
                shipped = target / name
                if not shipped.is_file():
                    diffs.append(f"{shipped}: missing")
                elif shipped.read_bytes() != (Path(tmp) / name).read_bytes():
                    diffs.append(f"{shipped}: differs from the regenerated file")
        if diffs:
            print(f"{p.prog}: error: " + "; ".join(diffs), file=sys.stderr)
            return 1
        print(f"check: the {len(files)} files in {target} equal the regenerated ones bit for bit")
        return 0
    from eos_jax.io import atomic_write_bytes

    for name, data in files.items():
        atomic_write_bytes(target / name, data)
        os.chmod(target / name, 0o644)  # package data: readable by everyone (mkstemp makes 0600)
    print(f"wrote {len(files)} files ({sum(map(len, files.values()))} bytes) to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
