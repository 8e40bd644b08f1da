"""Weight-standardized convolutions (Qiao et al. 2019, arXiv:1903.10520), which BiT pairs with
GroupNorm (Kolesnikov et al. 2020, arXiv:1912.11370): ``norm=gn_ws``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.norm.layers import is_norm_layer


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves with its weight standardized per output channel:
    ``W' = (W - mean) / sqrt(var + ws_eps)``, mean and (biased) variance over each output channel's
    ``in_channels/groups * kH * kW`` weights. The stored ``weight`` (and ``bias``) stay the raw,
    learned parameters, so the state_dict keys and values are those of ``nn.Conv2d``.

    ``ws_eps`` is 1e-6, as timm's ``StdConv2d``. No state beyond nn.Conv2d's: train/eval, DDP and
    checkpoints behave as for the plain convolution.

    Example::

        conv = WSConv2d(3, 16, 3, padding=1)
        standardize_convs(model)  # every plain Conv2d that feeds a norm layer
    """

    ws_eps: float = 1e-6

    def standardized_weight(self) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        return (self.weight - mean) * (var + self.ws_eps).rsqrt()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ws_eps={self.ws_eps}"


def standardize_convs(model: nn.Module) -> list[str]:
    """Turn, in place, every plain ``nn.Conv2d`` of ``model`` that feeds a normalization layer into
    a ``WSConv2d`` (the same module object and parameters, so an optimizer and the state_dict keys
    are unaffected). "Feeds": the next layer in registration order (``named_modules()``, a norm
    layer counting as one layer with its children) is a norm layer, as conv -> norm in the
    ConvNet, in ResNet's blocks and downsample paths, in ConvNeXt. A conv whose output is not
    normalized keeps its plain weights (standardizing would change its output scale), and
    subclasses of ``nn.Conv2d`` (timm's ``StdConv2d``, ``Conv2dSame``) are left as they are.

    Returns the qualified names of the converted convolutions.
    """
    layers: list[tuple[str, nn.Module]] = []
    skip = ""  # the prefix of a norm layer's children (timm's BatchNormAct2d holds its act)
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if is_norm_layer(m):
            skip = f"{name}."
            layers.append((name, m))
        elif not any(True for _ in m.children()):
            layers.append((name, m))
    converted = []
    for (name, m), (_, after) in zip(layers, layers[1:], strict=False):
        if type(m) is nn.Conv2d and is_norm_layer(after):
            m.__class__ = WSConv2d
            converted.append(name)
    return converted
