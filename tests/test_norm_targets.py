"""The norms of issue 21 against formulas written here, in float64 (not the layers' own code):
batch renorm, ghost BatchNorm, instance norm, channels-only LayerNorm, weight-standardized convs
with GroupNorm; their state_dicts, checkpoints, frozen conversion and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.distributed import check_batchnorm_setup
from normlab.errors import ConfigError
from normlab.norm import (
    FrozenBatchNorm2d,
    NormConfigError,
    convert_norm,
    make_norm_factory,
    validate_norm_config,
)
from normlab.norm.batchnorm_variants import BatchRenorm2d, GhostBatchNorm2d
from normlab.norm.weight_standardization import WSConv2d, standardize_convs

D = torch.float64
EPS = 1e-5


def batches(n: int = 4, shape: tuple = (10, 3, 5, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=D) * (1 + i) + i for i in range(n)]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased and unbiased variance of (N, C, ...), from their definitions."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    n = flat.shape[1]
    mean = flat.sum(1) / n
    sq = ((flat - mean[:, None]) ** 2).sum(1)
    return mean, sq / n, sq / (n - 1)


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def randomize_affine(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g, dtype=D) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=D))


# --- batch renormalization ----------------------------------------------------------------------


def renorm_reference(xs, gamma, beta, r_max, d_max, warmup, momentum=0.1):
    """Ioffe 2017, Algorithm 1, with the limits ramped linearly over ``warmup`` steps."""
    mu, var = torch.zeros(xs[0].shape[1], dtype=D), torch.ones(xs[0].shape[1], dtype=D)
    outs = []
    for t, x in enumerate(xs):
        p = min(1.0, t / warmup) if warmup else 1.0
        rm, dm = 1 + (r_max - 1) * p, d_max * p
        mean_b, var_b, unbiased = channel_stats(x)
        sigma_b, sigma = (var_b + EPS).sqrt(), (var + EPS).sqrt()
        r = (sigma_b / sigma).clamp(1 / rm, rm)
        d = ((mean_b - mu) / sigma).clamp(-dm, dm)
        xhat = (x - per_channel(mean_b, x)) / per_channel(sigma_b, x) * per_channel(r, x)
        outs.append(per_channel(gamma, x) * (xhat + per_channel(d, x)) + per_channel(beta, x))
        mu = (1 - momentum) * mu + momentum * mean_b
        var = (1 - momentum) * var + momentum * unbiased
    return outs, mu, var


def test_batch_renorm_with_r_max_1_d_max_0_is_batchnorm() -> None:
    renorm = BatchRenorm2d(3, r_max=1.0, d_max=0.0, warmup_steps=0).to(D)
    bn = nn.BatchNorm2d(3).to(D)
    randomize_affine(renorm)
    bn.load_state_dict(renorm.state_dict())
    xs = batches()
    gamma, beta = renorm.weight.detach(), renorm.bias.detach()
    ref, mu, var = renorm_reference(xs, gamma, beta, 1.0, 0.0, 0)
    for x, expected in zip(xs, ref, strict=True):
        torch.testing.assert_close(renorm(x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(bn(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(renorm.running_mean, mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(renorm.running_var, var, rtol=0, atol=1e-12)
    assert int(renorm.num_batches_tracked) == 4
    x = xs[0]  # eval mode: BatchNorm's, with the running statistics
    expected = (x - per_channel(mu, x)) / per_channel((var + EPS).sqrt(), x)
    expected = per_channel(gamma, x) * expected + per_channel(beta, x)
    torch.testing.assert_close(renorm.eval()(x), expected, rtol=0, atol=1e-12)


def test_batch_renorm_clips_r_and_d_along_the_warm_up_and_stops_their_gradient() -> None:
    renorm = BatchRenorm2d(3, r_max=1.5, d_max=0.5, warmup_steps=2).to(D)
    randomize_affine(renorm)
    xs = batches(n=4)  # means 0..3, stds 1..4: far from the running statistics, so r, d clip
    gamma, beta = renorm.weight.detach(), renorm.bias.detach()
    ref, mu, var = renorm_reference(xs, gamma, beta, 1.5, 0.5, 2)
    for t, (x, expected) in enumerate(zip(xs, ref, strict=True)):
        r_max, d_max = renorm.limits()
        assert (float(r_max), float(d_max)) == pytest.approx(
            (1 + 0.5 * min(1, t / 2), 0.5 * min(1, t / 2))
        )
        torch.testing.assert_close(renorm(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(renorm.running_mean, mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(renorm.running_var, var, rtol=0, atol=1e-12)
    assert not torch.allclose(ref[-1], F.batch_norm(xs[-1], None, None, gamma, beta, True))

    # r and d are constants for backprop: the gradient is that of x -> (x - mu_B)/sigma_B * r + d
    x = xs[-1].clone().requires_grad_()
    snapshot = {k: v.clone() for k, v in renorm.state_dict().items()}
    renorm(x).pow(2).sum().backward()
    renorm.load_state_dict(snapshot)
    x_ref = xs[-1].clone().requires_grad_()
    mean_b, var_b, _ = channel_stats(x_ref)
    sigma_b = (var_b + EPS).sqrt()
    sigma = (renorm.running_var + EPS).sqrt()
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5).detach()
    d = ((mean_b - renorm.running_mean) / sigma).clamp(-0.5, 0.5).detach()
    y = (x_ref - per_channel(mean_b, x_ref)) / per_channel(sigma_b, x_ref) * per_channel(r, x_ref)
    y = per_channel(gamma, x_ref) * (y + per_channel(d, x_ref)) + per_channel(beta, x_ref)
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)


# --- ghost batch normalization ------------------------------------------------------------------


def test_ghost_batchnorm_with_the_whole_batch_as_virtual_batch_is_batchnorm() -> None:
    ghost = GhostBatchNorm2d(3, virtual_batch_size=10).to(D)
    bn = nn.BatchNorm2d(3).to(D)
    randomize_affine(ghost)
    bn.load_state_dict(ghost.state_dict())
    for x in batches():
        torch.testing.assert_close(ghost(x), bn(x), rtol=0, atol=1e-12)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, rtol=0, atol=1e-12)
    x = batches(1, seed=3)[0]
    torch.testing.assert_close(ghost.eval()(x), bn.eval()(x), rtol=0, atol=1e-12)


def test_ghost_batchnorm_normalizes_each_virtual_batch_and_averages_their_statistics() -> None:
    ghost = GhostBatchNorm2d(3, virtual_batch_size=4).to(D)
    randomize_affine(ghost)
    x = batches(1, shape=(10, 3, 2, 2))[0]  # 4 + 4 + 2: the remainder is a smaller last batch
    gamma, beta = ghost.weight.detach(), ghost.bias.detach()
    expected, means, variances = [], [], []
    for chunk in (x[:4], x[4:8], x[8:]):
        mean, biased, unbiased = channel_stats(chunk)
        xhat = (chunk - per_channel(mean, chunk)) / per_channel((biased + EPS).sqrt(), chunk)
        expected.append(per_channel(gamma, chunk) * xhat + per_channel(beta, chunk))
        means.append(mean * len(chunk) / 10)
        variances.append(unbiased * len(chunk) / 10)
    torch.testing.assert_close(ghost(x), torch.cat(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.running_mean, 0.1 * sum(means), rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, 0.9 + 0.1 * sum(variances), rtol=0, atol=1e-12)
    assert int(ghost.num_batches_tracked) == 1
    # the smaller last batch must still hold more than one value per channel, as BatchNorm's
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm2d(3, virtual_batch_size=4)(torch.randn(9, 3, 1, 1))


# --- instance norm, channels-only LayerNorm -------------------------------------------------------


def test_instance_norm_is_group_norm_with_one_channel_per_group_and_its_formula() -> None:
    inorm = make_norm_factory({"name": "instancenorm"})(3).to(D)
    randomize_affine(inorm)
    gn = nn.GroupNorm(3, 3).to(D)
    gn.load_state_dict(inorm.state_dict())
    x = batches(1)[0]
    flat = x.reshape(10, 3, -1)
    mean = flat.mean(-1, keepdim=True)
    var = ((flat - mean) ** 2).mean(-1, keepdim=True)
    expected = ((flat - mean) / (var + EPS).sqrt()).reshape_as(x)
    expected = per_channel(inorm.weight.detach(), x) * expected + per_channel(inorm.bias, x)
    for mode in (True, False):  # no running statistics: the same in training and eval mode
        torch.testing.assert_close(inorm.train(mode)(x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(gn(x), expected, rtol=0, atol=1e-12)
    assert sorted(inorm.state_dict()) == ["bias", "weight"]


def test_layernorm2d_normalizes_over_channels_at_each_position() -> None:
    ln = make_norm_factory({"name": "layernorm2d"})(3).to(D)
    randomize_affine(ln)
    x = batches(1)[0]
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    expected = (x - mean) / (var + EPS).sqrt()
    expected = per_channel(ln.weight.detach(), x) * expected + per_channel(ln.bias, x)
    torch.testing.assert_close(ln(x), expected, rtol=0, atol=1e-12)
    # not norm=layernorm / groupnorm1 (GroupNorm(1, C): over C, H and W), which stay the same layer
    for old in ("layernorm", "groupnorm1"):
        gn1 = make_norm_factory({"name": old})(3).to(D)
        gn1.load_state_dict(ln.state_dict())
        assert (type(gn1), gn1.num_groups) == (nn.GroupNorm, 1)
        assert (gn1(x) - expected).abs().max() > 0.1


# --- weight standardization + GroupNorm ---------------------------------------------------------


def test_ws_conv_convolves_with_the_weight_standardized_per_output_channel() -> None:
    conv = WSConv2d(3, 4, 3, padding=1).to(D)
    x = batches(1)[0]
    w = conv.weight.detach()
    flat = w.reshape(4, -1)
    mean = flat.mean(1)
    std = (((flat - mean[:, None]) ** 2).mean(1) + 1e-6).sqrt()
    w_std = (w - mean.reshape(4, 1, 1, 1)) / std.reshape(4, 1, 1, 1)
    expected = F.conv2d(x, w_std, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-12)
    assert sorted(conv.state_dict()) == ["bias", "weight"]
    torch.testing.assert_close(conv.weight, w)  # the stored weight stays the raw parameter


def test_gn_ws_standardizes_every_conv_feeding_a_norm_and_keeps_the_keys() -> None:
    import torchvision

    plain = torchvision.models.resnet18(num_classes=3)
    keys = list(plain.state_dict())
    model = convert_norm(plain, {"name": "gn_ws", "num_groups": 8})
    convs = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 20 and set(convs.values()) == {WSConv2d}  # incl. downsample.0
    assert isinstance(model.layer4[0].downsample[1], nn.GroupNorm)
    assert [k for k in model.state_dict() if "running" not in k and "num_batches" not in k] == [
        k for k in keys if "running" not in k and "num_batches" not in k
    ]
    # a conv whose output is not normalized keeps its plain weights
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    assert standardize_convs(net) == ["0"] and type(net[3]) is nn.Conv2d

    class Shortcut(nn.Module):  # the conv's output is also read past the norm: not standardized
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(y) + y

    assert standardize_convs(Shortcut()) == []


# --- state_dict, checkpoints, frozen ------------------------------------------------------------

NEW = ["batchrenorm", "ghostbatchnorm", "instancenorm", "layernorm2d", "groupnorm1", "gn_ws"]


@pytest.mark.parametrize("name", NEW)
def test_each_new_norm_builds_the_convnet_and_round_trips_its_state_dict(name: str) -> None:
    from normlab.models import NormLabModule

    model = NormLabModule(10, 1, {"name": name, "num_groups": 4})
    x = torch.randn(16, 1, 8, 8)
    model.train()
    model.net(x).sum().backward()  # a training step's forward updates running statistics
    state = model.state_dict()
    again = NormLabModule(10, 1, {"name": name, "num_groups": 4})
    again.load_state_dict(state, strict=True)
    torch.testing.assert_close(again.eval().net(x), model.eval().net(x), rtol=0, atol=0)
    norm_kind = {"batchrenorm": BatchRenorm2d, "ghostbatchnorm": GhostBatchNorm2d}
    if name in norm_kind:  # BatchNorm's keys, so inspection tags and norm=frozen find them
        layers = [n for n, m in model.net.named_modules() if isinstance(m, norm_kind[name])]
        assert layers and f"net.{layers[0]}.running_mean" in state
        assert int(state[f"net.{layers[0]}.num_batches_tracked"]) == 1
        bn = NormLabModule(10, 1, {"name": "batchnorm"})
        bn.load_state_dict(state, strict=True)
        torch.testing.assert_close(bn.eval().net(x), model.net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["batchrenorm", "ghostbatchnorm"])
def test_frozen_takes_the_running_statistics_of_the_batchnorm_variants(name: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), make_norm_factory({"name": name})(8))
    for x in batches(3, shape=(6, 3, 6, 6)):
        model(x.float())
    model.eval()
    x = torch.randn(4, 3, 6, 6)
    expected = model(x)
    frozen = convert_norm(model, {"name": "frozen"})
    assert isinstance(frozen[1], FrozenBatchNorm2d)
    torch.testing.assert_close(frozen.train()(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 7), (6, 4, 3, 3, 3)], ids=["1d", "1d_seq", "3d"])
def test_frozen_batchnorm_normalizes_batchnorm1d_and_3d_input(shape: tuple) -> None:
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}[len(shape)](4).to(D)
    for x in batches(3, shape=shape):
        bn(x)
    bn.eval()
    frozen = convert_norm(nn.Sequential(bn), {"name": "frozen"})[0]
    x = batches(1, shape=shape, seed=9)[0]
    mean, var = per_channel(bn.running_mean, x), per_channel(bn.running_var, x)
    expected = per_channel(bn.weight.detach(), x) * (x - mean) / (var + EPS).sqrt()
    expected = expected + per_channel(bn.bias.detach(), x)
    torch.testing.assert_close(frozen.train()(x), expected, rtol=0, atol=1e-12)


# --- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"name": "batchrenorm", "r_max": 0.5}, "norm.r_max"),
        ({"name": "batchrenorm", "d_max": -1}, "norm.d_max"),
        ({"name": "batchrenorm", "renorm_warmup_steps": 1.5}, "norm.renorm_warmup_steps"),
        ({"name": "ghostbatchnorm", "virtual_batch_size": 0}, "norm.virtual_batch_size"),
    ],
)
def test_bad_values_of_the_new_keys_name_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(NormConfigError, match=rf"{key}="):
        make_norm_factory(cfg)


def test_gn_ws_num_groups_must_divide_the_channels_as_groupnorms() -> None:
    import torchvision

    with pytest.raises(NormConfigError, match=r"norm.num_groups=3.*divisors of all of \[32, 64\]"):
        validate_norm_config({"name": "gn_ws", "num_groups": 3}, channels=[32, 64])
    with pytest.raises(NormConfigError, match="norm.num_groups=3.*64 channels of layer bn1"):
        convert_norm(torchvision.models.resnet18(), {"name": "gn_ws", "num_groups": 3})


@pytest.mark.parametrize("name", ["batchrenorm", "ghostbatchnorm"])
def test_sync_batchnorm_is_refused_for_the_per_device_variants(name: str) -> None:
    cfg = {
        "trainer": {"sync_batchnorm": True, "devices": 2},
        "norm": {"name": name},
        "data": {"batch_size": 32},
    }
    with pytest.raises(ConfigError, match=rf"trainer.sync_batchnorm=True.*norm={name}"):
        check_batchnorm_setup(cfg, "cuda")
    check_batchnorm_setup({**cfg, "trainer": {"sync_batchnorm": False}}, "cpu")
