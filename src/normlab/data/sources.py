"""Image classification data sets loaded whole into memory as uint8 tensors.

Every source returns an :class:`ImageData`: images ``uint8 (N, C, H, W)`` and labels ``int64
(N,)``, plus the official test split when the data set has one. Nothing is scaled, split or
cached here: the DataModule slices batches and scales them on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.data.folder_walk import FolderWalk
from normlab.errors import ConfigError, NormlabError

SOURCES: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "imagefolder",
    "synthetic",
)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_samples": 1024,
    "num_test": 256,
    "shape": [3, 32, 32],
    "num_classes": 10,
    "noise_std": 48.0,
}


@dataclass
class ImageData:
    """A whole data set in memory; ``test_x``/``test_y`` are None when it has no official test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]

    @property
    def num_channels(self) -> int:
        """Number of image channels C."""
        return int(self.train_x.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of ``classes``)."""
        return len(self.classes)


class DataSourceError(NormlabError, RuntimeError):
    """The data set cannot be loaded.

    The message is one paragraph naming the key (``data.data_dir``, ``data.download``,
    ``data.name`` ...), the directory searched, the files expected and the fix.
    """


def load_source(
    name: str,
    data_dir: str | Path,
    download: bool = False,
    *,
    image_size: tuple[int, int] | None = None,
    synthetic: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ImageData:
    """Load the data set ``name`` (one of :data:`SOURCES`) into memory.

    Args:
        name: the source (``data.name``).
        data_dir: where torchvision data sets / the image folder live (``data.data_dir``).
        download: let torchvision download missing files (``data.download``; needs network).
        image_size: (H, W) to resize ``imagefolder`` images to (``data.image_size``).
        synthetic: options of the ``synthetic`` source (``data.synthetic``).
        seed: seed of the ``synthetic`` generator.

    Raises:
        DataSourceError: files missing or unreadable, or a download failed.
        ConfigError: an unknown ``name`` or a bad ``synthetic`` option.
    """
    if name == "digits":
        return _load_digits()
    if name in ("mnist", "fashion_mnist"):
        return _load_mnist(name, Path(data_dir), download)
    if name == "cifar10":
        return _load_cifar10(Path(data_dir), download)
    if name == "imagefolder":
        return _load_imagefolder(Path(data_dir), image_size)
    if name == "synthetic":
        return _make_synthetic(synthetic, seed)
    raise ConfigError("data.name", name, f"choose one of {', '.join(SOURCES)}")


def _load_digits() -> ImageData:
    """scikit-learn's bundled 8x8 digits; values 0..16 become 0..255 by round(v * 255 / 16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x = torch.from_numpy(pixels).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return ImageData(x, y, None, None, [str(i) for i in range(10)])


def _is_missing(err: Exception) -> bool:
    """True for torchvision's 'Dataset (metadata file) not found' errors."""
    msg = str(err)
    return msg.startswith("Dataset not found") or msg.startswith("Dataset metadata file not found")


def _fixes(name: str, where: Path) -> str:
    return (
        f"Fix: run once with data.download=true on a machine with network (it downloads into "
        f"data.data_dir), or copy the files into {where}, or point data.data_dir at the directory "
        f"that holds them (data.name={name})."
    )


def _download_urls(cls: Any) -> list[str]:
    """Where torchvision downloads ``cls`` from (its first mirror for MNIST-like sets)."""
    if hasattr(cls, "mirrors"):
        return [f"{cls.mirrors[0]}{filename}" for filename, _ in cls.resources]
    return [cls.url] if hasattr(cls, "url") else []


def _torchvision_splits(name: str, cls: Any, root: Path, download: bool, where: Path, files: str):
    """Instantiate a torchvision data set for train and test; translate its errors."""
    try:
        train = cls(root=str(root), train=True, download=download)
        test = cls(root=str(root), train=False, download=False)
    except (RuntimeError, OSError) as err:
        if isinstance(err, RuntimeError) and _is_missing(err):
            raise DataSourceError(
                f"data.name={name}: the data set was not found (or is corrupted) in {where} "
                f"(data.data_dir={root}, data.download={str(download).lower()}). Expected the "
                f"files {files}. {_fixes(name, where)}"
            ) from err
        if download:
            raise DataSourceError(
                f"data.name={name}: downloading into {where} failed (data.download=true, "
                f"data.data_dir={root}): {str(err).strip().splitlines()[0]} (tried "
                f"{', '.join(_download_urls(cls))}). Without network, download them on another "
                f"machine, copy the files {files} into {where} and set data.download=false."
            ) from err
        raise
    return train, test


def _load_mnist(name: str, root: Path, download: bool) -> ImageData:
    """torchvision MNIST / FashionMNIST from the four uncompressed IDX files in root/<Cls>/raw."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    where = root / cls.__name__ / "raw"
    files = (
        ", ".join(MNIST_FILES)
        + " (uncompressed: torchvision reads only the extracted files, so gunzip any .gz copies "
        "there first; with data.download=true it extracts .gz files whose md5 matches)"
    )
    train, test = _torchvision_splits(name, cls, root, download, where, files)
    return ImageData(
        train.data.to(torch.uint8).unsqueeze(1).contiguous(),
        train.targets.to(torch.int64),
        test.data.to(torch.uint8).unsqueeze(1).contiguous(),
        test.targets.to(torch.int64),
        [str(c) for c in train.classes],
    )


def _load_cifar10(root: Path, download: bool) -> ImageData:
    """torchvision CIFAR10 from root/cifar-10-batches-py (python pickles, md5-checked)."""
    from torchvision import datasets

    where = root / datasets.CIFAR10.base_folder
    files = (
        ", ".join(CIFAR10_FILES) + " (the python version of CIFAR-10, extracted from "
        "cifar-10-python.tar.gz; torchvision checks their md5 sums)"
    )
    train, test = _torchvision_splits("cifar10", datasets.CIFAR10, root, download, where, files)

    def images(data: np.ndarray) -> torch.Tensor:  # (N, H, W, C) -> (N, C, H, W)
        return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2), dtype=np.uint8))

    return ImageData(
        images(train.data),
        torch.as_tensor(train.targets, dtype=torch.int64),
        images(test.data),
        torch.as_tensor(test.targets, dtype=torch.int64),
        [str(c) for c in train.classes],
    )


_FOLDER_LAYOUT = (
    "data_dir/<class>/*.png (no official test split) or data_dir/train/<class>/*.png and "
    "data_dir/test/<class>/*.png"
)


@dataclass
class FolderIndex:
    """An image folder listed but not decoded: ``(path, label)`` pairs of each split.

    What ``data.in_memory=false`` streams from; ``test`` is None without a ``test/`` folder.
    Images are decoded as RGB, so ``num_channels`` is always 3.
    """

    train: list[tuple[str, int]]
    test: list[tuple[str, int]] | None
    classes: list[str]
    num_channels: int = 3

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of ``classes``)."""
        return len(self.classes)


def index_imagefolder(data_dir: str | Path) -> FolderIndex:
    """List an image folder (see :data:`_FOLDER_LAYOUT`) without decoding any image.

    Raises:
        DataSourceError: the directory, its class folders or their images are missing.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(data_dir)
    train_dir = root / "train"
    has_split = train_dir.is_dir()
    base = train_dir if has_split else root

    def fail(problem: str) -> DataSourceError:
        return DataSourceError(
            f"data.name=imagefolder: {problem} (data.data_dir={root}). Expected the layout "
            f"{_FOLDER_LAYOUT}, with image files ending in {', '.join(IMG_EXTENSIONS)}. Fix: set "
            f"data.data_dir to such a folder or copy the images there."
        )

    if not base.is_dir():
        raise fail(f"the directory {base} does not exist")
    classes = _class_folders(base)
    if not classes:
        raise fail(f"no class sub-folders found in {base}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    walk = FolderWalk(root)
    train_samples = walk.samples(base, class_to_idx, split="train/" if has_split else "")
    if not train_samples:
        raise fail(f"no images found in the class folders of {base}")
    counts = np.bincount([label for _, label in train_samples], minlength=len(classes))
    empty = [str(base / c) for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        # refused rather than skipped: a silently dropped class changes the model's outputs
        raise fail(
            f"class folder(s) without images: {', '.join(empty)} (each sub-folder is a class;"
            " add images to them or remove them)"
        )
    test_samples: list[tuple[str, int]] | None = None
    if has_split:
        test_dir = root / "test"
        if not test_dir.is_dir():
            raise fail(f"{train_dir} exists but {test_dir} does not")
        unknown = sorted(set(_class_folders(test_dir)) - set(classes))
        if unknown:
            raise fail(f"{test_dir} has classes missing from {train_dir}: {', '.join(unknown)}")
        test_samples = walk.samples(test_dir, class_to_idx, split="test/")
        if not test_samples:
            raise fail(f"no images found in the class folders of {test_dir}")
    return FolderIndex(train_samples, test_samples, list(classes))


def _class_folders(base: Path) -> list[str]:
    """The class sub-folders of ``base``, sorted; hidden ones (``.ipynb_checkpoints``, names
    starting with '.') are not classes."""
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_imagefolder(root: Path, image_size: tuple[int, int] | None) -> ImageData:
    """A folder of images, one sub-folder per class, decoded whole into memory.

    Images are always converted to RGB (grayscale ones are replicated to 3 channels) so that the
    channel count, and thus the model, does not depend on which files happen to be in the folder.
    """
    index = index_imagefolder(root)
    train_x, train_y = _decode(index.train, image_size)
    test_x = test_y = None
    if index.test is not None:
        size = image_size or (int(train_x.shape[2]), int(train_x.shape[3]))
        test_x, test_y = _decode(index.test, size)
    return ImageData(train_x, train_y, test_x, test_y, index.classes)


def decode_image(path: str, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to uint8 RGB ``(H, W, 3)``, resized (bilinear) to ``image_size``
    (H, W) when given; what the in-memory and the streaming imagefolder paths share."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # corrupt, truncated, text
        raise DataSourceError(
            f"data.name=imagefolder: cannot decode the image file {path} ({type(err).__name__}:"
            f" {str(err).strip().splitlines()[0] if str(err).strip() else 'unreadable'}). Fix:"
            " replace or remove that file (every file with an image extension under"
            " data.data_dir is read as an image)."
        ) from err
    if image_size is not None:
        height, width = (int(s) for s in image_size)
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _decode(
    samples: list[tuple[str, int]], image_size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (path, label) pairs to uint8 RGB (N, 3, H, W), resizing to (H, W) when given."""
    arrays: list[np.ndarray] = []
    for path, _ in samples:
        array = decode_image(path, image_size)
        if image_size is None and arrays and array.shape[:2] != arrays[0].shape[:2]:
            first, this = arrays[0].shape[:2], array.shape[:2]
            raise DataSourceError(
                f"data.name=imagefolder: images differ in size ({samples[0][0]} is "
                f"{first[0]}x{first[1]}, {path} is {this[0]}x{this[1]}, height x width). Fix: set "
                f"data.image_size=[H,W] to resize them all."
            )
        arrays.append(array)
    x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return x, y


def _make_synthetic(options: Mapping[str, Any] | None, seed: int) -> ImageData:
    """Random but learnable images, deterministic for ``seed``.

    Each class has a fixed random uint8 prototype image; a sample is its class's prototype plus
    Gaussian noise (``noise_std`` in pixel units), rounded and clipped to 0..255, so a CNN can
    learn the classes. Options (``data.synthetic``): num_samples, num_test (0: no test split),
    shape [C, H, W], num_classes, noise_std.
    """
    opts = dict(SYNTHETIC_DEFAULTS)
    for key, value in (options or {}).items():
        if key not in SYNTHETIC_DEFAULTS:
            raise ConfigError(f"data.synthetic.{key}", value, f"keys are {', '.join(opts)}")
        opts[key] = value
    shape = list(opts["shape"]) if not isinstance(opts["shape"], str) else []
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError("data.synthetic.shape", opts["shape"], "give [C, H, W], positive ints")
    for key, low in (("num_samples", 1), ("num_test", 0), ("num_classes", 1)):
        value = opts[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"data.synthetic.{key}", value, f"an integer >= {low}")
    noise = opts["noise_std"]
    if not isinstance(noise, int | float) or isinstance(noise, bool) or noise < 0:
        raise ConfigError("data.synthetic.noise_std", noise, "a number >= 0")

    gen = torch.Generator().manual_seed(int(seed))
    k = opts["num_classes"]
    prototypes = torch.randint(0, 256, (k, *shape), generator=gen).float()

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, k, (n,), generator=gen)
        noisy = prototypes[labels] + float(noise) * torch.randn(n, *shape, generator=gen)
        return noisy.round_().clamp_(0, 255).to(torch.uint8), labels.to(torch.int64)

    train_x, train_y = draw(opts["num_samples"])
    test_x = test_y = None
    if opts["num_test"] > 0:
        test_x, test_y = draw(opts["num_test"])
    return ImageData(train_x, train_y, test_x, test_y, [f"class_{i}" for i in range(k)])
