"""Training-batch augmentation (``augment=...``): the device ops give torchvision.transforms.v2's
pixels for the same crop box, flip and erased box; batches are a function of (seed, epoch,
batch); val/test are never augmented; soft targets; bad values are refused by key."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from normlab.data import NormLabDataModule
from normlab.data.augment import (
    BatchAugment,
    padded_crop,
    random_erasing,
    resized_crop,
    resized_crop_boxes,
)
from normlab.errors import ConfigError


def _images(b: int = 16, c: int = 3, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_padded_crop_gives_torchvision_pixels_for_the_same_box() -> None:
    images = _images()
    out = padded_crop(images, 3, torch.Generator().manual_seed(5))
    # the boxes drawn: the same generator, the same draws
    g = torch.Generator().manual_seed(5)
    top = torch.randint(0, 7, (16,), generator=g)
    left = torch.randint(0, 7, (16,), generator=g)
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > 5  # boxes differ per sample
    for i in range(16):
        want = TF.crop(TF.pad(images[i], [3]), int(top[i]), int(left[i]), 12, 10)
        assert torch.equal(out[i], want)


def test_flip_flips_the_drawn_samples_as_torchvision_does() -> None:
    images = _images()
    out = BatchAugment(flip=0.5).geometric(images, torch.Generator().manual_seed(1))
    flipped = torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < flipped.sum() < 16
    for i in range(16):
        want = TF.horizontal_flip(images[i]) if flipped[i] else images[i]
        assert torch.equal(out[i], want)


def test_resized_crop_boxes_follow_torchvision_and_give_its_pixels() -> None:
    images = _images(b=200, h=32, w=32)
    boxes = resized_crop_boxes(
        images.shape, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(2)
    )
    top, left, h, w = boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all()
    area = (h * w).double() / (32 * 32)
    # each box's area within scale (rounding of h and w aside) and of many sizes
    assert area.min() > 0.05 and area.max() <= 1.0 and area.std() > 0.15
    out = resized_crop(images[:8], boxes[:8])
    for i in range(8):
        want = TF.resized_crop(images[i], *boxes[i].tolist(), [32, 32], antialias=True)
        assert torch.equal(out[i], want)


def test_random_erasing_zeroes_one_box_per_drawn_sample_as_torchvision_erase() -> None:
    images = torch.randn(64, 3, 16, 16) + 5  # no zeros of its own
    out = random_erasing(images, 0.5, torch.Generator().manual_seed(3))
    erased = (out == 0).flatten(1).any(1)
    assert 10 < erased.sum() < 54
    for i in torch.nonzero(erased)[:, 0].tolist():
        rows = torch.nonzero((out[i, 0] == 0).any(1))[:, 0]
        cols = torch.nonzero((out[i, 0] == 0).any(0))[:, 0]
        top, left, h, w = int(rows[0]), int(cols[0]), len(rows), len(cols)
        assert torch.equal(out[i], TF.erase(images[i], top, left, h, w, torch.tensor(0.0)))
        assert 0.02 * 256 - 8 <= h * w <= 0.33 * 256 + 8
    assert torch.equal(out[~erased], images[~erased])


def test_mixup_and_label_smoothing_give_soft_targets() -> None:
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8) % 3
    mixed, targets = BatchAugment(mixup_alpha=1.0, label_smoothing=0.3).mix(
        images, labels, 3, torch.Generator().manual_seed(0)
    )
    assert targets.shape == (8, 3)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.1 - 1e-6  # 0.3 / 3 on every class
    lam = targets[0, labels[0]]  # MixUp: lam * x + (1 - lam) * x rolled by one
    assert not torch.equal(mixed, images)
    smooth = BatchAugment(label_smoothing=0.3).mix(images, labels, 3, torch.Generator())[1]
    assert torch.allclose(smooth[0], torch.tensor([0.8, 0.1, 0.1]))
    assert 0.1 <= lam <= 0.8 + 1e-6


def _digits(tmp_path, **augment) -> NormLabDataModule:
    dm = NormLabDataModule(name="digits", data_dir=str(tmp_path), batch_size=32, augment=augment)
    dm.setup("fit")
    return dm


class _Trainer:
    """What on_after_batch_transfer reads of the Trainer, at a chosen (epoch, batch)."""

    def __init__(self, epoch: int, batch: int, training: bool = True) -> None:
        from types import SimpleNamespace

        self.training, self.current_epoch, self.global_rank = training, epoch, 0
        current = SimpleNamespace(ready=batch)
        self.fit_loop = SimpleNamespace(
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=current))
        )
        self.loggers, self.is_global_zero, self.global_step = [], True, 0
        self.precision_plugin = SimpleNamespace(convert_input=lambda x: x)


def _transfer(dm: NormLabDataModule, batch, trainer: _Trainer):
    dm.trainer = trainer
    return dm.on_after_batch_transfer(batch, 0)


def test_training_batches_depend_only_on_seed_epoch_and_batch(tmp_path) -> None:
    dm = _digits(tmp_path, crop_padding=1, erasing=0.5)
    batch = next(iter(dm.train_dataloader()))
    plain = dm.scaler(batch[0])
    a = _transfer(dm, batch, _Trainer(epoch=2, batch=3))[0]
    again = _transfer(dm, batch, _Trainer(epoch=2, batch=3))[0]
    other = _transfer(dm, batch, _Trainer(epoch=2, batch=4))[0]
    assert torch.equal(a, again)
    assert not torch.equal(a, other) and not torch.equal(a, plain)
    # outside training (validation, test, statistics passes): untouched
    evaluated = _transfer(dm, batch, _Trainer(epoch=2, batch=3, training=False))[0]
    assert torch.equal(evaluated, plain)


def test_streamed_images_are_augmented_in_the_worker_with_a_seed_per_sample(tmp_path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            pixels = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    dm = NormLabDataModule(
        name="imagefolder", data_dir=str(tmp_path), batch_size=4, in_memory=False,
        image_size=[12, 12], val_fraction=0.2, test_fraction=0.2,
        augment={"crop_padding": 2, "flip": 0.5},
    )  # fmt: skip
    dm.setup("fit")
    train = dm.splits["train"]
    assert train.transform is not None and dm.splits["val"].transform is None
    first = [x for x, _ in dm.train_dataloader()]
    second = [x for x, _ in dm.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    plain = torch.stack([train[i][0] for i in range(len(train))])
    assert not torch.equal(plain, torch.stack([train[(i, 7)][0] for i in range(len(train))]))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("flip", 2.0),
        ("crop_padding", -1),
        ("mixup_alpha", -0.5),
        ("resized_crop_scale", [0.5, 0.1]),
    ],
)
def test_a_bad_augment_value_is_refused_by_key(key, value) -> None:
    with pytest.raises(ConfigError, match=rf"data\.augment\.{key}"):
        BatchAugment(**{key: value})


def test_an_augmented_batch_is_shown_in_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import FAST, run_script

    run = run_script(
        "train.py", *FAST, "augment=crop", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "test=false", run_dir=tmp_path / "run",
    )  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    events = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "augment/batch" in events.Tags()["images"]
    (image,) = events.Images("augment/batch")
    assert image.step == 0 and image.width > 8 * 8 and image.height > 8 * 8  # a grid of 8x8 digits
