"""A user's own network: any nn.Module whose constructor takes num_classes and in_channels."""

from __future__ import annotations

from torch import Tensor, nn


class SmallNet(nn.Module):
    """Two conv -> BatchNorm -> ReLU blocks and a linear classifier. normlab passes
    ``num_classes`` and ``in_channels`` (from the data) and converts every BatchNorm to the
    ``norm`` of the command line, keeping the names ``block1.bn``, ``block2.bn``."""

    def __init__(self, num_classes: int, in_channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.block1 = nn.Sequential()
        self.block1.add_module("conv", nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False))
        self.block1.add_module("bn", nn.BatchNorm2d(hidden))
        self.block1.add_module("act", nn.ReLU())
        self.block2 = nn.Sequential()
        self.block2.add_module("conv", nn.Conv2d(hidden, hidden, 3, padding=1, bias=False))
        self.block2.add_module("bn", nn.BatchNorm2d(hidden, eps=1e-3))
        self.block2.add_module("act", nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(x))
        return self.head(x.mean((2, 3)))
