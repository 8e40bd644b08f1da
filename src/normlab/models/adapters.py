"""Building any net for the data: torchvision and timm classifiers by name, a user's class by
``_target_``, with the data's classes and input channels, and local pretrained weights.

No weights are downloaded at run time: ``model.weights`` is a file the user has (see
docs/models.md for where torchvision and timm keep the files they download).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from torch import nn

from normlab.errors import ConfigError
from normlab.norm.registry import make_norm_factory, norm_has_bias

log = logging.getLogger("normlab")


def replace_first_conv(net: nn.Module, in_channels: int) -> str | None:
    """Give the first ``nn.Conv2d`` that reads the 3 image channels ``in_channels`` inputs
    (1-channel digits on an ImageNet architecture); returns its qualified name, None if none."""
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(
                in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                conv.bias is not None,
                conv.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent_name), attr, new)
            return name
    return None


def torchvision_net(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    activation: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=...)`` for any torchvision
    classification model (``resnet18``, ``mobilenet_v3_small``, ``efficientnet_b0``, ...), its
    first convolution adapted to ``in_channels``. ``kwargs`` go to the builder.

    Raises:
        ConfigError: ``arch`` is not a torchvision classification model (names the choices).
    """
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConfigError(
            "model.arch",
            arch,
            f"not a torchvision classification model; choose one of {', '.join(names[:12])}, ..."
            " (all: torchvision.models.list_models(module=torchvision.models))",
        )
    if activation is not None:
        raise ConfigError(
            "model.activation",
            activation,
            "torchvision's model builders take no activation; leave it null, or use model=timm"
            " (act_layer) or model=cnn",
        )
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        replace_first_conv(net, in_channels)
    return net


# a built net normlab cannot rebuild, in hyperparameters: {BUILT: "pkg.module.Class"}
BUILT = "_built_"
TORCHVISION_TARGET = "normlab.models.torchvision_net"


def classes_of(net: nn.Module) -> int:
    """The output count of ``net``'s last ``nn.Linear`` (a classifier's number of classes).

    Raises:
        ConfigError: the net has no ``nn.Linear``; pass num_classes.
    """
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError("num_classes", None, f"{type(net).__name__} has no nn.Linear; give it")
    return linear[-1].out_features


def input_channels_of(net: nn.Module) -> int:
    """The input channels of ``net``'s first convolution (3 when it has none)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return conv.in_channels if conv is not None else 3


def _shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    state = net.state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def describe_net(net: nn.Module, num_classes: int, in_channels: int) -> dict[str, Any]:
    """A built net as plain data: ``{"_target_": "normlab.models.torchvision_net", "arch":
    name}`` when it is a torchvision classifier that :func:`torchvision_net` rebuilds with the
    same tensors (found by building the candidates of its module on the meta device: no memory,
    no weights); else ``{"_built_": "pkg.module.Class"}``, which nothing rebuilds."""
    kind = type(net)
    if kind.__module__.startswith("torchvision.models."):
        import torchvision

        shapes = _shapes(net)
        for arch in torchvision.models.list_models(module=torchvision.models):
            if torchvision.models.get_model_builder(arch).__module__ != kind.__module__:
                continue
            try:
                with torch.device("meta"):
                    candidate = torchvision_net(arch, num_classes, in_channels)
            except Exception:  # a builder that needs other arguments is not this net
                continue
            if type(candidate) is kind and _shapes(candidate) == shapes:
                return {"_target_": TORCHVISION_TARGET, "arch": arch}
    return {BUILT: f"{kind.__module__}.{kind.__qualname__}"}


def timm_net(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    activation: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=in_channels)``
    (nothing is downloaded; pretrained weights come from ``model.weights``).

    Raises:
        ConfigError: ``arch`` is not a timm model.
    """
    import timm

    if not timm.is_model(arch):
        raise ConfigError(
            "model.arch",
            arch,
            'not a timm model; list them with python -c "import timm;'
            " print(timm.list_models('resnet*'))\" (e.g. resnet10t, resnet18, efficientnet_b0)",
        )
    if activation is not None:  # timm names activations as normlab does (relu, sigmoid, ...)
        kwargs["act_layer"] = activation
    return timm.create_model(
        arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
    )


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a bare state_dict (torchvision/timm ``.pth``), a
    ``.safetensors`` file, or a checkpoint holding one under ``state_dict`` / ``model``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise ConfigError(
            "model.weights",
            str(path),
            f"cannot read it as a state_dict file ({reason}); give a .pth/.pt saved with"
            " torch.save(model.state_dict()) or a .safetensors file",
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ConfigError("model.weights", str(path), "the file holds no state_dict (a mapping)")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("net.") for k in tensors):  # a normlab checkpoint
        tensors = {k.removeprefix("net."): v for k, v in tensors.items()}
    return tensors


def load_weights(net: nn.Module, path: str | Path) -> list[str]:
    """Load the tensors of ``path`` whose names and shapes match ``net``'s (before any norm
    conversion, so ``norm=frozen`` keeps the pretrained running statistics). Tensors whose shape
    differs (a classifier for other classes, a first conv for other channels) keep their fresh
    initialisation; returns and logs their names.

    Raises:
        ConfigError: the file cannot be read, or none of its tensors fits ``net``.
    """
    path = Path(path).expanduser()
    source = _state_dict_of(path)
    own = net.state_dict()
    matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ConfigError(
            "model.weights",
            str(path),
            f"none of its {len(source)} tensors (e.g. {list(source)[:3]}) matches a tensor of the"
            f" model (e.g. {list(own)[:3]}); give weights of the same architecture (model.arch)",
        )
    net.load_state_dict(matching, strict=False)
    reinit = sorted(k for k in own if k not in matching)
    unused = sorted(k for k in source if k not in matching)
    log.info(
        "model.weights=%s: %d of %d tensors loaded; re-initialised (shape differs or absent): %s;"
        " unused from the file: %s",
        path,
        len(matching),
        len(own),
        reinit or "none",
        unused or "none",
    )
    return reinit


def takes(target: Any, name: str) -> bool:
    """Whether the callable ``target``'s signature names the parameter ``name``."""
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def build_net(
    cfg: Mapping[str, Any],
    num_classes: int,
    in_channels: int,
    norm: Mapping[str, Any],
) -> nn.Module:
    """Instantiate the net config ``cfg`` (``{"_target_": ..., **kwargs}``). The target receives
    ``num_classes`` / ``in_channels`` when its signature names them (and the config does not),
    and ``norm_layer`` (a factory of the configured norm) and ``conv_bias`` likewise."""
    target = get_object(cfg["_target_"])
    kwargs = {k: v for k, v in cfg.items() if not (k.startswith("_") and k.endswith("_"))}
    offered = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "norm_layer": lambda: make_norm_factory(norm),
        "conv_bias": lambda: not norm_has_bias(norm),
    }
    for key, value in offered.items():
        if key not in kwargs and takes(target, key):
            kwargs[key] = value() if callable(value) else value
    net = target(**kwargs)
    if not isinstance(net, nn.Module):
        raise ConfigError(
            "model.net._target_", cfg["_target_"], f"built a {type(net).__name__}, not an nn.Module"
        )
    return net
