"""The only list of norms, as constructors: ``make_norm_factory(cfg)(channels)`` builds a layer
for a model that takes a ``norm_layer`` factory, and ``convert_norm(model, cfg)`` turns every
normalization layer of any ``nn.Module`` into the configured norm, in place, keeping module
names (so state_dict keys) and each layer's own settings unless the config sets them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from normlab.errors import NormConfigError
from normlab.norm.batchnorm_variants import BatchRenorm2d, GhostBatchNorm2d
from normlab.norm.layers import FrozenBatchNorm2d
from normlab.norm.schema import CUMULATIVE, NORMS, divisors_hint, validate_norm_config
from normlab.norm.spec import FRESH, SPEC
from normlab.norm.weight_standardization import standardize_convs

log = logging.getLogger("normlab")


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
    from normlab.norm.convert import settings_of

    own = settings_of(layer) if layer is not None else {}
    out = {k: SPEC[k].default for k in SPEC if cfg["name"] in SPEC[k].norms} | dict(cfg)
    for key, fresh in FRESH.items():
        if cfg.get(key) is None:
            value = own.get(key, fresh)
            out[key] = CUMULATIVE if key == "momentum" and value is None else value
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
    """Convert every normalization layer of ``model`` to the norm ``cfg`` names, in place, keeping
    module names (so state_dict keys of whatever both layers hold). Returns ``model`` (a new
    module only when the root itself is converted). Logs one line per source kind: what became
    what, what was kept and which tensors were dropped.

    Sources: BatchNorm1d/2d/3d, SyncBatchNorm, normlab's/torchvision's/timm's FrozenBatchNorm2d,
    GroupNorm, InstanceNorm, timm's LayerNorm2d and channels-last ``nn.LayerNorm`` (see
    ``normlab.norm.convert``); fused activations (timm's ``BatchNormAct2d.act``) are kept.
    Settings the config leaves unset keep each layer's own (eps, momentum, affine). Running
    statistics are carried where both layers have them; gamma/beta too, or always with
    ``norm.keep_affine=true`` (never with ``false``). A layer that already is the configured
    norm stays as it is. ``none`` folds each BatchNorm into the conv feeding it unless
    ``norm.fold=false`` (``normlab.norm.fold``), then removes it. ``gn_ws`` then
    weight-standardizes every plain ``nn.Conv2d`` feeding a norm layer (``standardize_convs``).

    Raises:
        NormConfigError: a bad config, a ``num_groups`` that does not divide a layer's channels
            (naming the layer), ``norm=frozen`` on a layer without running statistics, or a
            model without any normalization layer (any norm but ``none``).

    Example::

        model = torchvision.models.resnet18()
        convert_norm(model, {"name": "frozen"})  # model.layer1[0].bn1 is a FrozenBatchNorm2d
    """
    from normlab.norm.convert import channels, replace_norm_layers, settings_of, source_kind
    from normlab.norm.fold import feeding_convs, fold_into_conv

    validate_norm_config(cfg, check_files=False)
    name, what = cfg["name"], type(model).__name__
    found = [(n, m) for n, m in model.named_modules() if source_kind(m) is not None]
    if not found:
        if name != "none":
            raise NormConfigError(
                "norm",
                name,
                f"{what} has no normalization layer to convert (normlab converts BatchNorm,"
                " FrozenBatchNorm2d, GroupNorm, LayerNorm and InstanceNorm layers); use"
                " norm=none, or a model with normalization layers",
            )
        log.info("norm=none: %s has no normalization layer; nothing to remove", what)
        return model
    _check_fits(name, cfg, found)
    folded: dict[str, str] = {}
    if name == "none" and cfg.get("fold", True):
        pairs = feeding_convs(model, [n for n, _ in found])
        modules = dict(model.named_modules())
        folded = {n: c for n, c in pairs.items() if fold_into_conv(modules[c], modules[n])}

    def build(n: str, m: nn.Module) -> nn.Module:
        return _build_norm(name, _settings(cfg, m), channels(m))

    sources = dict(found)
    model, report = replace_norm_layers(model, build, cfg.get("keep_affine"))
    for entry in report.values():
        own = settings_of(sources[entry.layers[0]])
        inherited = [k for k in ("eps", "momentum") if cfg.get(k) is None and k in own]
        inherited = [k for k in inherited if k in entry.settings]
        n_folded = sum(layer in folded for layer in entry.layers)
        log.info("norm=%s: %s", name, entry.describe(inherited, n_folded))
    if name in AFTER_CONVERSION:
        AFTER_CONVERSION[name](model)
    return model


def _check_fits(name: str, cfg: Mapping[str, Any], found: list[tuple[str, nn.Module]]) -> None:
    """Refuse a conversion that cannot be done for some layer, naming it."""
    from normlab.norm.convert import channels

    if name == "frozen":
        bare = [(n, m) for n, m in found if getattr(m, "running_mean", None) is None]
        if bare:
            n, m = bare[0]
            raise NormConfigError(
                "norm",
                "frozen",
                f"layer {n} ({type(m).__name__}, {len(bare)} layer(s) like it) has no running"
                " statistics to freeze (GroupNorm/LayerNorm/InstanceNorm, or BatchNorm with"
                " track_running_stats=False); train with norm=batchnorm first, then norm=frozen"
                " norm.init_from=<its checkpoint>, or use norm=groupnorm",
            )
    if name == "instancenorm":
        # a BatchNorm1d normalizes (N, C) features: one value per channel and sample, of which an
        # instance norm cannot take statistics (torch raises on the first training batch)
        flat = [n for n, m in found if isinstance(m, nn.BatchNorm1d)]
        if flat:
            raise NormConfigError(
                "norm",
                "instancenorm",
                f"layer {flat[0]} (BatchNorm1d, {len(flat)} layer(s) like it) normalizes flat"
                " features, one value per channel and sample, which instance statistics cannot"
                " normalize; use norm=groupnorm1 (per sample over the channels) or norm=batchnorm",
            )
    if name in ("groupnorm", "gn_ws"):
        bad = [(n, channels(m)) for n, m in found if channels(m) % cfg["num_groups"]]
        if bad:
            counts = sorted({channels(m) for _, m in found})
            raise NormConfigError(
                "norm.num_groups",
                cfg["num_groups"],
                f"it does not divide the {bad[0][1]} channels of layer {bad[0][0]}"
                f" ({len(bad)} layer(s) affected); use one of the {divisors_hint(counts)}",
            )
