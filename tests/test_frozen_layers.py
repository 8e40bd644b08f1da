"""FrozenBatchNorm2d and its conversions checked against the definition
``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` written out by hand, for
inputs of any rank and without affine parameters; the settings each conversion keeps or sets
(mutation testing found these unchecked: docs/development.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.norm.layers import (
    FrozenBatchNorm2d,
    channels_of,
    convert_to_batchnorm,
    convert_to_frozen,
    freeze_named_layers,
    frozen_layer_names,
    is_frozen_batchnorm,
    keep_children,
    param_groups,
)


def _frozen_2ch(affine: bool = True, eps: float = 1e-5) -> FrozenBatchNorm2d:
    layer = FrozenBatchNorm2d(2, eps=eps, affine=affine)
    layer.running_mean.copy_(torch.tensor([1.0, -2.0]))
    layer.running_var.copy_(torch.tensor([4.0, 0.25]))
    if affine:
        layer.weight.data.copy_(torch.tensor([3.0, 0.5]))
        layer.bias.data.copy_(torch.tensor([0.1, -1.0]))
    return layer


@pytest.mark.parametrize("shape", [(2, 2), (2, 2, 3), (1, 2, 2, 2), (1, 2, 1, 2, 2)])
def test_frozen_forward_is_the_definition_for_any_rank(shape: tuple) -> None:
    eps = 0.5  # large, so a dropped or changed eps shows
    layer = _frozen_2ch(eps=eps)
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    # channel 0: (x - 1) / sqrt(4.5) * 3 + 0.1; channel 1: (x + 2) / sqrt(0.75) * 0.5 - 1
    expected = x.clone()
    expected[:, 0] = (x[:, 0] - 1.0) / math.sqrt(4.0 + eps) * 3.0 + 0.1
    expected[:, 1] = (x[:, 1] + 2.0) / math.sqrt(0.25 + eps) * 0.5 - 1.0
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), expected, atol=1e-5, rtol=1e-6)

    plain = _frozen_2ch(affine=False, eps=eps)
    expected[:, 0] = (x[:, 0] - 1.0) / math.sqrt(4.0 + eps)
    expected[:, 1] = (x[:, 1] + 2.0) / math.sqrt(0.25 + eps)
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-6)
    assert plain.weight is None and plain.bias is None and list(plain.parameters()) == []


def test_frozen_defaults_and_repr() -> None:
    layer = FrozenBatchNorm2d(3)
    assert (layer.num_features, layer.eps, layer.source_momentum) == (3, 1e-5, 0.1)
    assert (layer.freeze_affine, layer.affine) == (False, True)
    assert layer.weight.tolist() == [1.0] * 3 and layer.bias.tolist() == [0.0] * 3
    assert layer.running_mean.tolist() == [0.0] * 3 and layer.running_var.tolist() == [1.0] * 3
    assert layer.num_batches_tracked.item() == 0 and layer.num_batches_tracked.dtype == torch.long
    assert repr(layer) == (
        "FrozenBatchNorm2d(3, eps=1e-05, momentum=None, affine=True, track_running_stats=True,"
        " freeze_affine=False)"
    )
    # a BatchNorm checkpoint without num_batches_tracked loads, with the count 0 (as BatchNorm)
    old = {k: v for k, v in nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked"}
    layer.num_batches_tracked.fill_(7)
    layer.load_state_dict(old)
    assert layer.num_batches_tracked.item() == 0


def test_conversions_keep_eps_momentum_affine_and_mode() -> None:
    bn = nn.BatchNorm1d(4, eps=1e-3, momentum=0.3, affine=False).eval()
    bn.num_batches_tracked.fill_(5)
    frozen = convert_to_frozen(nn.Sequential(bn))[0]
    assert isinstance(frozen, FrozenBatchNorm2d) and not frozen.training
    assert (frozen.eps, frozen.source_momentum, frozen.affine, frozen.weight) == (
        1e-3,
        0.3,
        False,
        None,
    )
    assert frozen.num_batches_tracked.item() == 5
    # eps given: it wins over the layer's own
    assert convert_to_frozen(nn.Sequential(nn.BatchNorm2d(4)), eps=0.25)[0].eps == 0.25

    back = convert_to_batchnorm(nn.Sequential(frozen))[0]
    assert type(back) is nn.BatchNorm2d and not back.training
    assert (back.eps, back.momentum, back.affine, back.weight) == (1e-3, 0.3, False, None)
    assert back.num_batches_tracked.item() == 5
    # momentum=None: BatchNorm's cumulative average
    assert convert_to_batchnorm(FrozenBatchNorm2d(2), momentum=None).momentum is None


def test_a_frozen_buffer_affine_becomes_trainable_parameters() -> None:
    frozen = FrozenBatchNorm2d(2, freeze_affine=True)
    frozen.weight.copy_(torch.tensor([2.0, 3.0]))
    bn = convert_to_batchnorm(frozen)
    assert isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad
    assert bn.weight.tolist() == [2.0, 3.0] and bn.bias.tolist() == [0.0, 0.0]
    assert bn.weight.data_ptr() != frozen.weight.data_ptr()  # a copy, not the frozen buffer


def test_torchvision_frozen_layer_converts_both_ways_with_its_dtype_and_batchnorms_defaults() -> (
    None
):
    """torchvision's FrozenBatchNorm2d has buffers for gamma/beta and no momentum or batch count:
    BatchNorm's defaults fill them in (momentum 0.1, 0 batches), values and dtype stay."""
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    tv = TorchvisionFrozen(2, eps=1e-3).double()
    tv.weight.copy_(torch.tensor([2.0, 3.0]))
    tv.running_var.copy_(torch.tensor([4.0, 9.0]))
    bn = convert_to_batchnorm(nn.Sequential(tv))[0]
    assert type(bn) is nn.BatchNorm2d and (bn.eps, bn.momentum) == (1e-3, 0.1)
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64
    assert isinstance(bn.weight, nn.Parameter) and bn.weight.tolist() == [2.0, 3.0]
    assert bn.running_var.tolist() == [4.0, 9.0] and bn.num_batches_tracked.item() == 0
    ours = FrozenBatchNorm2d.from_batchnorm(tv)
    assert (ours.eps, ours.source_momentum, ours.affine) == (1e-3, 0.1, True)
    assert ours.running_var.dtype == torch.float64 and ours.weight.tolist() == [2.0, 3.0]


def test_trainable_gamma_beta_are_the_same_parameters_across_conversions() -> None:
    """An optimizer built before a conversion keeps training gamma/beta: the Parameter objects
    move over (BatchNorm -> frozen -> BatchNorm), only the statistics are copied."""
    bn = nn.BatchNorm2d(2)
    weight, bias = bn.weight, bn.bias
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    back = convert_to_batchnorm(nn.Sequential(frozen))[0]
    assert frozen.weight is weight and frozen.bias is bias
    assert back.weight is weight and back.bias is bias
    assert back.running_mean is not frozen.running_mean is not bn.running_mean


def test_freezing_needs_running_statistics_and_keeps_the_input_dtype() -> None:
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(2, track_running_stats=False))
    x = torch.randn(2, 2, 3, 3, dtype=torch.bfloat16)
    out = _frozen_2ch()(x)  # float32 statistics, bf16 activations (autocast's mix): bf16 out
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _frozen_2ch()(x.float()).bfloat16())


def test_freeze_named_layers_converts_only_the_named_batchnorms() -> None:
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.GroupNorm(1, 2))
    assert freeze_named_layers(model, ["1", "2", "missing"]) == ["1"]
    assert [type(m) for m in model] == [nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm]
    assert frozen_layer_names(model) == ["1"]
    assert freeze_named_layers(model, ["1"]) == []  # already frozen
    # nested layers go by their qualified names, as a checkpoint lists them
    nested = nn.Sequential(nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2)), nn.BatchNorm2d(2))
    assert freeze_named_layers(nested, ["0.1", "1"]) == ["0.1", "1"]
    assert frozen_layer_names(nested) == ["0.1", "1"] and type(nested[0][0]) is nn.BatchNorm2d
    # converting a model again leaves its frozen layers as they are (eps included)
    frozen = nested[1]
    assert convert_to_frozen(nested, eps=0.25)[1] is frozen and frozen.eps == 1e-5
    assert nested[0][0].eps == 0.25  # the BatchNorm that was left is converted with the eps given


def test_keep_children_and_channel_counts() -> None:
    act = nn.ReLU()
    old = nn.BatchNorm2d(2)
    old.add_module("act", act)
    new = keep_children(old, nn.GroupNorm(1, 2))
    assert list(new.children()) == [act]
    x = torch.tensor([[[[-1.0, 3.0]], [[2.0, -5.0]]]])
    assert (new(x) >= 0).all() and (new(x) == 0).any()  # normalized, then the ReLU
    two = nn.BatchNorm2d(2)
    two.add_module("drop", nn.Identity())
    two.add_module("act", act)
    kept = keep_children(two, nn.Identity())
    assert isinstance(kept, nn.Sequential) and list(kept) == [two.drop, act]
    assert keep_children(old, nn.Identity()) is act
    plain = nn.BatchNorm2d(2)
    assert keep_children(nn.BatchNorm2d(2), plain) is plain

    class TorchvisionLike(nn.Module):  # torchvision's FrozenBatchNorm2d: no num_features
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.ones(5))
            self.register_buffer("running_mean", torch.zeros(5))

    TorchvisionLike.__name__ = "FrozenBatchNorm2d"
    assert channels_of(TorchvisionLike()) == 5 and is_frozen_batchnorm(TorchvisionLike())
    assert channels_of(nn.BatchNorm2d(7)) == 7
    assert not is_frozen_batchnorm(nn.BatchNorm2d(7))


def test_param_groups_list_each_trainable_parameter_once() -> None:
    conv, bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    bn.bias.requires_grad_(False)  # a frozen beta is no optimizer's business
    shared, tied = nn.Linear(2, 2), nn.Linear(2, 2, bias=False)
    tied.weight = shared.weight  # tied weights (two modules, one parameter): listed once
    model = nn.Sequential(conv, bn, shared, tied)
    groups = param_groups(model, weight_decay=0.3)
    assert [g["name"] for g in groups] == ["weights", "norm"]
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]  # norm layers: no decay by default
    expected = [conv.weight, conv.bias, shared.weight, shared.bias]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in expected]
    assert [id(p) for p in groups[1]["params"]] == [id(bn.weight)]
