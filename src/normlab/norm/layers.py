"""Normalization layers and their conversions on any ``nn.Module``: ``FrozenBatchNorm2d``,
bit-exact conversions between it and BatchNorm, predicates that find norm layers by type, and
norm-aware weight decay groups. The list of norms lives in ``normlab.norm.registry``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.norm.variants import keep_children


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm whose running statistics never change: ``y = x * scale + shift`` with
    ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``.

    Normalizes with ``running_mean``/``running_var`` in ``train()`` and ``eval()`` alike and never
    writes them, so no mode switch can unfreeze it. gamma/beta (``weight``/``bias``) are trainable
    parameters unless ``freeze_affine=True``, which stores them as buffers instead. The state_dict
    keys are exactly those of ``nn.BatchNorm2d`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so checkpoints load in both directions. Any input
    of shape (N, C, ...) works, so it also replaces ``BatchNorm1d``/``BatchNorm3d``.

    ``momentum`` is None (the statistics never update); ``source_momentum`` is the momentum of
    the BatchNorm this layer was converted from, given back by :func:`convert_to_batchnorm` (a
    round trip keeps each layer's own).

    Example::

        frozen = FrozenBatchNorm2d.from_batchnorm(bn)
        frozen = convert_to_frozen(model)  # every BatchNorm in place
    """

    momentum = None  # attributes mirror BatchNorm so inspection tools can print them
    track_running_stats = True
    applies_children = True  # an activation kept from a replaced layer (see keep_children)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        freeze_affine: bool = False,
        affine: bool = True,
        source_momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.source_momentum = num_features, eps, source_momentum
        self.freeze_affine, self.affine = freeze_affine, affine
        if affine and freeze_affine:
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
        elif affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(
        cls, bn: nn.Module, freeze_affine: bool = False, eps: float | None = None
    ) -> FrozenBatchNorm2d:
        """Frozen copy of ``bn`` (any ``_BatchNorm``, or torchvision's ``FrozenBatchNorm2d``) with
        bit-identical values, device and dtype; ``eps`` None keeps ``bn.eps``.

        Trainable gamma/beta are the very ``Parameter`` objects of ``bn`` (an optimizer built before
        the conversion keeps training them); buffers are cloned.
        """
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{bn} has no running statistics (track_running_stats=False) to freeze"
            )
        affine = bn.weight is not None  # torchvision's frozen layer has no `affine` attribute
        momentum = getattr(bn, "momentum", 0.1)
        frozen = cls(
            channels_of(bn), bn.eps if eps is None else eps, freeze_affine, affine, momentum
        )
        rm = bn.running_mean
        frozen.to(device=rm.device, dtype=rm.dtype)
        if affine and (freeze_affine or not isinstance(bn.weight, nn.Parameter)):
            weight, bias = bn.weight.detach().clone(), bn.bias.detach().clone()
            if freeze_affine:
                frozen.weight, frozen.bias = weight, bias
            else:
                frozen.weight, frozen.bias = nn.Parameter(weight), nn.Parameter(bias)
        elif affine:
            frozen.weight, frozen.bias = bn.weight, bn.bias
        frozen.running_mean = rm.clone()
        frozen.running_var = bn.running_var.clone()
        if getattr(bn, "num_batches_tracked", None) is not None:
            frozen.num_batches_tracked = bn.num_batches_tracked.clone()
        return frozen.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        scale = (self.running_var + self.eps).rsqrt()
        shift = -self.running_mean * scale
        if self.weight is not None:
            scale = self.weight * scale
            shift = self.bias + shift * self.weight
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = (x * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)
        for child in self.children():  # kept from a norm+activation layer (see keep_children)
            x = child(x)
        return x

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kw: Any) -> None:
        # Old BatchNorm checkpoints have no num_batches_tracked; accept them as BatchNorm does.
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum=None, affine={self.affine}, "
            f"track_running_stats=True, freeze_affine={self.freeze_affine}"
        )


def replace_modules(
    module: nn.Module, swap: Callable[[str, nn.Module], nn.Module | None]
) -> nn.Module:
    """Walk ``module`` once and replace each submodule for which ``swap(qualified_name, m)``
    returns a module (its children are then not visited); names, hence state_dict keys, stay.
    Returns ``module`` itself unless the root is replaced."""

    def walk(prefix: str, m: nn.Module) -> nn.Module:
        new = swap(prefix, m)
        if new is not None:
            return new
        for name, child in m.named_children():
            converted = walk(f"{prefix}.{name}" if prefix else name, child)
            if converted is not child:
                setattr(m, name, converted)
        return m

    return walk("", module)


def channels_of(m: nn.Module) -> int:
    """The channel count of a BatchNorm-like layer (torchvision's frozen one has no
    ``num_features``, but always a ``running_mean`` buffer)."""
    return m.num_features if hasattr(m, "num_features") else int(m.running_mean.shape[0])


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """Ours or torchvision's ``FrozenBatchNorm2d`` (``torchvision.ops.FrozenBatchNorm2d``)."""
    return isinstance(m, FrozenBatchNorm2d) or (
        type(m).__name__ == "FrozenBatchNorm2d" and hasattr(m, "running_mean")
    )


def convert_to_frozen(
    module: nn.Module, freeze_affine: bool = False, eps: float | None = None
) -> nn.Module:
    """Replace every BatchNorm (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, torchvision's
    ``FrozenBatchNorm2d``) with a bit-exact normlab ``FrozenBatchNorm2d``; ``eps`` None keeps each
    layer's own. Returns ``module`` itself unless the root is a BatchNorm layer.

    Raises:
        ValueError: a BatchNorm without running statistics (``track_running_stats=False``).
    """

    def swap(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, _BatchNorm) or (
            is_frozen_batchnorm(m) and not isinstance(m, FrozenBatchNorm2d)
        ):
            return keep_children(m, FrozenBatchNorm2d.from_batchnorm(m, freeze_affine, eps))
        return None

    return replace_modules(module, swap)


def frozen_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's ``FrozenBatchNorm2d`` layers (saved in checkpoints)."""
    return [name for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]


def freeze_named_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Convert the BatchNorm layers called ``names`` (from ``named_modules()``) to bit-exact
    ``FrozenBatchNorm2d`` in place, e.g. those a checkpoint lists as frozen. Returns the names
    converted now (layers already frozen, or absent, are skipped)."""
    wanted, converted = set(names), []

    def swap(name: str, m: nn.Module) -> nn.Module | None:
        if name not in wanted or not isinstance(m, _BatchNorm):
            return None
        converted.append(name)
        return keep_children(m, FrozenBatchNorm2d.from_batchnorm(m))

    replace_modules(model, swap)
    return converted


def convert_to_batchnorm(module: nn.Module, momentum: float | None | str = "keep") -> nn.Module:
    """Inverse of :func:`convert_to_frozen`: every ``FrozenBatchNorm2d`` becomes a bit-exact
    ``nn.BatchNorm2d`` (trainable gamma/beta, same device and dtype). ``momentum="keep"`` gives
    each layer the momentum of the BatchNorm it was frozen from."""

    def swap(name: str, m: nn.Module) -> nn.Module | None:
        if not is_frozen_batchnorm(m):
            return None
        rm = m.running_mean
        mom = getattr(m, "source_momentum", 0.1) if momentum == "keep" else momentum
        affine = m.weight is not None
        bn = nn.BatchNorm2d(channels_of(m), m.eps, mom, affine, device=rm.device, dtype=rm.dtype)
        if affine:
            keep = isinstance(m.weight, nn.Parameter)
            bn.weight = m.weight if keep else nn.Parameter(m.weight.detach().clone())
            bn.bias = m.bias if keep else nn.Parameter(m.bias.detach().clone())
        bn.running_mean, bn.running_var = rm.clone(), m.running_var.clone()
        if getattr(m, "num_batches_tracked", None) is not None:
            bn.num_batches_tracked = m.num_batches_tracked.clone()
        return keep_children(m, bn.train(m.training))

    return replace_modules(module, swap)


def is_batchnorm(m: nn.Module) -> bool:
    """BatchNorm-like: any ``_BatchNorm`` (incl. ``SyncBatchNorm``) or a ``FrozenBatchNorm2d``
    (normlab's or torchvision's)."""
    return isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name from named_modules(), layer)`` for every BatchNorm-like layer."""
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def is_norm_layer(m: nn.Module) -> bool:
    """BatchNorm-like, GroupNorm, LayerNorm, InstanceNorm or RMSNorm."""
    return is_batchnorm(m) or isinstance(
        m, nn.GroupNorm | nn.LayerNorm | _InstanceNorm | nn.RMSNorm
    )


def param_groups(
    model: nn.Module, weight_decay: float, norm_weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer groups: trainable norm-layer params get ``norm_weight_decay`` (group ``"norm"``),
    the rest ``weight_decay`` (group ``"weights"``), as torchvision references'
    ``set_weight_decay``. Empty groups are omitted."""
    norm: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (norm if is_norm_layer(m) else other).append(p)
    # named groups ("weights", "norm"): LearningRateMonitor and TensorBoard tags use the names
    groups = [
        {"name": "weights", "params": other, "weight_decay": weight_decay},
        {"name": "norm", "params": norm, "weight_decay": norm_weight_decay},
    ]
    return [g for g in groups if g["params"]]
