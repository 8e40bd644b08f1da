"""The source side of a norm conversion: find every normalization layer of any ``nn.Module`` by
kind, replace it by a target layer built for its channel count, carry what both layers hold, and
say in one log line per kind what was kept and what was dropped.

The targets come from ``normlab.norm.registry`` (``CONSTRUCTORS``); nothing here knows their
list, so a new norm is one registry entry. Source kinds (``source_kind``):

- BatchNorm: ``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's ``BatchNormAct2d``;
- FrozenBatchNorm: normlab's, torchvision's and timm's ``FrozenBatchNorm2d`` (and timm's
  ``FrozenBatchNormAct2d``);
- GroupNorm: ``nn.GroupNorm`` and its subclasses (timm's ``GroupNormAct``, ``GroupNorm1``);
- channels-first LayerNorm: an ``nn.LayerNorm`` subclass whose class name has ``2d`` (timm's
  ``LayerNorm2d``, ``LayerNormAct2d``: they permute NCHW themselves);
- channels-last LayerNorm: any other ``nn.LayerNorm`` over one dimension, the last one (ConvNeXt's
  blocks after a permute to NHWC, a transformer's tokens); its replacement is wrapped so that it
  sees the channels at dimension 1 (``ChannelsLast``);
- InstanceNorm: ``nn.InstanceNorm1d/2d/3d``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.norm.layers import FrozenBatchNorm2d, channels_of, is_frozen_batchnorm
from normlab.norm.variants import ChannelsFirst, ChannelsLast, keep_children, variant

# inputs a source kind accepts: (N, C, H, W) only; (N, C, *) of any rank; (..., C) channels last
NCHW, ANY_RANK, LAST = "nchw", "any rank", "channels last"
_ANY_RANK_TYPES = (nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d)
_ANY_RANK_TYPES += (nn.InstanceNorm3d,)
# classes that compute plain BatchNorm (+ activation): one another's equals for a conversion
_BATCHNORMS = {f"BatchNorm{d}d" for d in (1, 2, 3)} | {"SyncBatchNorm", "_BatchNormXd"}
_BATCHNORMS |= {"BatchNormAct2d", "SyncBatchNormAct"}


def source_kind(m: nn.Module) -> tuple[str, str] | None:
    """``(kind, layout)`` of a normalization layer normlab converts, None for anything else.
    ``kind`` names the computation (``BatchNorm``, ``FrozenBatchNorm``, ``GroupNorm``,
    ``LayerNorm2d``, ``LayerNorm``, ``InstanceNorm``); ``layout`` the inputs it takes."""
    name = type(m).__name__
    if is_frozen_batchnorm(m) or name == "FrozenBatchNormAct2d":
        return "FrozenBatchNorm", NCHW
    if isinstance(m, _BatchNorm):
        return "BatchNorm", ANY_RANK if isinstance(m, _ANY_RANK_TYPES) else NCHW
    if isinstance(m, _InstanceNorm):
        return "InstanceNorm", ANY_RANK if isinstance(m, _ANY_RANK_TYPES) else NCHW
    if isinstance(m, nn.GroupNorm):
        return "GroupNorm", NCHW
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return ("LayerNorm2d", NCHW) if "2d" in name else ("LayerNorm", LAST)
    return None


def _plain_name(m: nn.Module) -> str:
    """The class a user wrote, without normlab's mixin variants."""
    for cls in type(m).__mro__:
        if cls.__module__ != variant.__module__:
            return cls.__name__
    return type(m).__name__


def _math(m: nn.Module) -> tuple[str, str]:
    """What a layer computes, for 'is it the target already': the kind and its settings, with
    norm+activation and rank variants counted as their norm."""
    name = "BatchNorm" if _plain_name(m) in _BATCHNORMS else _plain_name(m)
    if is_frozen_batchnorm(m) and not isinstance(m, FrozenBatchNorm2d):
        name = "foreign " + name  # torchvision's/timm's: always replaced by normlab's
    return name, m.extra_repr()


def _own_tensors(m: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in m.state_dict(keep_vars=True).items() if "." not in k}


def carry(old: nn.Module, new: nn.Module, keep_affine: bool | None) -> list[str]:
    """Copy into ``new`` what ``old`` holds and ``new`` can take (same name and shape): the running
    statistics always, gamma/beta (``weight``/``bias``) when ``keep_affine`` is true, or when it is
    None and the running statistics came along or both compute the same thing. Returns the names
    of ``old``'s own tensors that were not carried."""
    mine, theirs = _own_tensors(new), _own_tensors(old)
    fits = {k for k in theirs if k in mine and mine[k].shape == theirs[k].shape}
    stats = {"running_mean", "running_var"} <= fits
    if keep_affine is None:
        keep_affine = stats or _plain_name(old) == _plain_name(new)
    take = {k for k in fits if k.startswith("running_") or k == "num_batches_tracked"}
    take |= {k for k in fits if k in ("weight", "bias") and keep_affine}
    if take:
        with torch.no_grad():
            for k in take:
                mine[k].copy_(theirs[k])
    return sorted(set(theirs) - take)


@dataclass
class Conversion:
    """What happened to the layers of one (source class, target class) pair."""

    source: str
    target: str
    layers: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    carried: set[str] = field(default_factory=set)  # tensor names carried into the new layers
    settings: set[str] = field(default_factory=set)  # eps/momentum: those the new layers have
    kept: bool = False  # already the target: left in place

    def describe(self, settings: list[str], folded: int = 0) -> str:
        """``20 BatchNorm2d -> FrozenBatchNorm2d (kept: eps, momentum, ...); 5 tensors dropped:
        ...``; ``settings``: the settings the new layers inherited."""
        n, what = len(self.layers), f"{len(self.layers)} {self.source}"
        if self.kept:
            return f"{what} kept as they are (already the configured norm)"
        kept = list(settings) if self.target != "Identity" else []
        kept += ["running statistics"] if "running_mean" in self.carried else []
        kept += ["gamma/beta"] if "weight" in self.carried else []
        line = f"{what} -> {self.target}" + (f" (kept: {', '.join(kept)})" if kept else "")
        if folded:
            line += f"; {folded} of {n} folded into the conv that feeds them (eval output kept)"
        if not self.dropped:
            return line + "; no tensor dropped"
        shown = ", ".join(self.dropped[:6]) + (", ..." if len(self.dropped) > 6 else "")
        return line + f"; {len(self.dropped)} tensors dropped: {shown}"


def replace_norm_layers(
    model: nn.Module,
    build: Callable[[str, nn.Module], nn.Module],
    keep_affine: bool | None,
    select: Callable[[str, nn.Module], bool] = lambda n, m: True,
) -> tuple[nn.Module, dict[tuple[str, str], Conversion]]:
    """Replace every normalization layer of ``model`` that ``select`` accepts by
    ``build(name, layer)`` (placed on its device and dtype, in its train/eval mode, with its
    children and the tensors :func:`carry` moves), unless the built layer computes exactly what
    the old one does (then the old one stays). Returns the model (a new module only when the root
    is replaced) and what happened, per (source class, target class)."""
    from normlab.norm.layers import replace_modules

    report: dict[tuple[str, str], Conversion] = {}

    def swap(name: str, m: nn.Module) -> nn.Module | None:
        kind = source_kind(m)
        if kind is None or not select(name, m):
            return None
        new = build(name, m)
        key = (_plain_name(m), _plain_name(new))
        entry = report.setdefault(key, Conversion(*key))
        entry.layers.append(name)
        own = {k for k in ("eps", "momentum") if getattr(new, k, None) is not None}
        entry.settings |= own | ({"momentum"} if hasattr(new, "source_momentum") else set())
        if _math(new) == _math(m):
            entry.kept = True
            return m
        ref = next((t for t in _own_tensors(m).values() if t.is_floating_point()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        dropped = carry(m, new, keep_affine)
        entry.carried |= set(_own_tensors(m)) - set(dropped)
        entry.dropped += [f"{name}.{k}" if name else k for k in dropped]
        if not isinstance(new, nn.Identity) and kind[1] != NCHW:
            new.__class__ = variant(ChannelsLast if kind[1] == LAST else ChannelsFirst, type(new))
        return keep_children(m, new.train(m.training))

    return replace_modules(model, swap), report


def channels(m: nn.Module) -> int:
    """The channel count of any normalization layer :func:`source_kind` knows."""
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[0])
    return channels_of(m)


def settings_of(m: nn.Module) -> dict[str, Any]:
    """The settings a converted layer inherits from ``m`` where the config leaves them unset:
    eps, momentum (a frozen layer's ``source_momentum``), affine (whether it has gamma), and
    ``track_running_stats`` from BatchNorm only (an InstanceNorm's False is no statement about
    what a BatchNorm replacing it should do)."""
    own: dict[str, Any] = {"affine": getattr(m, "weight", None) is not None}
    if isinstance(getattr(m, "eps", None), float):
        own["eps"] = m.eps
    if hasattr(m, "source_momentum") or hasattr(m, "momentum"):
        own["momentum"] = getattr(m, "source_momentum", getattr(m, "momentum", None))
    if isinstance(m, _BatchNorm) or is_frozen_batchnorm(m):
        own["track_running_stats"] = getattr(m, "running_mean", None) is not None
    return own
