"""Variants of a norm layer class that a conversion needs, made on demand: the layer followed by
the activation of the layer it replaced (``ThenChildren``: timm's ``BatchNormAct2d`` ->
``BatchNorm2dAct``), and a 2d layer in place of one that took another input layout
(``ChannelsFirst``: ``(N, C, *)`` of any rank; ``ChannelsLast``: ``(..., C)``)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class ThenChildren(nn.Module):
    """Mixin: the layer's forward, then each child module in order (an activation kept from a
    replaced norm+activation layer such as timm's ``BatchNormAct2d``)."""

    applies_children = True

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        for child in self.children():
            x = child(x)
        return x


class ChannelsFirst(nn.Module):
    """Mixin: a 2d norm layer (input ``(N, C, H, W)``) in place of a layer that took ``(N, C, *)``
    of another rank: the input is seen as ``(N, C, L, 1)`` and given back in its own shape."""

    channels_last = False

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.movedim(-1, 1)
        shape = x.shape
        if x.dim() != 4:
            x = x.reshape(shape[0], shape[1], -1, 1)
        x = super().forward(x).reshape(shape)
        return x.movedim(1, -1) if self.channels_last else x


class ChannelsLast(ChannelsFirst):
    """Mixin: a norm layer over dimension 1 in place of a channels-last ``nn.LayerNorm`` (input
    ``(..., C)``, e.g. ConvNeXt's NHWC blocks): channels are moved to dimension 1 and back."""

    channels_last = True


_VARIANTS: dict[tuple[type, type], type] = {}


def variant(mixin: type, base: type) -> type:
    """``class <prefix><base>(mixin, base)``, made once and importable from this module (so
    ``copy.deepcopy`` and pickle find it)."""
    if issubclass(base, mixin):
        return base
    if (mixin, base) not in _VARIANTS:
        name = {ThenChildren: f"{base.__name__}Act", ChannelsFirst: f"AnyRank{base.__name__}"}.get(
            mixin, f"ChannelsLast{base.__name__}"
        )
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        cls.__doc__ = f"``{base.__name__}`` with the ``{mixin.__name__}`` mixin."
        globals()[name] = _VARIANTS[mixin, base] = cls
    return _VARIANTS[mixin, base]


BatchNorm2dAct = variant(ThenChildren, nn.BatchNorm2d)
GroupNormAct = variant(ThenChildren, nn.GroupNorm)


def keep_children(old: nn.Module, new: nn.Module) -> nn.Module:
    """Move the child modules of a replaced norm layer (timm's ``BatchNormAct2d`` holds ``drop``
    and ``act``) onto ``new``, which applies them after normalizing, so replacing the norm keeps
    the activation; and give ``new`` the input layout of ``old`` (a ``ChannelsLast`` layer stays
    channels-last). ``new`` is returned unchanged when ``old`` is a plain layer without
    children; an ``nn.Identity`` becomes the children themselves."""
    children = list(old.named_children())
    if isinstance(new, nn.Identity):
        if not children:
            return new
        # nn.Sequential takes named modules only as an OrderedDict (a plain dict is refused)
        return nn.Sequential(OrderedDict(children)) if len(children) > 1 else children[0][1]
    if isinstance(old, ChannelsFirst):
        new.__class__ = variant(ChannelsLast if old.channels_last else ChannelsFirst, type(new))
    if children and not getattr(new, "applies_children", False):
        new.__class__ = variant(ThenChildren, type(new))
    for name, child in children:
        new.add_module(name, child)
    return new
