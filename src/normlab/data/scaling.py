"""Per-channel feature scaling: put every input channel on the same footing.

A scaled pixel is ``(x / 255 - mean[c]) / std[c]``, with mean/std in [0, 1] pixel units. The
statistics come from the training split only (``dataset``), from ImageNet (``imagenet``, RGB
only), from the user (``custom``) or are the identity (``none``: raw pixels in [0, 1]).
Scaling runs on whole batches on the device, never per sample in Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W), in [0, 1] units.

    Accumulates in float64 chunk by chunk, so a 50k-image data set never becomes one float copy.
    """
    if images.ndim != 4 or images.numel() == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    return channel_stats_of_batches(
        images[start : start + chunk] for start in range(0, images.shape[0], chunk)
    )


def channel_stats_of_batches(
    batches: Iterable[torch.Tensor],
) -> tuple[list[float], list[float]]:
    """:func:`channel_stats` of the concatenation of uint8 batches (N_i, C, H, W), without ever
    holding them together: the streaming path feeds it DataLoader batches decoded in workers."""
    total = total_sq = None
    count = 0
    for batch in batches:
        x = batch.to(torch.float64).div_(255.0)
        if total is None:
            total = torch.zeros(x.shape[1], dtype=torch.float64)
            total_sq = torch.zeros_like(total)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
        count += x.numel() // x.shape[1]
    if total is None or count == 0:
        raise ValueError("channel statistics need at least one non-empty batch")
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return mean.tolist(), var.sqrt().tolist()


def resolve_scaling(
    mode: str,
    train_batches: Iterable[torch.Tensor] | None,
    num_channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[list[float], list[float]]:
    """Return the (mean, std) that ``data.scaling=mode`` means for this data. ``train_batches``
    (uint8 chunks of the training split) is iterated only for ``dataset``, so it can be lazy."""
    if mode == "dataset":
        if train_batches is None:
            raise ValueError("data.scaling=dataset needs the training split")
        return channel_stats_of_batches(train_batches)
    if mode == "imagenet":
        if num_channels != 3:
            raise ValueError(f"data.scaling=imagenet needs 3 channels, the data has {num_channels}")
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if mode == "none":
        return [0.0] * num_channels, [1.0] * num_channels
    if mode == "custom":
        if mean is None or std is None or len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(
                f"data.scaling=custom needs data.mean and data.std of {num_channels} values"
            )
        return [float(v) for v in mean], [float(v) for v in std]
    raise ValueError(f"data.scaling={mode!r}: choose dataset, imagenet, none or custom")


class FeatureScaler:
    """Maps a uint8 batch (N, C, H, W) to float32 ``(x / 255 - mean) / std`` on x's device.

    Written as one fused multiply-add with per-channel ``scale = 1 / (255 std)`` and
    ``shift = -mean / std``; the constants are moved to each device once and cached.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        std64 = torch.tensor(self.std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std64)).float().view(1, -1, 1, 1)
        self._shift = (
            (-torch.tensor(self.mean, dtype=torch.float64) / std64).float().view(1, -1, 1, 1)
        )
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"FeatureScaler expects uint8 images, got {images.dtype}")
        if images.device not in self._cache:
            self._cache[images.device] = (
                self._scale.to(images.device),
                self._shift.to(images.device),
            )
        scale, shift = self._cache[images.device]
        return torch.addcmul(shift, images.float(), scale)
