"""A norm-agnostic CNN: it receives a norm-layer factory and never branches on the norm type."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from normlab.models.defaults import ACTIVATIONS as NAMES

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
assert tuple(ACTIVATIONS) == NAMES  # the names config.py checks, torch-free


class ConvNet(nn.Module):
    """``len(widths)`` stages of ``blocks_per_stage`` x (conv3x3 -> norm -> activation), 2x2
    max-pooling between stages, global average pooling, dropout and a linear classifier.

    The architecture's defaults live in ``normlab.models.defaults.ConvNetConfig`` (the CLI's
    ``model=cnn`` and ``NormLabModule``'s Python API both use them).

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        norm_layer: ``norm_layer(channels) -> nn.Module`` (``nn.Identity`` for no normalization).
        conv_bias: give convolutions a bias; pass False when the norm layer adds beta anyway.
        widths: output channels of each stage.
        blocks_per_stage: conv blocks per stage (depth).
        activation: a key of ``ACTIVATIONS``.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        widths: Sequence[int],
        blocks_per_stage: int,
        activation: str,
        dropout: float,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        conv_bias: bool = True,
    ) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            for _ in range(blocks_per_stage):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=conv_bias),
                    norm_layer(width),
                    act(),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))
