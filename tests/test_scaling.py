"""Feature scaling by hand: channel statistics, the four data.scaling modes and the scaler's
arithmetic, each checked against values worked out from the definition
``(x / 255 - mean[c]) / std[c]`` (mutation testing found these unchecked: docs/development.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from normlab.data.scaling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureScaler,
    channel_stats,
    channel_stats_of_batches,
    resolve_scaling,
)


def _two_channel_images() -> torch.Tensor:
    # channel 0: pixels 0, 255, 255, 255 -> 0, 1, 1, 1: mean 3/4, variance 3/4 - (3/4)^2 = 3/16
    # channel 1: pixels 51 everywhere -> 0.2: mean 0.2, variance 0
    images = torch.full((2, 2, 1, 2), 51, dtype=torch.uint8)
    images[:, 0] = torch.tensor([[[0, 255]], [[255, 255]]], dtype=torch.uint8)
    return images


def test_channel_stats_by_hand() -> None:
    mean, std = channel_stats(_two_channel_images())
    assert mean == pytest.approx([0.75, 0.2], abs=1e-12)
    assert std == pytest.approx([math.sqrt(3 / 16), 0.0], abs=1e-12)
    # chunked (one image a chunk) and streamed batches give the same numbers
    chunked = channel_stats(_two_channel_images(), chunk=1)
    batches = [_two_channel_images()[:1], _two_channel_images()[1:]]
    streamed = channel_stats_of_batches(iter(batches))
    for m, s in (chunked, streamed):
        assert m == pytest.approx(mean, abs=1e-12) and s == pytest.approx(std, abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 2, 2), (0, 1, 2, 2)], ids=["3d", "empty"])
def test_channel_stats_refuses_a_tensor_that_is_not_a_batch_of_images(shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"expected a non-empty \(N, C, H, W\) tensor, got "):
        channel_stats(torch.zeros(shape, dtype=torch.uint8))
    only = "^channel statistics need at least one non-empty batch$"
    with pytest.raises(ValueError, match=only):
        channel_stats_of_batches(iter([]))
    with pytest.raises(ValueError, match=only):  # batches, but none with a pixel
        channel_stats_of_batches(iter([torch.zeros(0, 2, 1, 1, dtype=torch.uint8)]))


def test_channel_stats_of_a_single_pixel() -> None:
    # one pixel a channel (51 -> 0.2, 255 -> 1): its value, spread 0
    mean, std = channel_stats(torch.tensor([[[[51]], [[255]]]], dtype=torch.uint8))
    assert mean == pytest.approx([0.2, 1.0]) and std == [0.0, 0.0]


def test_scaling_modes_mean_what_the_docs_say() -> None:
    images = _two_channel_images()
    mean, std = resolve_scaling("dataset", iter([images]), 2)
    assert mean == pytest.approx([0.75, 0.2]) and std == pytest.approx([math.sqrt(3 / 16), 0])
    assert resolve_scaling("imagenet", None, 3) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert resolve_scaling("none", None, 2) == ([0.0, 0.0], [1.0, 1.0])
    assert resolve_scaling("custom", None, 2, mean=[1, 0.5], std=[2, 0.25]) == (
        [1.0, 0.5],
        [2.0, 0.25],
    )


CUSTOM = "data.scaling=custom needs data.mean and data.std of 2 values"


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("dataset", None, 1), {}, "data.scaling=dataset needs the training split"),
        (("imagenet", None, 1), {}, "data.scaling=imagenet needs 3 channels, the data has 1"),
        (("custom", None, 2), {"std": [1, 1]}, CUSTOM),
        (("custom", None, 2), {"mean": [0, 0]}, CUSTOM),
        (("custom", None, 2), {"mean": [0], "std": [1, 1]}, CUSTOM),
        (("custom", None, 2), {"mean": [0, 0], "std": [1]}, CUSTOM),
        (
            ("zscore", None, 2),
            {},
            "data.scaling='zscore': choose dataset, imagenet, none or custom",
        ),
    ],
)
def test_scaling_refusals_name_the_key_and_the_fix(args: tuple, kwargs: dict, message: str) -> None:
    # the whole message, so that no word of it can change unnoticed
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        resolve_scaling(*args, **kwargs)


def test_feature_scaler_arithmetic_by_hand() -> None:
    # channel 0: mean 0.5, std 0.25: pixel 0 -> (0 - 0.5) / 0.25 = -2, 255 -> 2, 51 -> -1.2
    # channel 1: mean 0, std 1 (none): pixel p -> p / 255
    scaler = FeatureScaler([0.5, 0.0], [0.25, 1.0])
    images = torch.tensor([[[[0, 255, 51]], [[0, 255, 51]]]], dtype=torch.uint8)
    out = scaler(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out[0, 0, 0].tolist() == pytest.approx([-2.0, 2.0, -1.2], abs=1e-6)
    assert out[0, 1, 0].tolist() == pytest.approx([0.0, 1.0, 0.2], abs=1e-6)
    assert scaler(images).equal(out)  # the cached constants give the same result
    assert (scaler.mean, scaler.std) == ([0.5, 0.0], [0.25, 1.0])
    with pytest.raises(TypeError, match="FeatureScaler expects uint8 images, got torch.float32"):
        scaler(images.float())
