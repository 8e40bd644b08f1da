"""Training-batch augmentation (``augment=...``, the ``data.augment`` keys): per-sample random
crops, flips and erasing applied to a whole batch at once on its device, and MixUp/CutMix with
label smoothing; torchvision.transforms.v2 for images streamed from a folder.

Every random number is drawn from a generator seeded by (seed, rank, epoch, batch), so a resumed
run augments each batch exactly as the uninterrupted run did. The semantics are torchvision's:
``RandomCrop(size, padding)`` (zero padding), ``RandomHorizontalFlip(p)``,
``RandomResizedCrop(size, scale, ratio)``, ``RandomErasing(p, value=0)`` (on the scaled batch,
so 0 is the channel mean), ``MixUp(alpha)`` / ``CutMix(alpha)``; a sample given the same crop box
and flip as torchvision gives the same pixels (tests/test_augment.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from normlab.errors import ConfigError

TB_TAG = "augment/batch"  # TensorBoard image of the first augmented training batch
SHOWN = 64  # images in that grid
ATTEMPTS = 10  # torchvision's tries at a box before its fallback


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The generator seed of one training batch: a function of where it is in the run only."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + epoch) * 1_000_037 + batch & (2**63 - 1)


class BatchAugment:
    """Random augmentation of a training batch, one draw per sample, on the batch's device.

    Args (the ``data.augment`` keys, all off by default; ``configs/augment/*.yaml``):
        crop_padding: pad each side with this many zero pixels, then crop a random box of the
            original size (``RandomCrop(size, padding)``); 0: off.
        flip: probability of a horizontal flip (``RandomHorizontalFlip(p)``).
        resized_crop_scale: ``[min, max]`` fraction of the image area of a random box resized back
            to the image size (``RandomResizedCrop(size, scale)``); null: off.
        resized_crop_ratio: the box's aspect-ratio range.
        erasing: probability of erasing one random box of the scaled image (``RandomErasing``).
        mixup_alpha / cutmix_alpha: Beta(alpha, alpha) mixing of the batch with itself rolled by
            one (``MixUp`` / ``CutMix``); with both, each batch picks one; 0: off.
        label_smoothing: targets become ``(1 - s) * one_hot + s / num_classes``.

    With MixUp, CutMix or label smoothing the labels become soft targets (``(B, classes)``
    probabilities), which ``NormLabModule``'s cross-entropy takes as they are.

    Raises:
        ConfigError: a value out of its range, naming the ``data.augment.*`` key.

    Example::

        augment = BatchAugment(crop_padding=4, flip=0.5)
        images = augment.geometric(uint8_batch, augment.generator(seed=0, epoch=3, batch=7))
    """

    def __init__(
        self,
        crop_padding: int = 0,
        flip: float = 0.0,
        resized_crop_scale: Sequence[float] | None = None,
        resized_crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        self.crop_padding, self.flip, self.erasing = crop_padding, flip, erasing
        self.resized_crop_scale = tuple(resized_crop_scale) if resized_crop_scale else None
        self.resized_crop_ratio = tuple(resized_crop_ratio)
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.label_smoothing = label_smoothing
        self._check()

    def _check(self) -> None:
        def bad(key: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"data.augment.{key}", value, why)

        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int):
            raise bad("crop_padding", self.crop_padding, "expected an integer >= 0 (0: off)")
        if self.crop_padding < 0:
            raise bad("crop_padding", self.crop_padding, "expected an integer >= 0 (0: off)")
        for key in ("flip", "erasing", "label_smoothing"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise bad(key, value, "expected a probability between 0 and 1")
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise bad(key, value, "expected a Beta concentration >= 0 (0: off; 0.2-1 usual)")
        scale, ratio = self.resized_crop_scale, self.resized_crop_ratio
        if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise bad(
                "resized_crop_scale", list(scale), "expected [min, max] with 0 < min <= max <= 1"
            )
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise bad("resized_crop_ratio", list(ratio), "expected [min, max] with 0 < min <= max")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> BatchAugment:
        """From the ``data.augment`` mapping (None or ``{}``: no augmentation)."""
        return cls(**{k: v for k, v in (config or {}).items() if v is not None})

    @property
    def active(self) -> bool:
        return self.geometric_active or self.erasing > 0 or self.soft_targets

    @property
    def geometric_active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.resized_crop_scale)

    @property
    def soft_targets(self) -> bool:
        return bool(self.mixup_alpha or self.cutmix_alpha or self.label_smoothing)

    @staticmethod
    def generator(seed: int, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
        """The CPU generator all random parameters of one batch are drawn from."""
        return torch.Generator().manual_seed(batch_seed(seed, rank, epoch, batch))

    # -- on the uint8 batch, before scaling ---------------------------------------------------
    def geometric(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Crop (padded or resized) and flip each image of a ``(B, C, H, W)`` batch."""
        if self.resized_crop_scale:
            boxes = resized_crop_boxes(images.shape, self.resized_crop_scale,
                                       self.resized_crop_ratio, generator)  # fmt: skip
            images = resized_crop(images, boxes)
        if self.crop_padding:
            images = padded_crop(images, self.crop_padding, generator)
        if self.flip:
            flip = torch.rand(images.shape[0], generator=generator) < self.flip
            images = torch.where(
                flip.to(images.device)[:, None, None, None], images.flip(-1), images
            )
        return images

    # -- on the scaled batch ------------------------------------------------------------------
    def mix(
        self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random erasing, then MixUp/CutMix and label smoothing (soft targets)."""
        if self.erasing:
            images = random_erasing(images, self.erasing, generator)
        if not self.soft_targets:
            return images, labels
        if self.mixup_alpha or self.cutmix_alpha:
            images, targets = _mixup_cutmix(
                images, labels, num_classes, self.mixup_alpha, self.cutmix_alpha, generator
            )
        else:
            targets = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        return images, targets

    def worker_transform(self, size: Sequence[int]) -> Any:
        """The geometric part as torchvision.transforms.v2, for images decoded in workers."""
        from torchvision.transforms import v2

        steps = []
        if self.resized_crop_scale:
            steps.append(v2.RandomResizedCrop(list(size), self.resized_crop_scale,
                                              self.resized_crop_ratio, antialias=True))  # fmt: skip
        if self.crop_padding:
            steps.append(v2.RandomCrop(list(size), padding=self.crop_padding))
        if self.flip:
            steps.append(v2.RandomHorizontalFlip(self.flip))
        return v2.Compose(steps) if steps else None


def padded_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """``RandomCrop(size, padding)`` per sample: zero-pad, then crop at a random (top, left)."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, [padding] * 4)
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    return crop_at(padded, top, left, h, w)


def crop_at(images: Tensor, top: Tensor, left: Tensor, h: int, w: int) -> Tensor:
    """Crop an ``h x w`` box at each sample's own (top, left), by one gather."""
    device = images.device
    rows = (top[:, None] + torch.arange(h))[:, None, :, None].to(device)
    cols = (left[:, None] + torch.arange(w))[:, None, None, :].to(device)
    batch = torch.arange(images.shape[0], device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return images[batch, channel, rows, cols]


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> Tensor:
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=g)


def resized_crop_boxes(
    shape: Sequence[int], scale: Sequence[float], ratio: Sequence[float], g: torch.Generator
) -> Tensor:
    """``RandomResizedCrop.get_params`` for every sample at once: ``(B, 4)`` rows of
    (top, left, height, width); 10 tries each, then the central crop of the clamped ratio."""
    b, h, w = shape[0], shape[-2], shape[-1]
    area = _uniform((b, ATTEMPTS), scale[0], scale[1], g) * h * w
    aspect = torch.exp(_uniform((b, ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), g))
    bw = torch.sqrt(area * aspect).round().long()
    bh = torch.sqrt(area / aspect).round().long()
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = fits.long().argmax(1)  # the first try that fits
    bh, bw = bh.gather(1, first[:, None])[:, 0], bw.gather(1, first[:, None])[:, 0]
    top = (torch.rand(b, generator=g, dtype=torch.float64) * (h - bh + 1)).floor().long()
    left = (torch.rand(b, generator=g, dtype=torch.float64) * (w - bw + 1)).floor().long()
    # torchvision's fallback: the largest central box whose ratio is within `ratio`
    in_ratio = w / h
    cw, ch = (w, round(w / ratio[0])) if in_ratio < ratio[0] else (w, h)
    if in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    none = ~fits.any(1)
    bh, bw = torch.where(none, ch, bh), torch.where(none, cw, bw)
    top = torch.where(none, (h - ch) // 2, top)
    left = torch.where(none, (w - cw) // 2, left)
    return torch.stack([top, left, bh, bw], 1)


def resized_crop(images: Tensor, boxes: Tensor) -> Tensor:
    """Each sample's box resized back to the image size (bilinear, antialiased), by
    torchvision's ``resized_crop`` one sample at a time (boxes differ in size)."""
    from torchvision.transforms.v2 import functional as TF

    size = list(images.shape[-2:])
    return torch.stack([
        TF.resized_crop(image, *box.tolist(), size, antialias=True)
        for image, box in zip(images, boxes, strict=True)
    ])  # fmt: skip


def random_erasing(images: Tensor, p: float, g: torch.Generator) -> Tensor:
    """``RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)`` per sample."""
    b, _, h, w = images.shape
    erase = torch.rand(b, generator=g) < p
    area = _uniform((b, ATTEMPTS), 0.02, 0.33, g) * h * w
    aspect = torch.exp(_uniform((b, ATTEMPTS), math.log(0.3), math.log(3.3), g))
    bh = torch.sqrt(area * aspect).round().long()
    bw = torch.sqrt(area / aspect).round().long()
    fits = (bh < h) & (bw < w)
    first = fits.long().argmax(1)
    bh, bw = bh.gather(1, first[:, None])[:, 0], bw.gather(1, first[:, None])[:, 0]
    top = (torch.rand(b, generator=g, dtype=torch.float64) * (h - bh + 1)).floor().long()
    left = (torch.rand(b, generator=g, dtype=torch.float64) * (w - bw + 1)).floor().long()
    erase &= fits.any(1)  # torchvision leaves the image as it is when no try fits
    rows, cols = torch.arange(h), torch.arange(w)
    inside_r = (rows >= top[:, None]) & (rows < (top + bh)[:, None])
    inside_c = (cols >= left[:, None]) & (cols < (left + bw)[:, None])
    mask = (inside_r[:, :, None] & inside_c[:, None, :] & erase[:, None, None])[:, None]
    return images.masked_fill(mask.to(images.device), 0)


def _mixup_cutmix(
    images: Tensor, labels: Tensor, num_classes: int, mixup: float, cutmix: float,
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """torchvision.transforms.v2's MixUp/CutMix (one lambda per batch, the batch mixed with
    itself rolled by one), their global random draws taken from this batch's seed."""
    from torchvision.transforms import v2

    choices = [t for t, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha]
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):  # both draw from the CPU generator only
        torch.manual_seed(seed)
        pick = choices[int(torch.randint(len(choices), (1,)))]
        transform = pick(alpha=mixup if pick is v2.MixUp else cutmix, num_classes=num_classes)
        return transform(images, labels)


def log_augmented_batch(trainer: Any, images: Tensor) -> None:
    """Write a grid of the first images of an augmented batch to each TensorBoard logger
    (tag ``augment/batch``), each image stretched to its own value range."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torchvision.utils import make_grid

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers or not trainer.is_global_zero:
        return
    shown = images[:SHOWN].detach().float().cpu()
    grid = make_grid(shown, nrow=8, normalize=True, scale_each=True, pad_value=1.0)
    for logger in loggers:
        logger.experiment.add_image(TB_TAG, grid, trainer.global_step)
