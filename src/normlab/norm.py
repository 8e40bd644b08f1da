"""The one place that knows the list of norms: ``make_norm_factory(cfg.norm)(channels)`` builds a
layer, so the backbone never branches on the norm type. Also ``FrozenBatchNorm2d``, bit-exact
conversions to and from ``nn.BatchNorm2d`` and norm-aware weight decay groups. Precise-BN
population statistics live in ``normlab.precise_bn``."""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.errors import CheckpointError, NormlabError
from normlab.utils.checkpoints import load_checkpoint

NORMS: tuple[str, ...] = ("none", "batchnorm", "frozen", "groupnorm", "layernorm")

# Values used when a key is absent from the config (the same as PyTorch's defaults).
DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "batchnorm": {"momentum": 0.1, "eps": 1e-5, "affine": True, "track_running_stats": True},
    "frozen": {"eps": 1e-5, "freeze_affine": False},
    "groupnorm": {"num_groups": 32, "eps": 1e-5, "affine": True},
    "layernorm": {"eps": 1e-5, "affine": True},
}


class NormConfigError(NormlabError, ValueError):
    """A bad ``norm.*`` value; the message names the key, the value given and what is allowed."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise NormConfigError(f"norm.{key}={value!r} is not allowed: {allowed}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_norm_config(
    cfg: Mapping[str, Any],
    channels: Sequence[int] = (),
    max_epochs: int | None = None,
    check_files: bool = True,
) -> None:
    """Check a ``norm`` config (a mapping such as ``{"name": "groupnorm", "num_groups": 8}``)
    before any layer is built. ``channels``: channel counts of the normalized layers (checked
    against num_groups); ``max_epochs``: ``trainer.max_epochs`` (-1 or None: unbounded);
    ``check_files``: also check that ``norm.init_from`` is a normlab checkpoint holding BatchNorm
    statistics (a training-time concern: a model rebuilt from a checkpoint skips it).
    Unknown extra keys are ignored.

    Raises:
        NormConfigError: naming the key (``norm.momentum`` ...), the value and what is allowed.
        CheckpointError: ``norm.init_from`` is not a normlab checkpoint.
    """
    name = cfg.get("name") if isinstance(cfg, Mapping) else None
    _check(name in NORMS, "name", name, f"choose one of {', '.join(NORMS)} (e.g. norm=batchnorm)")
    get = {**DEFAULTS[name], **cfg}.get
    m = get("momentum")
    allowed = "expected a number in [0, 1], or null for a cumulative average"
    _check(m is None or (_is_real(m) and 0 <= m <= 1), "momentum", m, allowed)
    eps = get("eps", 1.0)
    _check(_is_real(eps) and math.isfinite(eps) and eps > 0, "eps", eps, "expected a number > 0")
    for key in ("affine", "track_running_stats", "freeze_affine", "distribute_bn"):
        _check(isinstance(get(key, True), bool), key, get(key), "expected true or false")
    n = get("precise_bn_batches", 0)
    _check(_is_int(n) and n >= 0, "precise_bn_batches", n, "expected an integer >= 0 (0: off)")
    if name == "frozen" and get("init_from") is None:
        n = get("calibration_batches", 20)
        allowed = "expected an integer >= 1 (the statistics need data), or set norm.init_from"
        _check(_is_int(n) and n >= 1, "calibration_batches", n, allowed)
    groups = get("num_groups", 1)
    _check(_is_int(groups) and groups >= 1, "num_groups", groups, "expected an integer >= 1")
    bad = [c for c in channels if c % groups] if name == "groupnorm" else []
    if bad:
        common = functools.reduce(math.gcd, channels)
        divisors = [d for d in range(1, common + 1) if common % d == 0]
        allowed = f"it does not divide the channel count {bad[0]} of a normalized layer; use a "
        _check(
            False, "num_groups", groups, f"{allowed}divisor of all of {list(channels)}: {divisors}"
        )
    epoch = get("freeze_at_epoch")
    bounded = max_epochs is not None and max_epochs >= 0
    ok = epoch is None or (_is_int(epoch) and 1 <= epoch and not (bounded and epoch >= max_epochs))
    if bounded and max_epochs < 2:
        allowed = f"trainer.max_epochs={max_epochs} leaves no later epoch to freeze at; raise it"
    else:
        upper = f"in [1, {max_epochs - 1}] (trainer.max_epochs={max_epochs})" if bounded else ">= 1"
        allowed = f"expected null or an epoch number {upper}; epoch 0 would freeze the"
        allowed += " initial zeros/ones (norm=frozen estimates statistics before the first step)"
    _check(ok, "freeze_at_epoch", epoch, allowed)
    for key in ("freeze_at_epoch", "precise_bn_batches"):
        needs_stats = get(key) not in (None, 0) and get("track_running_stats") is False
        _check(not needs_stats, key, get(key), "it needs norm.track_running_stats=true")
    path = get("init_from")
    if path is None or not check_files:
        return
    exists = isinstance(path, str | os.PathLike) and Path(path).expanduser().is_file()
    _check(exists, "init_from", path, "no such file; give a checkpoint or null")
    init_from_state_dict(path)


def init_from_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The ``state_dict`` of the normlab checkpoint ``norm.init_from`` names, checked to hold
    BatchNorm running statistics (it was trained with ``norm=batchnorm`` or ``norm=frozen``).

    Raises:
        CheckpointError: the file is not a normlab checkpoint, or has no running statistics.
    """
    checkpoint = load_checkpoint(Path(path).expanduser(), key="norm.init_from")
    state = checkpoint.get("state_dict") or {}
    if not any(k.endswith(".running_mean") for k in state):
        trained = ((checkpoint["normlab"].get("config") or {}).get("norm") or {}).get("name")
        raise CheckpointError(
            f"norm.init_from={path} holds no BatchNorm running statistics (its run used"
            f" norm={trained}); give a checkpoint of a norm=batchnorm or norm=frozen run"
            " with the same model.widths, or leave norm.init_from=null to estimate them."
        )
    return state


def _build_norm(name: str, kwargs: dict[str, Any], num_channels: int) -> nn.Module:
    if name == "none":
        return nn.Identity()
    if name == "batchnorm":
        return nn.BatchNorm2d(num_channels, **kwargs)
    if name == "frozen":
        return FrozenBatchNorm2d(num_channels, **kwargs)
    if name == "groupnorm":
        return nn.GroupNorm(kwargs["num_groups"], num_channels, kwargs["eps"], kwargs["affine"])
    # LayerNorm over (C, H, W) of each sample, with per-channel (not per-element) gamma/beta.
    return nn.GroupNorm(1, num_channels, kwargs["eps"], kwargs["affine"])


def make_norm_factory(cfg: Mapping[str, Any]) -> Callable[[int], nn.Module]:
    """Return ``factory(num_channels) -> nn.Module`` for the configured norm (validated first).

    ``none`` -> ``nn.Identity``; ``batchnorm`` -> ``nn.BatchNorm2d(momentum, eps, affine,
    track_running_stats)``; ``frozen`` -> ``FrozenBatchNorm2d(eps, freeze_affine)``;
    ``groupnorm`` -> ``nn.GroupNorm(num_groups, C, eps, affine)``; ``layernorm`` ->
    ``nn.GroupNorm(1, C, eps, affine)``, i.e. LayerNorm over (C, H, W) of each sample with
    per-channel gamma/beta. The factory is a picklable ``functools.partial``.
    """
    validate_norm_config(cfg, check_files=False)
    name = cfg["name"]
    kwargs = {k: cfg.get(k, v) for k, v in DEFAULTS[name].items()}
    return functools.partial(_build_norm, name, kwargs)


def norm_has_bias(cfg: Mapping[str, Any]) -> bool:
    """True when the norm layer carries a per-channel beta, so a preceding conv needs no bias.

    ``frozen`` counts even with ``freeze_affine`` (beta fixed, not learned) so that conv layers have
    the same keys under ``norm=batchnorm`` and ``norm=frozen``: checkpoints move between them.
    """
    name = cfg.get("name")
    if name == "frozen":
        return True
    return name in ("batchnorm", "groupnorm", "layernorm") and bool(cfg.get("affine", True))


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose running statistics never change: ``y = x * scale + shift`` with
    ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``.

    Normalizes with ``running_mean``/``running_var`` in ``train()`` and ``eval()`` alike and never
    writes them, so no mode switch can unfreeze it. gamma/beta (``weight``/``bias``) are trainable
    parameters unless ``freeze_affine=True``, which stores them as buffers instead. The state_dict
    keys are exactly those of ``nn.BatchNorm2d`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so checkpoints load in both directions.

    Example::

        frozen = FrozenBatchNorm2d.from_batchnorm(bn)
        frozen = convert_to_frozen(model)  # every BatchNorm2d / SyncBatchNorm in place
    """

    momentum = None  # attributes mirror BatchNorm so inspection tools can print them
    track_running_stats = True

    def __init__(
        self, num_features: int, eps: float = 1e-5, freeze_affine: bool = False, affine: bool = True
    ) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
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
    def from_batchnorm(cls, bn: _BatchNorm, freeze_affine: bool = False) -> FrozenBatchNorm2d:
        """Frozen copy of ``bn`` with bit-identical values, device and dtype.

        Trainable gamma/beta are the very ``Parameter`` objects of ``bn`` (an optimizer built before
        the conversion keeps training them); buffers are cloned.
        """
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{bn} has no running statistics (track_running_stats=False) to freeze"
            )
        frozen = cls(bn.num_features, bn.eps, freeze_affine, bn.affine)
        if bn.affine and freeze_affine:
            frozen.weight, frozen.bias = bn.weight.detach().clone(), bn.bias.detach().clone()
        elif bn.affine:
            frozen.weight, frozen.bias = bn.weight, bn.bias
        frozen.running_mean = bn.running_mean.clone()
        frozen.running_var = bn.running_var.clone()
        if bn.num_batches_tracked is not None:
            frozen.num_batches_tracked = bn.num_batches_tracked.clone()
        return frozen.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        scale = (self.running_var + self.eps).rsqrt()
        shift = -self.running_mean * scale
        if self.weight is not None:
            scale = self.weight * scale
            shift = self.bias + shift * self.weight
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kw: Any) -> None:
        # Old BatchNorm checkpoints have no num_batches_tracked; accept them as BatchNorm does.
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum=None, affine={self.affine}, "
            f"track_running_stats=True, freeze_affine={self.freeze_affine}"
        )


def _convert(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    new = swap(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        converted = _convert(child, swap)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_to_frozen(module: nn.Module, freeze_affine: bool = False) -> nn.Module:
    """Replace every ``nn.BatchNorm2d``/``SyncBatchNorm`` with a bit-exact ``FrozenBatchNorm2d``.

    Walks the model once; returns ``module`` itself unless the root is a BatchNorm layer.
    """
    bn_types = (nn.BatchNorm2d, nn.SyncBatchNorm)

    def swap(m: nn.Module) -> nn.Module | None:
        return (
            FrozenBatchNorm2d.from_batchnorm(m, freeze_affine) if isinstance(m, bn_types) else None
        )

    return _convert(module, swap)


def frozen_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's ``FrozenBatchNorm2d`` layers (saved in checkpoints)."""
    return [name for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]


def freeze_named_layers(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Convert the BatchNorm layers called ``names`` (from ``named_modules()``) to bit-exact
    ``FrozenBatchNorm2d`` in place, e.g. those a checkpoint lists as frozen. Returns the names
    converted now (layers already frozen, or absent, are skipped)."""
    modules = dict(model.named_modules())
    converted = []
    for name in names:
        layer = modules.get(name)
        if isinstance(layer, nn.BatchNorm2d | nn.SyncBatchNorm) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name], child, FrozenBatchNorm2d.from_batchnorm(layer))
            converted.append(name)
    return converted


def convert_to_batchnorm(module: nn.Module, momentum: float | None = 0.1) -> nn.Module:
    """Inverse of :func:`convert_to_frozen`: every ``FrozenBatchNorm2d`` becomes a bit-exact
    ``nn.BatchNorm2d`` (trainable gamma/beta, same device and dtype) with ``momentum``."""

    def swap(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, FrozenBatchNorm2d):
            return None
        rm = m.running_mean
        bn = nn.BatchNorm2d(
            m.num_features, m.eps, momentum, m.affine, device=rm.device, dtype=rm.dtype
        )
        if m.affine:
            keep = isinstance(m.weight, nn.Parameter)
            bn.weight = m.weight if keep else nn.Parameter(m.weight.clone())
            bn.bias = m.bias if keep else nn.Parameter(m.bias.clone())
        bn.running_mean, bn.running_var = rm.clone(), m.running_var.clone()
        bn.num_batches_tracked = m.num_batches_tracked.clone()
        return bn.train(m.training)

    return _convert(module, swap)


def is_batchnorm(m: nn.Module) -> bool:
    """BatchNorm-like: any ``_BatchNorm`` (incl. ``SyncBatchNorm``) or ``FrozenBatchNorm2d``."""
    return isinstance(m, _BatchNorm | FrozenBatchNorm2d)


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
    """Optimizer groups: trainable norm-layer params get ``norm_weight_decay``, the rest
    ``weight_decay`` (torchvision references' ``set_weight_decay``). The groups are named
    ``weights`` and ``norm``; empty groups are omitted."""
    norm: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (norm if is_norm_layer(m) else other).append(p)
    # named, so LearningRateMonitor's tags (lr-AdamW/weights, lr-AdamW/norm) are the same for
    # every norm, also for norm=none where the norm group is empty
    groups = [
        {"params": other, "weight_decay": weight_decay, "name": "weights"},
        {"params": norm, "weight_decay": norm_weight_decay, "name": "norm"},
    ]
    return [g for g in groups if g["params"]]
