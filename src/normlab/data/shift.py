"""A covariate shift of the test images (``data.test_shift``), for test-time adaptation
experiments (``experiment=shift``): the same images and labels, with other pixel statistics."""

from __future__ import annotations

import torch

SHIFT_KEYS = ("brightness", "contrast", "noise")


def shift_images(
    images: torch.Tensor,
    brightness: float = 0.0,
    contrast: float = 1.0,
    noise: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """uint8 images with their pixels ``p`` in [0, 1] replaced by
    ``clamp((p - 0.5) * contrast + 0.5 + brightness + noise * N(0, 1), 0, 1)``, the noise
    fixed by ``seed``, rounded back to uint8.

    Example::

        shifted = shift_images(test_x, brightness=0.3, contrast=0.5)  # brighter, flatter
    """
    pixels = images.float() / 255
    pixels = (pixels - 0.5) * contrast + 0.5 + brightness
    if noise:
        generator = torch.Generator().manual_seed(seed)
        pixels = pixels + noise * torch.randn(pixels.shape, generator=generator)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
