"""convert_norm on models normlab did not build: torchvision's ResNet, MobileNetV3 and
EfficientNet, timm's norm+activation layers. Each layer keeps its name and its own settings."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import ConfigError, NormConfigError
from normlab.norm import FrozenBatchNorm2d, convert_norm

ARCHS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


def randomized(arch: str) -> nn.Module:
    """A torchvision model whose BatchNorm layers hold non-trivial statistics and gamma/beta."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def bn_settings(model: nn.Module) -> dict[str, tuple[float, float | None]]:
    return {  # a frozen layer carries the momentum of the BatchNorm it was frozen from
        n: (m.eps, m.source_momentum if isinstance(m, FrozenBatchNorm2d) else m.momentum)
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm | FrozenBatchNorm2d)
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_and_back_keeps_each_layer_and_the_outputs(arch: str) -> None:
    model = randomized(arch)
    before = bn_settings(model)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    if arch == "mobilenet_v3_small":  # torchvision builds it with eps=0.001, momentum=0.01
        assert set(before.values()) == {(0.001, 0.01)}

    convert_norm(model, {"name": "frozen"})
    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(layers) == len(before) and not any(
        isinstance(m, _BatchNorm) for m in model.modules()
    )
    assert bn_settings(model) == before  # eps (used) and momentum (carried back) per layer
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= 1e-5
        # train mode (dropout aside) changes nothing in a frozen layer
        layer = layers[-1]
        h = torch.randn(2, layer.num_features, 4, 4)
        assert torch.equal(layer.train()(h), layer.eval()(h))

    convert_norm(model, {"name": "batchnorm"})
    assert bn_settings(model) == before and list(model.state_dict()) == keys
    assert all(type(m) is nn.BatchNorm2d for n, m in model.named_modules() if n in before)
    with torch.no_grad():
        assert (model.eval()(x) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["groupnorm", "layernorm", "none"])
def test_per_sample_norms_replace_every_batchnorm(arch: str, name: str) -> None:
    model = randomized(arch)
    before = bn_settings(model)
    convert_norm(model, {"name": name, "num_groups": 8 if name == "groupnorm" else None})
    modules = dict(model.named_modules())
    assert not any(isinstance(m, _BatchNorm | FrozenBatchNorm2d) for m in modules.values())
    assert not any(k.endswith("running_mean") for k in model.state_dict())
    for layer, (eps, _) in before.items():
        m = modules[layer]
        if name == "none":
            assert isinstance(m, nn.Identity)
        else:  # the layer's own eps unless the config sets it
            groups = 1 if name == "layernorm" else 8
            assert isinstance(m, nn.GroupNorm) and (m.num_groups, m.eps) == (groups, eps)
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_a_batchnorm_without_running_statistics_converts_by_its_channel_count() -> None:
    """track_running_stats=False (no running_mean) and affine=False (no weight): the channel
    count still comes from the layer, so per-sample norms and BatchNorm can replace it."""
    bare = nn.BatchNorm2d(6, affine=False, track_running_stats=False)
    gn = convert_norm(nn.Sequential(bare), {"name": "groupnorm", "num_groups": 3})[0]
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels) == (3, 6)
    bn = convert_norm(nn.Sequential(bare), {"name": "batchnorm"})[0]
    assert bn.num_features == 6


def test_settings_given_by_the_config_win() -> None:
    model = randomized("mobilenet_v3_small")
    convert_norm(model, {"name": "batchnorm", "momentum": 0.2, "eps": 1e-4})
    assert set(bn_settings(model).values()) == {(1e-4, 0.2)}
    convert_norm(model, {"name": "frozen", "eps": 1e-3, "freeze_affine": True})
    layer = model.features[0][1]
    assert isinstance(layer, FrozenBatchNorm2d) and layer.eps == 1e-3
    assert not any(isinstance(p, nn.Parameter) for p in (layer.weight, layer.bias))
    convert_norm(model, {"name": "batchnorm", "momentum": "cumulative"})
    assert {m for _, m in bn_settings(model).values()} == {None}


def test_groupnorm_that_does_not_divide_names_the_layer_and_its_channels() -> None:
    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    with pytest.raises(NormConfigError) as info:
        convert_norm(model, {"name": "groupnorm", "num_groups": 32})
    text = str(info.value)
    # features.0.1 (16 channels) is the first layer 32 does not divide
    assert "norm.num_groups=32" in text and "16 channels of layer features.0.1" in text
    assert "[1, 2, 4, 8]" in text and isinstance(info.value, ConfigError)


def test_torchvision_frozen_batchnorm_converts_too() -> None:
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    model = torchvision.models.resnet18(norm_layer=TorchvisionFrozen, num_classes=3)
    model.bn1.running_mean.fill_(0.5)
    x = torch.randn(2, 3, 32, 32)
    expected = model.eval()(x)
    convert_norm(model, {"name": "frozen"})
    assert isinstance(model.bn1, FrozenBatchNorm2d) and model.bn1.running_mean[0] == 0.5
    assert isinstance(model.bn1.weight, nn.Parameter)  # gamma/beta learn now
    assert (model(x) - expected).abs().max().item() <= 1e-5
    convert_norm(model, {"name": "batchnorm"})
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d


def test_timm_norm_act_layers_keep_their_activation() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    convert_norm(model, {"name": "frozen"})
    assert isinstance(model.bn1, FrozenBatchNorm2d) and isinstance(model.bn1.act, nn.SiLU)
    assert (model(x) - expected).abs().max().item() <= 1e-5
    convert_norm(model, {"name": "batchnorm"})  # back: plain BatchNorm2d, then the activation
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn1.act, nn.SiLU)
    assert (model(x) - expected).abs().max().item() <= 1e-5  # eval mode: the same function
    convert_norm(model, {"name": "groupnorm", "num_groups": 8})
    assert isinstance(model.bn1, nn.GroupNorm) and isinstance(model.bn1.act, nn.SiLU)
    assert model(x).shape == (2, 3)
