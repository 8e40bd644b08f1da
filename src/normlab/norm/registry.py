"""The only list of norms, as constructors: ``make_norm_factory(cfg)(channels)`` builds a layer
for a model that takes a ``norm_layer`` factory, and ``convert_norm(model, cfg)`` turns every
BatchNorm of any ``nn.Module`` into the configured norm, in place, keeping module names (so
state_dict keys) and each layer's own settings unless the config sets them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import NormConfigError
from normlab.norm.batchnorm_variants import BatchRenorm2d, GhostBatchNorm2d
from normlab.norm.layers import (
    FrozenBatchNorm2d,
    channels_of,
    convert_to_batchnorm,
    convert_to_frozen,
    is_batchnorm,
    keep_children,
    replace_modules,
)
from normlab.norm.schema import CUMULATIVE, NORMS, divisors_hint, validate_norm_config
from normlab.norm.spec import FRESH, SPEC
from normlab.norm.weight_standardization import standardize_convs


def _momentum(value: Any) -> float | None:
    return None if value == CUMULATIVE else value


def _group_norm(groups: int, channels: int, eps: float, affine: bool) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps, affine)


def _layer_norm_2d(channels: int, eps: float, affine: bool) -> nn.Module:
    from timm.layers import LayerNorm2d  # timm's own class, so timm models and ours look alike

    return LayerNorm2d(channels, eps, affine)


# name -> constructor(channels, settings): the registry; a setting is never None here
CONSTRUCTORS: dict[str, Callable[[int, dict[str, Any]], nn.Module]] = {
    "none": lambda c, s: nn.Identity(),
    "batchnorm": lambda c, s: nn.BatchNorm2d(
        c, s["eps"], _momentum(s["momentum"]), s["affine"], s["track_running_stats"]
    ),
    "frozen": lambda c, s: FrozenBatchNorm2d(
        c, s["eps"], bool(s.get("freeze_affine")), s["affine"], _momentum(s["momentum"])
    ),
    "groupnorm": lambda c, s: _group_norm(s["num_groups"], c, s["eps"], s["affine"]),
    # LayerNorm over (C, H, W) of each sample, with per-channel (not per-element) gamma/beta;
    # groupnorm1 says what it computes, layernorm is its older name (kept: docs and checkpoints)
    "layernorm": lambda c, s: _group_norm(1, c, s["eps"], s["affine"]),
    "groupnorm1": lambda c, s: _group_norm(1, c, s["eps"], s["affine"]),
    # ConvNeXt's LayerNorm: over C at each position (channels only)
    "layernorm2d": lambda c, s: _layer_norm_2d(c, s["eps"], s["affine"]),
    "instancenorm": lambda c, s: nn.InstanceNorm2d(c, s["eps"], affine=s["affine"]),
    "batchrenorm": lambda c, s: BatchRenorm2d(
        c,
        s["eps"],
        _momentum(s["momentum"]),
        s["affine"],
        s["r_max"],
        s["d_max"],
        s["renorm_warmup_steps"],
    ),
    "ghostbatchnorm": lambda c, s: GhostBatchNorm2d(
        c, s["eps"], _momentum(s["momentum"]), s["affine"], s["virtual_batch_size"]
    ),
    # GroupNorm here; convert_norm also weight-standardizes the convolutions feeding the norms
    "gn_ws": lambda c, s: _group_norm(s["num_groups"], c, s["eps"], s["affine"]),
}
# model-wide steps a norm takes after its layers are in place (see convert_norm)
AFTER_CONVERSION: dict[str, Callable[[nn.Module], object]] = {"gn_ws": standardize_convs}
assert tuple(CONSTRUCTORS) == NORMS


def _settings(cfg: Mapping[str, Any], layer: nn.Module | None = None) -> dict[str, Any]:
    """Each setting from ``cfg`` when set, else from ``layer`` (converting), else PyTorch's;
    a norm's own keys the config lacks (a config built in Python) take the spec's default."""
    out = {k: SPEC[k].default for k in SPEC if cfg["name"] in SPEC[k].norms} | dict(cfg)
    for key, fresh in FRESH.items():
        if cfg.get(key) is None:
            own = getattr(layer, key, fresh) if layer is not None else fresh
            if key == "affine" and layer is not None:
                own = getattr(layer, "weight", None) is not None
            if key == "momentum" and layer is not None:
                own = getattr(layer, "source_momentum", own)
            out[key] = CUMULATIVE if key == "momentum" and own is None else own
    return out


def _build_norm(name: str, settings: dict[str, Any], num_channels: int) -> nn.Module:
    return CONSTRUCTORS[name](num_channels, settings)


def make_norm_factory(cfg: Mapping[str, Any]) -> Callable[[int], nn.Module]:
    """Return ``factory(num_channels) -> nn.Module`` for the configured norm (validated first),
    for models that take a ``norm_layer`` (the ConvNet, torchvision's ResNet). Unset keys get
    PyTorch's defaults. The factory is a picklable ``functools.partial``.

    ``none`` -> ``nn.Identity``; ``batchnorm`` -> ``nn.BatchNorm2d``; ``frozen`` ->
    ``FrozenBatchNorm2d``; ``groupnorm`` -> ``nn.GroupNorm(num_groups, C)``; ``groupnorm1`` and
    its older name ``layernorm`` -> ``nn.GroupNorm(1, C)``, i.e. LayerNorm over (C, H, W) of each
    sample with per-channel gamma/beta; ``layernorm2d`` -> timm's ``LayerNorm2d`` (over C only);
    ``instancenorm`` -> ``nn.InstanceNorm2d``; ``batchrenorm`` -> ``BatchRenorm2d``;
    ``ghostbatchnorm`` -> ``GhostBatchNorm2d``; ``gn_ws`` -> ``nn.GroupNorm`` (the convolutions
    are standardized by :func:`convert_norm`, which ``NormLabModule`` always runs).
    """
    validate_norm_config(cfg, check_files=False)
    return functools.partial(_build_norm, cfg["name"], _settings(cfg))


def norm_has_bias(cfg: Mapping[str, Any]) -> bool:
    """True when the norm layer carries a per-channel beta, so a preceding conv needs no bias.

    ``frozen`` counts even with ``freeze_affine`` (beta fixed, not learned) so that conv layers have
    the same keys under ``norm=batchnorm`` and ``norm=frozen``: checkpoints move between them.
    """
    name = cfg.get("name")
    if name == "frozen":
        return True
    return name != "none" and cfg.get("affine") is not False


def convert_norm(model: nn.Module, cfg: Mapping[str, Any]) -> nn.Module:
    """Convert every BatchNorm of ``model`` (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, normlab's
    and torchvision's ``FrozenBatchNorm2d``, subclasses such as timm's ``BatchNormAct2d``, whose
    activation is kept) to the norm ``cfg`` names, in place, keeping module names and so
    state_dict keys. Returns ``model`` (a new module only when the root itself is converted).

    Settings the config leaves unset (null/absent) keep each layer's own: ``frozen`` and
    ``batchnorm`` keep eps, momentum, gamma/beta and running statistics bit-exactly (a round trip
    gives the original layer back); ``groupnorm``/``layernorm`` keep eps and affine and start
    gamma/beta at ones/zeros (their statistics mean something else); ``none`` is ``nn.Identity``;
    the other targets are fresh layers of the registry. ``gn_ws`` then weight-standardizes every
    plain ``nn.Conv2d`` feeding a norm layer (``standardize_convs``). Other norm layers
    (GroupNorm, LayerNorm) of the model are left as they are.

    Raises:
        NormConfigError: a bad config, a ``num_groups`` that does not divide a layer's channels
            (naming the layer), or ``norm=frozen`` on a layer without running statistics.

    Example::

        model = torchvision.models.resnet18()
        convert_norm(model, {"name": "frozen"})  # model.layer1[0].bn1 is a FrozenBatchNorm2d
    """
    validate_norm_config(cfg, check_files=False)
    name = cfg["name"]
    model = _convert_layers(model, cfg)
    if name in AFTER_CONVERSION:
        AFTER_CONVERSION[name](model)
    return model


def _convert_layers(model: nn.Module, cfg: Mapping[str, Any]) -> nn.Module:
    name = cfg["name"]
    layers = [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]
    if name == "frozen":
        for n, m in layers:
            if m.running_mean is None:
                raise NormConfigError(
                    "norm",
                    "frozen",
                    f"layer {n} ({m}) has no running statistics to freeze"
                    " (track_running_stats=False); use norm=batchnorm or norm=groupnorm",
                )
        model = convert_to_frozen(model, bool(cfg.get("freeze_affine")), cfg.get("eps"))
        for _, m in model.named_modules():
            if isinstance(m, FrozenBatchNorm2d) and cfg.get("eps") is not None:
                m.eps = cfg["eps"]
        return model
    if name == "batchnorm":
        momentum = "keep" if cfg.get("momentum") is None else _momentum(cfg["momentum"])
        model = convert_to_batchnorm(model, momentum)
        return replace_modules(model, lambda n, m: _update_batchnorm(m, cfg))
    if name in ("groupnorm", "gn_ws"):
        bad = [(n, channels_of(m)) for n, m in layers if channels_of(m) % cfg["num_groups"]]
        if bad:
            channels = sorted({channels_of(m) for _, m in layers})
            raise NormConfigError(
                "norm.num_groups",
                cfg["num_groups"],
                f"it does not divide the {bad[0][1]} channels of layer {bad[0][0]}"
                f" ({len(bad)} layer(s) affected); use one of the {divisors_hint(channels)}",
            )

    def swap(n: str, m: nn.Module) -> nn.Module | None:
        if not is_batchnorm(m):
            return None
        new = _build_norm(name, _settings(cfg, m), channels_of(m))
        if type(new) is type(m):  # built by the model's norm_layer factory: keep (weights loaded)
            return m
        ref = m.running_mean if m.running_mean is not None else next(m.parameters(), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        return keep_children(m, new.train(m.training))

    return replace_modules(model, swap)


def _update_batchnorm(m: nn.Module, cfg: Mapping[str, Any]) -> nn.Module | None:
    """A live BatchNorm with the settings ``cfg`` gives; rebuilt only when affine or
    track_running_stats change (they decide which tensors exist)."""
    if not isinstance(m, _BatchNorm):
        return None
    if cfg.get("eps") is not None:
        m.eps = cfg["eps"]
    if cfg.get("momentum") is not None:
        m.momentum = _momentum(cfg["momentum"])
    settings = _settings(cfg, m)
    same = settings["affine"] == m.affine and settings["track_running_stats"] == (
        m.running_mean is not None
    )
    if same:
        return m
    ref = m.running_mean if m.running_mean is not None else m.weight
    new = _build_norm("batchnorm", settings, channels_of(m)).to(ref.device, ref.dtype)
    if new.running_mean is not None and m.running_mean is not None:
        new.load_state_dict(
            {k: v for k, v in m.state_dict().items() if k in new.state_dict()}, strict=False
        )
    return keep_children(m, new.train(m.training))
