"""The DataModule: fixed seeded splits, per-channel feature scaling from the training split only,
batches scaled on the device, statistics carried in the checkpoint state."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.data import NormLabDataModule
from normlab.data.scaling import IMAGENET_MEAN, IMAGENET_STD, FeatureScaler, channel_stats


def make_dm(**kwargs) -> NormLabDataModule:
    dm = NormLabDataModule(**{"name": "digits", "data_dir": "unused", **kwargs})
    dm.setup("fit")
    return dm


def all_batches(loader, dm) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dm.on_after_batch_transfer(b, 0) for b in loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _assert_partition(parts: dict[str, list], everything: list) -> None:
    """train, val and test are pairwise disjoint and together hold every sample exactly once."""
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(parts[a]) & set(parts[b]), f"{a} and {b} share samples"
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(everything)


def test_split_is_fixed_disjoint_and_complete() -> None:
    a, b = make_dm(), make_dm()
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split].images, b.splits[split].images)
    other = make_dm(split_seed=1)
    assert not torch.equal(a.splits["val"].images, other.splits["val"].images)
    # the three splits are views of the 1797 digits: their rows partition the data set
    _assert_partition({s: a.splits[s].index.tolist() for s in a.splits}, list(range(1797)))
    # and each split's images are the data set's rows it names
    shared = a.splits["train"]._images
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split].images, shared[a.splits[split].index])


def test_streamed_split_is_disjoint_and_complete(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    files = []
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
            files.append(str(tmp_path / cls / f"{i}.png"))
    dm = make_dm(
        name="imagefolder", data_dir=str(tmp_path), in_memory=False, image_size=[6, 6],
        val_fraction=0.2, test_fraction=0.2,
    )  # fmt: skip
    parts = {s: [str(Path(p)) for p, _ in dm.splits[s].samples] for s in dm.splits}
    assert {s: len(v) for s, v in parts.items()} == {"train": 18, "val": 6, "test": 6}
    _assert_partition(parts, files)


def test_dataset_scaling_uses_training_split_statistics() -> None:
    dm = make_dm(scaling="dataset")
    train = dm.splits["train"].images.double() / 255
    expected_mean = train.mean(dim=(0, 2, 3))
    expected_std = train.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(
        torch.tensor(dm.scaler.mean, dtype=torch.float64), expected_mean, atol=1e-9
    )
    assert torch.allclose(torch.tensor(dm.scaler.std, dtype=torch.float64), expected_std, atol=1e-9)
    # the whole training split, scaled batch by batch, has mean ~0 and std ~1 per channel
    x, _ = all_batches(dm.train_dataloader(), dm)
    assert x.dtype == torch.float32
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    # ... and so does a single batch, approximately
    xb, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    # 64 images of 64 pixels: a loose bound, only to catch unscaled [0, 255] or [0, 1] batches
    assert xb.mean().abs() < 0.2 and abs(xb.std().item() - 1) < 0.2


def test_other_scalings() -> None:
    raw = make_dm(scaling="none")
    x, _ = raw.on_after_batch_transfer(next(iter(raw.val_dataloader())), 0)
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    custom = make_dm(scaling="custom", mean=[0.5], std=[0.25])
    images, labels = next(iter(custom.val_dataloader()))
    x, y = custom.on_after_batch_transfer((images, labels), 0)
    assert torch.allclose(x, (images.float() / 255 - 0.5) / 0.25, atol=1e-5)
    rgb = FeatureScaler(IMAGENET_MEAN, IMAGENET_STD)
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(rgb(white)[0, :, 0, 0], expected, atol=1e-5)


def test_statistics_travel_in_the_state_dict() -> None:
    trained = make_dm()
    state = trained.state_dict()
    assert state["mean"] == trained.scaler.mean and len(state["std"]) == 1
    # a fresh module (as in eval.py) takes them instead of recomputing from its own split
    fresh = NormLabDataModule(name="digits", data_dir="unused", split_seed=5)
    fresh.load_state_dict(state)
    fresh.setup("test")
    assert fresh.scaler.mean == trained.scaler.mean and fresh.scaler.std == trained.scaler.std


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        loader = make_dm(seed=seed).train_dataloader()  # a new DataModule each time
        loader.sampler.set_epoch(epoch)
        return [int(i) for batch in loader.batch_sampler for i in batch]

    n = len(make_dm().splits["train"])
    assert sorted(order(3, 0)) == list(range(n))  # every training image once per epoch
    assert order(3, 0) == order(3, 0)  # two DataModules, one seed and epoch: one order
    assert order(3, 0) != order(3, 1)  # the next epoch reshuffles
    assert order(3, 0) != order(4, 0)  # the seed decides the order
    assert order(0, 0) != order(42, 0)  # seed 0 is a seed like any other


def test_last_batch_of_one_sample_is_dropped() -> None:
    dm = make_dm()
    n = len(dm.splits["train"])  # 1257 = 4 * 314 + 1
    loader = NormLabDataModule(name="digits", data_dir="unused", batch_size=4)
    loader.setup("fit")
    batches = list(loader.train_dataloader())
    assert n % 4 == 1 and all(len(b[1]) == 4 for b in batches) and len(batches) == n // 4
    # evaluation never drops samples
    assert sum(len(b[1]) for b in loader.val_dataloader()) == len(loader.splits["val"])


def test_channel_stats_chunks_agree() -> None:
    images = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    assert np.allclose(channel_stats(images, chunk=7), channel_stats(images, chunk=1000))


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_through_the_datamodule(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    dm = make_dm(name="mnist", data_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.0)
    # the official test split is used as is; train/val come from the training files
    assert (len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"])) == (30, 10, 12)
    assert dm.num_channels == 1 and dm.num_classes == 10
    x, y = all_batches(dm.test_dataloader(), dm)
    assert x.shape == (12, 1, 28, 28)


def test_imagefolder_through_the_datamodule(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    dm = make_dm(name="imagefolder", data_dir=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    assert dm.num_channels == 3 and dm.num_classes == 2
    assert sum(len(s) for s in dm.splits.values()) == 20
    x, y = all_batches(dm.train_dataloader(), dm)
    assert x.shape[1:] == (3, 6, 6) and set(y.tolist()) <= {0, 1}


def test_missing_offline_data_names_directory_and_fix(tmp_path: Path) -> None:
    from normlab.errors import NormlabError

    with pytest.raises(NormlabError) as err:
        make_dm(name="mnist", data_dir=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "data.download=true" in message
