"""Unit tests for normlab.norm: the norm factory, validation, FrozenBatchNorm2d, conversions,
weight decay groups, precise-BN population statistics (normlab.norm.stats)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import CheckpointError
from normlab.norm import (
    NORMS,
    FrozenBatchNorm2d,
    NormConfigError,
    batchnorm_layers,
    convert_to_batchnorm,
    convert_to_frozen,
    is_batchnorm,
    is_norm_layer,
    make_norm_factory,
    norm_has_bias,
    param_groups,
    validate_norm_config,
)
from normlab.norm.stats import apply_population_stats, estimate_population_stats
from tests.conftest import ROOT


def small_cnn(norm: str = "batchnorm") -> nn.Sequential:
    factory = make_norm_factory({"name": norm, "num_groups": 2 if norm == "groupnorm" else None})
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        factory(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1, bias=False),
        factory(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def randomize_bn(bn: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.num_batches_tracked.fill_(7)


# --- factory -------------------------------------------------------------------------------------


def test_batchnorm_running_stats_after_one_batch() -> None:
    torch.manual_seed(0)
    bn = make_norm_factory({"name": "batchnorm"})(16)
    assert isinstance(bn, nn.BatchNorm2d) and bn.momentum == 0.1 and bn.eps == 1e-5
    x = torch.rand(100, 16, 28, 28)
    bn.train()
    bn(x)
    expected_mean = 0.1 * x.mean(dim=(0, 2, 3))
    expected_var = 0.9 * 1.0 + 0.1 * x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_mean, expected_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, expected_var, atol=1e-6, rtol=0)
    # the DESIGN's figures, by hand: U(0, 1) has mean 1/2 and variance 1/12, so running_mean is
    # 0.1 * 0.5 = 0.0500 and running_var 0.9 * 1 + 0.1 / 12 = 0.9083
    assert torch.allclose(bn.running_mean, torch.full((16,), 0.0500), atol=2e-3)
    assert torch.allclose(bn.running_var, torch.full((16,), 0.9083), atol=2e-3)
    assert bn.num_batches_tracked.item() == 1


def test_batchnorm_momentum_cumulative_is_cumulative_average() -> None:
    torch.manual_seed(1)
    # null means "unset" (PyTorch's 0.1 for a fresh layer); "cumulative" is PyTorch's None
    assert make_norm_factory({"name": "batchnorm", "momentum": None})(4).momentum == 0.1
    bn = make_norm_factory({"name": "batchnorm", "momentum": "cumulative"})(4)
    assert bn.momentum is None
    xs = [torch.randn(8, 4, 5, 5) * (i + 1) + i for i in range(3)]
    for x in xs:
        bn(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn.running_var, variances, atol=1e-6, rtol=1e-6)
    assert bn.num_batches_tracked.item() == 3


def test_factory_types_and_options() -> None:
    assert isinstance(make_norm_factory({"name": "none"})(8), nn.Identity)
    bn = make_norm_factory({"name": "batchnorm", "momentum": 0.3, "eps": 1e-3, "affine": False})(8)
    assert (bn.momentum, bn.eps, bn.affine, bn.weight) == (0.3, 1e-3, False, None)
    fz = make_norm_factory({"name": "frozen", "eps": 1e-4, "freeze_affine": True})(8)
    assert isinstance(fz, FrozenBatchNorm2d) and fz.eps == 1e-4 and fz.freeze_affine
    gn = make_norm_factory({"name": "groupnorm", "num_groups": 4})(8)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4 and gn.num_channels == 8
    ln = make_norm_factory({"name": "layernorm"})(8)
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    # The factory is picklable (no closures), e.g. for spawn-based launchers.
    factory = pickle.loads(pickle.dumps(make_norm_factory({"name": "groupnorm", "num_groups": 2})))
    assert factory(6).num_groups == 2


@pytest.mark.parametrize("name", ["groupnorm", "layernorm"])
def test_groupnorm_layernorm_have_no_running_stats(name: str) -> None:
    layer = make_norm_factory({"name": name, "num_groups": 4 if name == "groupnorm" else None})(8)
    assert [n for n, _ in layer.named_buffers()] == []
    assert sorted(layer.state_dict()) == ["bias", "weight"]


def test_layernorm_normalizes_each_sample_over_chw() -> None:
    torch.manual_seed(2)
    ln = make_norm_factory({"name": "layernorm"})(6)
    x = torch.randn(5, 6, 7, 7) * torch.arange(1, 6).view(5, 1, 1, 1) + 3.0
    y = ln(x).flatten(1)
    torch.testing.assert_close(y.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    ref = F.layer_norm(x, x.shape[1:], eps=1e-5)
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=0)


def test_norm_has_bias() -> None:
    assert norm_has_bias({"name": "batchnorm"})
    assert not norm_has_bias({"name": "batchnorm", "affine": False})
    assert norm_has_bias({"name": "frozen", "freeze_affine": True})
    assert norm_has_bias({"name": "groupnorm"}) and norm_has_bias({"name": "layernorm"})
    assert not norm_has_bias({"name": "none"})


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "kwargs", "key", "value"),
    [
        ({"name": "batchnorm", "momentum": 1.5}, {}, "norm.momentum", "1.5"),
        ({"name": "batchnorm", "momentum": -0.1}, {}, "norm.momentum", "-0.1"),
        ({"name": "batchnorm", "eps": 0}, {}, "norm.eps", "0"),
        ({"name": "groupnorm", "num_groups": 3}, {"channels": [32, 64]}, "norm.num_groups", "3"),
        (
            {"name": "batchnorm", "freeze_at_epoch": 5},
            {"max_epochs": 5},
            "norm.freeze_at_epoch",
            "5",
        ),
        (
            {"name": "batchnorm", "freeze_at_epoch": 0},
            {"max_epochs": 5},
            "norm.freeze_at_epoch",
            "0",
        ),
        ({"name": "nosuchnorm"}, {}, "norm.name", "nosuchnorm"),
        (
            {"name": "frozen", "init_from": "/nonexistent.ckpt"},
            {},
            "norm.init_from",
            "/nonexistent.ckpt",
        ),
        ({"name": "batchnorm", "precise_bn_batches": -1}, {}, "norm.precise_bn_batches", "-1"),
        ({"name": "frozen", "calibration_batches": 2.5}, {}, "norm.calibration_batches", "2.5"),
        ({"name": "batchnorm", "affine": "yes"}, {}, "norm.affine", "yes"),
    ],
)
def test_validate_rejects_bad_values(cfg: dict, kwargs: dict, key: str, value: str) -> None:
    with pytest.raises(NormConfigError) as info:
        validate_norm_config(cfg, **kwargs)
    assert key in str(info.value) and value in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(NormConfigError, match=key.replace(".", r"\.")):
        factory_checks = not kwargs and key != "norm.init_from"  # files: at training time only
        make_norm_factory(cfg) if factory_checks else validate_norm_config(cfg, **kwargs)


def test_validate_messages_list_choices() -> None:
    with pytest.raises(NormConfigError) as info:
        validate_norm_config({"name": "nosuchnorm"})
    assert all(n in str(info.value) for n in NORMS)
    with pytest.raises(NormConfigError) as info:
        validate_norm_config({"name": "groupnorm", "num_groups": 3}, channels=[32, 64])
    assert "32" in str(info.value)  # the offending channel count
    with pytest.raises(NormConfigError) as info:
        validate_norm_config({"name": "groupnorm", "num_groups": 16}, channels=[32, 24])
    assert "24" in str(info.value)


def fake_checkpoint(path: Path, state_dict: dict, norm: str = "batchnorm") -> Path:
    """A file with the structure of a normlab checkpoint (what load_checkpoint checks)."""
    torch.save(
        {"normlab": {"format": 1, "config": {"norm": {"name": norm}}}, "state_dict": state_dict},
        path,
    )
    return path


def test_validate_init_from_must_be_a_checkpoint_with_statistics(tmp_path: Path) -> None:
    from normlab.callbacks.norm_lifecycle import init_from_state_dict

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"norm.init_from=.*notes.txt is not a normlab"):
        init_from_state_dict(str(text))
    gn = fake_checkpoint(tmp_path / "gn.ckpt", {"net.1.weight": torch.ones(2)}, norm="groupnorm")
    with pytest.raises(CheckpointError, match="no BatchNorm running statistics.*norm=groupnorm"):
        init_from_state_dict(str(gn))
    # a model rebuilt from a checkpoint (eval.py) does not need the init_from file any more
    text.unlink()
    assert isinstance(make_norm_factory({"name": "frozen", "init_from": str(text)})(4), nn.Module)


def test_init_from_is_read_once_while_the_file_is_unchanged(tmp_path: Path) -> None:
    """The config check and the fit start both ask for norm.init_from's statistics: one read."""
    import os

    from normlab.callbacks.norm_lifecycle import init_from_state_dict

    path = fake_checkpoint(tmp_path / "bn.ckpt", {"net.1.running_mean": torch.zeros(2)})
    first = init_from_state_dict(str(path))
    assert init_from_state_dict(str(path)) is first
    fake_checkpoint(path, {"net.1.running_mean": torch.ones(3)})  # rewritten: read again
    os.utime(path, ns=(1, 1))
    again = init_from_state_dict(str(path))
    assert again is not first and again["net.1.running_mean"].tolist() == [1.0, 1.0, 1.0]


def test_validate_accepts_good_configs(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "bn.ckpt", {"net.1.running_mean": torch.zeros(2)})
    good = [
        ({"name": "none"}, {}),
        (
            {"name": "batchnorm", "momentum": None, "freeze_at_epoch": 4, "num_groups": None},
            {"max_epochs": 5},
        ),
        ({"name": "batchnorm", "momentum": 0, "precise_bn_batches": 0}, {}),
        ({"name": "batchnorm", "freeze_at_epoch": 100}, {"max_epochs": -1}),
        ({"name": "frozen", "calibration_batches": 20, "init_from": str(ckpt)}, {}),
        ({"name": "groupnorm", "num_groups": 8}, {"channels": [32, 64]}),
        ({"name": "layernorm", "eps": 1e-6}, {"channels": [3, 5]}),
    ]
    for cfg, kwargs in good:
        validate_norm_config(cfg, **kwargs)


@pytest.mark.parametrize(
    ("cfg", "key", "expected"),
    [
        ({"name": "layernorm", "num_groups": 4}, "num_groups", "norm=layernorm does not use it"),
        ({"name": "batchnorm", "init_from": "x.ckpt"}, "init_from", "a norm that does (frozen)"),
        ({"name": "none", "eps": 1e-3}, "eps", "norm=none does not use it (it takes adapt, fold)"),
        ({"name": "groupnorm", "num_groups": 8, "epsilon": 1}, "epsilon", "(none does)"),
    ],
)
def test_a_key_the_norm_does_not_take_is_refused(cfg: dict, key: str, expected: str) -> None:
    """It was silently ignored (``norm=layernorm +norm.num_groups=4`` trained a LayerNorm)."""
    with pytest.raises(NormConfigError, match=f"norm.{key}=") as info:
        validate_norm_config(cfg)
    assert expected in str(info.value)


@pytest.mark.parametrize("name", NORMS)
def test_every_norm_declares_the_keys_of_its_config_file(name: str) -> None:
    """configs/norm/<name>.yaml sets only keys its norm takes (NORM_KEYS is the table)."""
    import yaml

    from normlab.norm.schema import NORM_KEYS

    text = (ROOT / "configs" / "norm" / f"{name}.yaml").read_text()
    assert set(yaml.safe_load(text)) - {"name"} <= set(NORM_KEYS[name])


# --- FrozenBatchNorm2d -------------------------------------------------------------------------


def test_frozen_matches_batchnorm_eval_and_never_updates() -> None:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(6)
    randomize_bn(bn)
    bn.eval()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    for mode in (False, True):
        frozen.train(mode)
        assert (frozen(x) - bn(x)).abs().max().item() <= 1e-6
    fresh = FrozenBatchNorm2d(6)
    fresh.load_state_dict(bn.state_dict())
    assert (fresh.train()(x) - bn(x)).abs().max().item() <= 1e-6

    buffers = {k: v.clone() for k, v in frozen.named_buffers()}
    frozen.train()
    frozen(x).square().sum().backward()
    for k, v in frozen.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert frozen.weight.grad is not None and frozen.bias.grad is not None
    assert frozen.weight.grad.abs().sum() > 0
    assert (frozen.momentum, frozen.affine, frozen.track_running_stats) == (None, True, True)
    assert "eps=1e-05" in repr(frozen) and "momentum=None" in repr(frozen)
    assert frozen.source_momentum == 0.1  # given back by convert_to_batchnorm


def test_frozen_freeze_affine_has_no_trainable_params() -> None:
    bn = nn.BatchNorm2d(4)
    randomize_bn(bn)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn, freeze_affine=True)
    assert [p for p in frozen.parameters() if p.requires_grad] == []
    assert sorted(frozen.state_dict()) == sorted(bn.state_dict())
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    frozen(x).sum().backward()
    assert x.grad is not None and frozen.weight.grad is None
    torch.testing.assert_close(frozen(x), bn.eval()(x), atol=1e-6, rtol=0)


def test_state_dict_keys_and_loading_both_ways() -> None:
    bn = nn.BatchNorm2d(5)
    randomize_bn(bn)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())
    assert list(frozen.state_dict()) == list(bn.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(frozen.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    old = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm2d(5).load_state_dict(old)  # pre-num_batches_tracked checkpoints load


def test_convert_round_trip_is_bit_exact() -> None:
    torch.manual_seed(4)
    model = small_cnn()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    weight_before = model[1].weight
    x = torch.randn(2, 3, 6, 6)
    expected = model.eval()(x)

    assert convert_to_frozen(model) is model
    assert [type(m) for _, m in batchnorm_layers(model)] == [FrozenBatchNorm2d] * 2
    assert model[1].weight is weight_before  # an existing optimizer keeps training gamma
    assert list(model.state_dict()) == list(original)
    assert torch.equal(model.train()(x), expected)

    assert convert_to_batchnorm(model, momentum=0.2) is model
    assert [type(m) for _, m in batchnorm_layers(model)] == [nn.BatchNorm2d] * 2
    assert model[1].momentum == 0.2
    state = model.state_dict()
    assert list(state) == list(original)
    for k, v in original.items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype, k

    root = convert_to_frozen(nn.BatchNorm2d(3))
    assert isinstance(root, FrozenBatchNorm2d)
    assert isinstance(convert_to_batchnorm(root), nn.BatchNorm2d)


def test_convert_keeps_dtype_and_freeze_affine() -> None:
    model = small_cnn().double()
    convert_to_frozen(model, freeze_affine=True)
    assert model[1].running_mean.dtype == torch.float64 and model[1].weight.dtype == torch.float64
    assert all(not isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(p.requires_grad for p in model[1].parameters())
    convert_to_batchnorm(model)
    assert isinstance(model[1].weight, nn.Parameter) and model[1].weight.requires_grad


def test_layer_predicates_and_param_groups() -> None:
    model = small_cnn()
    assert is_batchnorm(model[1]) and is_batchnorm(FrozenBatchNorm2d(3))
    assert not is_batchnorm(nn.GroupNorm(1, 3)) and is_norm_layer(nn.GroupNorm(1, 3))
    assert is_norm_layer(nn.LayerNorm(3)) and not is_norm_layer(nn.Conv2d(1, 1, 1))
    assert [n for n, _ in batchnorm_layers(model)] == ["1", "4"]

    groups = param_groups(model, weight_decay=1e-4, norm_weight_decay=0.0)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    norm_ids = {id(p) for n in ("1", "4") for p in model.get_submodule(n).parameters()}
    assert {id(p) for p in groups[1]["params"]} == norm_ids and len(norm_ids) == 4
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    torch.optim.SGD(groups, lr=0.1)  # accepted by an optimizer

    convert_to_frozen(model, freeze_affine=True)
    groups = param_groups(model, weight_decay=1e-4, norm_weight_decay=0.5)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
    assert len(groups[0]["params"]) == 4  # two conv weights, the linear layer's weight and bias


# --- precise-BN ----------------------------------------------------------------------------


def uneven_batches(channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([0.5, 2.0, 4.0]).view(1, channels, 1, 1)
    shift = torch.tensor([1.0, -3.0, 10.0]).view(1, channels, 1, 1)
    return [torch.randn(n, channels, 4, 5, generator=g) * scale + shift for n in (7, 13, 2, 30)]


def test_population_stats_single_layer_are_exact() -> None:
    batches = uneven_batches()
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.1))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = estimate_population_stats(model, iter(batches), num_batches=10)
    assert list(stats) == ["0"]
    everything = torch.cat(batches).double()
    mean, var = stats["0"]
    exp_mean, exp_var = everything.mean(dim=(0, 2, 3)), everything.var(dim=(0, 2, 3), unbiased=True)
    assert ((mean.double() - exp_mean).abs() / exp_mean.abs()).max() <= 1e-5
    assert ((var.double() - exp_var).abs() / exp_var).max() <= 1e-5
    # Nothing changed, not even the mode; apply writes and reports how far the stats moved.
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    moved = apply_population_stats(model, stats)
    expected_move = max(exp_mean.abs().max().item(), (exp_var - 1).abs().max().item())
    assert moved == pytest.approx(expected_move, rel=1e-5)
    assert torch.equal(model[0].running_mean, mean) and torch.equal(model[0].running_var, var)
    assert apply_population_stats(model, stats) == 0.0  # the same values again: nothing moved

    # num_batches limits the pass: the first two batches only, or the first alone.
    for n in (2, 1):
        first = torch.cat(batches[:n])
        mean_n, _ = estimate_population_stats(model, batches, num_batches=n)["0"]
        torch.testing.assert_close(mean_n, first.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [False, True])
def test_population_stats_second_layer_sees_batch_normalized_input(frozen: bool) -> None:
    batches = uneven_batches()
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    randomize_bn(model[0], seed=6)
    if frozen:
        convert_to_frozen(model)
    stats = estimate_population_stats(model, [(b, None) for b in batches], num_batches=4)
    # Documented: every BN-like layer normalizes with its batch's statistics during the pass.
    with torch.no_grad():
        layer0 = model[0]
        inputs = [
            model[1](F.batch_norm(b, None, None, layer0.weight, layer0.bias, training=True))
            for b in batches
        ]
    everything = torch.cat(inputs).double()
    mean, var = stats["2"]
    torch.testing.assert_close(mean.double(), everything.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), everything.var(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    if frozen:  # frozen layers kept their statistics and still ignore the batch
        assert isinstance(model[0], FrozenBatchNorm2d)
        assert model[0].running_mean.abs().sum() > 0


def test_population_stats_frozen_norm_act_layer_keeps_its_eps_and_activation() -> None:
    """A frozen norm+activation layer (timm's BatchNormAct2d after norm=frozen) with its own eps
    normalizes with the batch's statistics, that eps, then its activation; the pass leaves no
    hook behind. The reference is written out with F.batch_norm and relu."""
    first = FrozenBatchNorm2d(3, eps=0.5)
    first.add_module("act", nn.ReLU())
    randomize_bn(first, seed=8)
    model = nn.Sequential(first, nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    batches = uneven_batches()
    stats = estimate_population_stats(model, batches, num_batches=4)
    with torch.no_grad():
        inputs = [
            model[1](F.relu(F.batch_norm(b, None, None, first.weight, first.bias, True, 0, 0.5)))
            for b in batches
        ]
    mean, var = stats["2"]
    everything = torch.cat(inputs).double()
    torch.testing.assert_close(mean.double(), everything.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), everything.var(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, m


def test_population_stats_are_accumulated_in_float64() -> None:
    """float32 inputs far from 0 (1e4 +- 1): the variance from float64 sums is right to 1e-6;
    float32 sums are off by about 1e-4 (measured). Two samples: the unbiased variance divides
    by 1."""
    g = torch.Generator().manual_seed(9)
    batches = [(1e4 + torch.randn(n, 2, generator=g)).float() for n in (5, 9, 6)]
    ((mean, var),) = estimate_population_stats(nn.BatchNorm1d(2), batches, 3).values()
    everything = torch.cat(batches).double()
    torch.testing.assert_close(var.double(), everything.var(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, everything.mean(0).float(), rtol=0, atol=0)  # float32 of it
    two = torch.tensor([[1.0, 5.0], [3.0, 9.0]])  # per channel: mean 2, 7; variance 2, 8
    ((mean, var),) = estimate_population_stats(nn.BatchNorm1d(2), [two], 1).values()
    assert mean.tolist() == [2.0, 7.0] and var.tolist() == [2.0, 8.0]


def test_population_stats_rejects_bad_arguments() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"^num_batches=0 must be >= 1$"):
        estimate_population_stats(model, uneven_batches(), num_batches=0)
    # anchored: mutmut's XX...XX affix around the message must fail it too
    with pytest.raises(ValueError, match=r"^estimate_population_stats got no batches$"):
        estimate_population_stats(model, [], num_batches=3)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, affine=False))
    model[2].track_running_stats, model[2].running_mean, model[2].running_var = False, None, None
    for name in ("nope", "1", "2"):  # no such layer, a conv, a BatchNorm without statistics
        with pytest.raises(KeyError, match=f"'{name}' is not a layer with running statistics"):
            apply_population_stats(model, {name: (torch.zeros(3), torch.ones(3))})


def test_acc_is_the_fraction_of_correct_predictions() -> None:
    # 3 of 4 right, all predicted as class 0: accuracy 0.75 (macro averaging would say 0.5)
    from normlab.models import NormLabModule

    model = NormLabModule(num_classes=2, in_channels=1, norm={"name": "none"}, net={"widths": [2]})
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0.0]] * 4)
    for stage in ("train_", "val_", "test_"):
        model.accuracy[stage].update(logits, labels)
        assert model.accuracy[stage].compute().item() == pytest.approx(3 / 4)


# --- the norm spec: every norm.* key once ------------------------------------------------------


def test_every_norm_yaml_lists_the_spec_keys_of_its_norm_with_their_defaults() -> None:
    import yaml

    from normlab.norm.spec import NORMS, defaults

    folder = Path(__file__).resolve().parents[1] / "configs" / "norm"
    files = sorted(p.stem for p in folder.glob("*.yaml"))
    assert files == sorted(NORMS)
    for name in NORMS:
        assert yaml.safe_load((folder / f"{name}.yaml").read_text()) == defaults(name), name


def test_spec_derives_resume_hparams_and_fresh_settings() -> None:
    from normlab.norm.registry import FRESH
    from normlab.resume import RESUME_MAY_CHANGE
    from normlab.utils.results import hparams_row

    assert FRESH == {"momentum": 0.1, "eps": 1e-5, "affine": True, "track_running_stats": True}
    norm_may_change = {k for k in RESUME_MAY_CHANGE if k.startswith("norm.")}
    assert norm_may_change == {
        "norm.calibration_batches", "norm.init_from", "norm.precise_bn_batches",
        "norm.distribute_bn", "norm.freeze_at_epoch", "norm.adapt",
    }  # fmt: skip
    row = hparams_row({"norm": {"name": "groupnorm", "num_groups": 4}})
    norm_columns = [k for k in row if k.startswith("norm.")]
    assert norm_columns == [
        "norm.name", "norm.momentum", "norm.eps", "norm.affine", "norm.num_groups",
        "norm.precise_bn_batches", "norm.distribute_bn", "norm.freeze_at_epoch",
        "norm.calibration_batches", "norm.init_from", "norm.freeze_affine",
    ]  # fmt: skip
    assert (row["norm.num_groups"], row["norm.momentum"]) == (4, "")


def test_spec_checks_every_key_it_lists() -> None:
    from normlab.norm.spec import KEYS

    bad = {"name": "x", "momentum": 2, "eps": -1.0, "affine": 1, "track_running_stats": "no",
           "num_groups": 0, "precise_bn_batches": -2, "distribute_bn": "yes",
           "freeze_at_epoch": 0, "calibration_batches": 0, "init_from": 3,
           "freeze_affine": "yes", "r_max": 0.9, "d_max": -0.1, "renorm_warmup_steps": -1,
           "virtual_batch_size": 0, "keep_affine": "yes", "fold": 1, "adapt": "train"}  # fmt: skip
    for key in KEYS:  # each value refused by its own check, under a norm that takes the key
        norm = key.norms[0] if key.name != "name" else "batchnorm"
        cfg = {"name": norm, key.name: bad[key.name]}
        with pytest.raises(NormConfigError, match=rf"norm\.{key.name}=") as info:
            validate_norm_config(cfg)
        assert "does not use it" not in str(info.value), info.value
