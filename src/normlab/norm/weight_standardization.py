"""Weight-standardized convolutions (Qiao et al. 2019, arXiv:1903.10520), which BiT pairs with
GroupNorm (Kolesnikov et al. 2020, arXiv:1912.11370): ``norm=gn_ws``."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from normlab.norm.layers import is_norm_layer

log = logging.getLogger("normlab")


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
    are unaffected). "Feeds" is the rule BatchNorm folding uses (``normlab.norm.fold``, traced
    with torch.fx): the norm layer's input is the conv's output and nothing else reads it, as
    conv -> norm in the ConvNet, in ResNet's blocks and downsample paths. A conv whose output is
    not normalized keeps its plain weights (standardizing would change its output scale), and
    subclasses of ``nn.Conv2d`` (timm's ``StdConv2d``, ``Conv2dSame``) are left as they are. A
    model torch.fx cannot trace keeps all its convs (logged).

    Returns the qualified names of the converted convolutions (also logged).
    """
    from normlab.norm.fold import feeding_convs

    modules = dict(model.named_modules())
    norms = [name for name, m in modules.items() if is_norm_layer(m)]
    pairs = feeding_convs(model, norms, purpose="norm=gn_ws: no conv weight-standardized")
    converted = sorted(c for c in pairs.values() if type(modules[c]) is nn.Conv2d)
    for name in converted:
        modules[name].__class__ = WSConv2d
    total = sum(isinstance(m, nn.Conv2d) for m in modules.values())
    log.info(
        "norm=gn_ws: %d of %d Conv2d layers weight-standardized (WSConv2d: those feeding a norm)",
        len(converted),
        total,
    )
    return converted
