"""Readers of the mini benchmark's sources, checked on small files written here."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from adamerge.data.mini import sources
from adamerge.data.mini.sources import MissingSourceError, read_idx, read_pixel_csv


def write_idx(path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    """IDX by hand: 0, 0, type code, ndim, big-endian uint32 sizes, big-endian data."""
    dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    raw = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    raw += array.astype(dt).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip_plain_and_gz(tmp_path, compress):
    imgs = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    write_idx(tmp_path / "x", imgs, compress=compress)
    out = read_idx(tmp_path / "x")
    assert out.dtype == np.uint8 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out, imgs)


def test_read_idx_other_types(tmp_path):
    ints = np.array([[-3, 70000], [1, 2]], dtype=np.int32)
    write_idx(tmp_path / "i", ints, code=0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), ints)
    fl = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    write_idx(tmp_path / "f", fl, code=0x0D, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), fl)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    write_idx(tmp_path / "t", np.zeros((4, 3), np.uint8))
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-2])  # truncate the data
    with pytest.raises(ValueError, match=r"t: IDX header announces shape \(4, 3\)"):
        read_idx(tmp_path / "t")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="unknown IDX data type 0x07"):
        read_idx(tmp_path / "code")


@pytest.mark.parametrize("compress", [False, True])
def test_read_pixel_csv(tmp_path, compress):
    rows = np.array([[0, 255, 10, 20, 3], [1, 2, 3, 4, 9]], dtype=np.float64)  # side 2: 4 pixels + label
    text = "\n".join(",".join(f"{v:.1f}" for v in r) for r in rows).encode()
    (gzip.open if compress else open)(tmp_path / "m.csv", "wb").write(text)
    x, y = read_pixel_csv(tmp_path / "m.csv", side=2)
    assert x.dtype == np.uint8 and x.shape == (2, 2, 2)
    np.testing.assert_array_equal(x[0], [[0, 255], [10, 20]])
    np.testing.assert_array_equal(y, [3, 9])
    with pytest.raises(ValueError, match="expected 10 columns"):
        read_pixel_csv(tmp_path / "m.csv", side=3)
    (tmp_path / "bad.csv").write_text("0,300,1,2,1\n")
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 255\]"):
        read_pixel_csv(tmp_path / "bad.csv", side=2)


def test_fashion_loader_reads_idx_folder_and_reports_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMERGE_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist"):
        sources.load_fashion_mnist()
    tr = np.random.default_rng(0).integers(0, 256, (6, 28, 28)).astype(np.uint8)
    te = np.random.default_rng(1).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6) % 10, compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", te)  # plain files are found too
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 8, 9]))
    x, y = sources.load_fashion_mnist()
    np.testing.assert_array_equal(x, np.concatenate([tr, te]))
    np.testing.assert_array_equal(y, [0, 1, 2, 3, 4, 5, 7, 8, 9])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 8]))
    with pytest.raises(ValueError, match="expected images"):
        sources.load_fashion_mnist()


def test_mnist_csv_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMERGE_MNIST_CSV", str(tmp_path / "none.csv"))
    with pytest.raises(MissingSourceError, match=r"pip install .*adamerge\[mini\]"):
        sources.load_mnist5k()


def test_digits8_matches_sklearn():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x, y = sources.load_digits8()
    assert x.shape == (1797, 8, 8) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[5], np.round(d.images[5] * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(y, d.target)


@pytest.mark.skipif(not (sources.fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist_labels():
    y = read_idx(sources.fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz")
    assert y.shape == (10000,) and np.bincount(y).tolist() == [1000] * 10
