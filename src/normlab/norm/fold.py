"""Fold BatchNorm's eval-mode transform into the convolution that feeds it, so that removing the
norm (``norm=none``, ``norm.fold=true``) keeps what a trained model computes in eval mode.

In eval mode a BatchNorm layer is ``y = x * scale + shift`` per channel, with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``. When
``x`` is the output of a convolution and nothing else reads that output, the conv can compute
``y`` itself: its weight times ``scale`` (per output channel), its bias ``bias * scale + shift``
(a conv without bias gets one).

The rule for "the conv that feeds it", found by tracing the model with ``torch.fx`` (norm
layers are traced as single calls): the norm layer's input is the output of an ``nn.Conv1d/2d/3d``
module call, that output has no other reader, and the conv and the norm are each called once
in the forward (a module called twice shares its weights between two places). Anything else
(a model torch.fx cannot trace, a norm after a pooling, an addition or a permute, a layer
without running statistics) is not folded, and the conversion's log line says how many were.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection

import torch
from torch import nn

log = logging.getLogger("normlab")

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def feeding_convs(
    model: nn.Module, norms: Collection[str], purpose: str = "norm.fold: nothing folded"
) -> dict[str, str]:
    """``{norm layer name: conv name}`` for each of the layers ``norms`` (names from
    ``named_modules()``) fed by a conv alone, by the rule in this module's docstring. Empty when
    torch.fx cannot trace ``model`` (logged, ending with ``purpose``: what is not done)."""
    import torch.fx

    wanted = set(norms)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in wanted or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as err:  # any Python the tracer cannot follow: fold nothing, say why
        reason = str(err).splitlines()[0][:160] if str(err) else ""
        log.warning("torch.fx cannot trace %s (%s: %s); %s",
                    type(model).__name__, type(err).__name__, reason, purpose)  # fmt: skip
        return {}
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted or not node.args:
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], CONVS)
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
        ):
            pairs[node.target] = source.target
    return pairs


def fold_into_conv(conv: nn.Module, norm: nn.Module) -> bool:
    """Make ``conv`` compute ``norm(conv(x))`` of eval mode, in place; ``norm`` is left as it is
    (the caller removes it). False, and nothing changed, for a norm without running statistics
    or a conv whose output channels differ from the norm's."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if mean is None or var is None or conv.out_channels != mean.shape[0]:
        return False
    with torch.no_grad():
        scale = (var.double() + norm.eps).rsqrt()
        shift = -mean.double() * scale
        if getattr(norm, "weight", None) is not None:
            scale, shift = scale * norm.weight.double(), shift * norm.weight.double()
            shift = shift + norm.bias.double()
        weight = conv.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.copy_((weight.double() * scale.reshape(shape)).to(weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(weight.dtype))
        else:
            conv.bias.copy_((conv.bias.double() * scale + shift).to(conv.bias.dtype))
    return True
