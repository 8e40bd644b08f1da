"""Tests of normlab.data.sources: every source from tiny files in its on-disk format, no network."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.data.sources import SOURCES, DataSourceError, ImageData, load_source
from normlab.errors import ConfigError


def test_sources_tuple() -> None:
    assert SOURCES == ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder", "synthetic")


def test_digits() -> None:
    data = load_source("digits", "unused")
    assert data.train_x.shape == (1797, 1, 8, 8)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert int(data.train_x.max()) == 255 and int(data.train_x.min()) == 0
    assert sorted(data.train_y.unique().tolist()) == list(range(10))
    assert data.test_x is None and data.test_y is None
    assert data.classes == [str(i) for i in range(10)]
    assert data.num_channels == 1 and data.image_shape == (1, 8, 8) and data.num_classes == 10


# -- MNIST / FashionMNIST ----------------------------------------------------------------------
def _write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
    )


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like(tmp_path: Path, name: str, folder: str) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    tr_x, tr_y = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    te_x, te_y = rng.integers(0, 256, (10, 28, 28)), rng.integers(0, 10, 10)
    _write_idx(raw, "train", tr_x, tr_y)
    _write_idx(raw, "t10k", te_x, te_y)

    data = load_source(name, tmp_path)
    assert data.train_x.shape == (20, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_x is not None and data.test_y is not None
    assert data.test_x.shape == (10, 1, 28, 28)
    assert torch.equal(data.train_x[:, 0], torch.from_numpy(tr_x.astype(np.uint8)))
    assert torch.equal(data.test_x[:, 0], torch.from_numpy(te_x.astype(np.uint8)))
    assert data.train_y.dtype == torch.int64 and data.train_y.tolist() == tr_y.tolist()
    assert data.test_y.tolist() == te_y.tolist()
    assert data.num_classes == 10


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_missing(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(DataSourceError) as info:
        load_source(name, tmp_path)
    msg = str(info.value)
    assert str(tmp_path / folder / "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "data.download=true" in msg and "data.data_dir" in msg
    assert isinstance(info.value, RuntimeError)


def test_mnist_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    import torchvision.datasets.mnist as tv_mnist

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataSourceError) as info:
        load_source("mnist", tmp_path, download=True)
    msg = str(info.value)
    assert "download" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg


# -- CIFAR-10 ---------------------------------------------------------------------------------
def _write_cifar(root: Path, n_train: int = 4, n_test: int = 3) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written: dict[str, np.ndarray] = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, fname in enumerate(names):
        n = n_test if fname == "test_batch" else n_train
        rows = rng.integers(0, 256, (n, 3 * 32 * 32)).astype(np.uint8)
        if i == 0:  # a known pixel: image 0, channel 2 (blue), row 5, column 7
            rows[0, 2 * 1024 + 5 * 32 + 7] = 201
        labels = [(i + j) % 10 for j in range(n)]
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": rows, "labels": labels}, f)
        written[fname] = rows
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return written


def _trust_these_files(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's own md5 check expect the md5 sums of the tiny files written here (the
    check itself runs: a changed byte fails it)."""
    import torchvision.datasets.cifar as tv_cifar

    folder = root / "cifar-10-batches-py"
    cls = tv_cifar.CIFAR10

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def test_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _write_cifar(tmp_path)
    _trust_these_files(monkeypatch, tmp_path)

    data = load_source("cifar10", tmp_path)
    assert data.train_x.shape == (20, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x is not None and data.test_x.shape == (3, 3, 32, 32)
    assert int(data.train_x[0, 2, 5, 7]) == 201
    expected = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)])
    assert torch.equal(data.train_x.reshape(20, -1), torch.from_numpy(expected))
    assert torch.equal(data.test_x.reshape(3, -1), torch.from_numpy(written["test_batch"]))
    assert data.train_y.dtype == torch.int64 and data.train_y[:4].tolist() == [0, 1, 2, 3]
    assert data.classes == [f"c{i}" for i in range(10)] and data.num_channels == 3


@pytest.mark.parametrize("name", ["data_batch_3", "batches.meta"])
def test_cifar10_file_whose_md5_differs_is_refused(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/data.md and the error message say torchvision checks the md5 sums: one changed byte
    in a batch or in the metadata and the data set is refused, with the files it expects."""
    _write_cifar(tmp_path)
    _trust_these_files(monkeypatch, tmp_path)
    assert load_source("cifar10", tmp_path).num_classes == 10  # intact: it loads
    path = tmp_path / "cifar-10-batches-py" / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF  # inside the pickle's payload, not its STOP opcode
    path.write_bytes(bytes(data))
    with pytest.raises(DataSourceError) as info:
        load_source("cifar10", tmp_path)
    msg = str(info.value)
    assert "not found (or is corrupted)" in msg and "md5" in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg and name in msg


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError) as info:
        load_source("cifar10", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    for fname in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert fname in msg
    assert "data.download=true" in msg


# -- image folder -----------------------------------------------------------------------------
def _write_pngs(folder: Path, seed: int, n: int = 3, size: int = 6) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for cls in ("zebra", "ant"):
        (folder / cls).mkdir(parents=True)
        out[cls] = []
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / cls / f"img{i}.png")
            out[cls].append(pixels)
    return out


def _expected(written: dict[str, list[np.ndarray]]) -> torch.Tensor:
    # classes are sorted (ant, zebra), files sorted within a class
    arrays = written["ant"] + written["zebra"]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def test_imagefolder_flat(tmp_path: Path) -> None:
    written = _write_pngs(tmp_path, seed=0)
    data = load_source("imagefolder", tmp_path)
    assert data.classes == ["ant", "zebra"]
    assert data.test_x is None and data.test_y is None
    assert data.train_x.shape == (6, 3, 6, 6) and data.train_x.dtype == torch.uint8
    assert torch.equal(data.train_x, _expected(written))
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1] and data.train_y.dtype == torch.int64


def test_imagefolder_split_and_resize(tmp_path: Path) -> None:
    train = _write_pngs(tmp_path / "train", seed=1)
    test = _write_pngs(tmp_path / "test", seed=2, n=2)
    data = load_source("imagefolder", tmp_path)
    assert data.classes == ["ant", "zebra"]
    assert torch.equal(data.train_x, _expected(train))
    assert data.test_x is not None and data.test_y is not None
    assert torch.equal(data.test_x, _expected(test))
    assert data.test_y.tolist() == [0, 0, 1, 1]

    resized = load_source("imagefolder", tmp_path, image_size=(4, 5))
    assert resized.train_x.shape == (6, 3, 4, 5)
    assert resized.test_x is not None and resized.test_x.shape == (4, 3, 4, 5)


def test_imagefolder_grayscale_to_rgb_and_sizes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    gray = np.arange(36, dtype=np.uint8).reshape(6, 6)
    Image.fromarray(gray, "L").save(tmp_path / "a" / "g.png")
    Image.fromarray(np.zeros((7, 6), np.uint8), "L").save(tmp_path / "a" / "h.png")
    with pytest.raises(DataSourceError, match="data.image_size"):
        load_source("imagefolder", tmp_path)
    (tmp_path / "a" / "h.png").unlink()
    data = load_source("imagefolder", tmp_path)
    assert data.train_x.shape == (1, 3, 6, 6)
    assert all(torch.equal(data.train_x[0, c], torch.from_numpy(gray)) for c in range(3))


def test_imagefolder_hidden_entries_are_not_classes_or_images(tmp_path: Path) -> None:
    written = _write_pngs(tmp_path, seed=3)
    # what Jupyter and macOS leave behind: hidden folders (with images in them) and files
    for hidden in (tmp_path / ".ipynb_checkpoints", tmp_path / "ant" / ".ipynb_checkpoints"):
        hidden.mkdir()
        Image.new("RGB", (6, 6)).save(hidden / "copy.png")
    Image.new("RGB", (6, 6)).save(tmp_path / "zebra" / "._img0.png")
    data = load_source("imagefolder", tmp_path)
    assert data.classes == ["ant", "zebra"]
    assert torch.equal(data.train_x, _expected(written))  # the 6 visible images, nothing else


@pytest.mark.parametrize("layout", ["missing", "empty", "no_images", "no_test"])
def test_imagefolder_errors(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "images"
    if layout == "empty":
        root.mkdir()
    elif layout == "no_images":
        (root / "cat").mkdir(parents=True)
        (root / "cat" / "notes.txt").write_text("not an image")
    elif layout == "no_test":
        _write_pngs(root / "train", seed=0)
    with pytest.raises(DataSourceError) as info:
        load_source("imagefolder", root)
    msg = str(info.value)
    assert "data.data_dir" in msg and str(root) in msg and "<class>" in msg


# -- synthetic / misc ---------------------------------------------------------------------------
def test_synthetic() -> None:
    cfg = {"num_samples": 50, "num_test": 20, "shape": [2, 5, 7], "num_classes": 4}
    a = load_source("synthetic", "unused", synthetic=cfg, seed=3)
    b = load_source("synthetic", "unused", synthetic=cfg, seed=3)
    c = load_source("synthetic", "unused", synthetic=cfg, seed=4)
    assert isinstance(a, ImageData)
    assert a.train_x.shape == (50, 2, 5, 7) and a.train_x.dtype == torch.uint8
    assert a.test_x is not None and a.test_x.shape == (20, 2, 5, 7)
    assert a.train_y.dtype == torch.int64 and int(a.train_y.max()) < 4
    assert a.num_classes == 4 and a.image_shape == (2, 5, 7)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_is_learnable() -> None:
    cfg = {"num_samples": 400, "num_test": 100, "shape": [3, 8, 8], "num_classes": 5}
    data = load_source("synthetic", "unused", synthetic=cfg)
    assert data.test_x is not None and data.test_y is not None
    x, y = data.train_x.float(), data.train_y
    centroids = torch.stack([x[y == k].mean(0) for k in range(5)]).flatten(1)
    pred = torch.cdist(data.test_x.float().flatten(1), centroids).argmin(1)
    # nearest class mean, a second method: noise 48 around prototypes ~100 apart per pixel
    assert (pred == data.test_y).float().mean() > 0.9


def test_synthetic_defaults_and_bad_options() -> None:
    data = load_source("synthetic", "unused", synthetic={"num_test": 0})
    assert data.train_x.shape == (1024, 3, 32, 32) and data.test_x is None
    with pytest.raises(ConfigError, match="data.synthetic.bogus"):
        load_source("synthetic", "unused", synthetic={"bogus": 1})
    with pytest.raises(ConfigError, match="data.synthetic.shape"):
        load_source("synthetic", "unused", synthetic={"shape": [3, 32]})


def test_unknown_name() -> None:
    with pytest.raises(ConfigError, match="data.name"):
        load_source("imagenet", "unused")
