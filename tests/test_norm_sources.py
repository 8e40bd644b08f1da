"""convert_norm from every source kind to every norm: the table in docs/normalization.md, each
cell checked on a small model holding that layer (with non-trivial statistics and gamma/beta),
plus what the conversion carries (keep_affine), folds (none) and logs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.errors import NormConfigError
from normlab.norm import FrozenBatchNorm2d, convert_norm
from normlab.norm.registry import CONSTRUCTORS
from normlab.norm.spec import FRESH, defaults

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, GroupNormAct, LayerNorm2d, LayerNormAct2d  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "normalization.md"
CONFIG = {"num_groups": 8}


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block layout: conv, permute to NHWC, LayerNorm over C, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 16, 3), nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3), layer, nn.ReLU())


def _torchvision_frozen() -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    return _conv(TorchvisionFrozen(16))


# row label of the docs table -> (model, the input it takes, name of the norm layer)
SOURCES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "`nn.BatchNorm2d` after a conv": (lambda: _conv(nn.BatchNorm2d(16)), (4, 3, 8, 8), "1"),
    "`nn.BatchNorm1d` after a linear layer": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16)),
        (4, 3, 2, 2),
        "2",
    ),
    "`nn.BatchNorm3d` after a conv": (
        lambda: nn.Sequential(nn.Conv3d(3, 16, 3), nn.BatchNorm3d(16)),
        (4, 3, 5, 5, 5),
        "1",
    ),
    "`nn.SyncBatchNorm` after a conv": (lambda: _conv(nn.SyncBatchNorm(16)), (4, 3, 8, 8), "1"),
    "timm `BatchNormAct2d` after a conv": (lambda: _conv(BatchNormAct2d(16)), (4, 3, 8, 8), "1"),
    "normlab `FrozenBatchNorm2d` after a conv": (
        lambda: _conv(FrozenBatchNorm2d(16)),
        (4, 3, 8, 8),
        "1",
    ),
    "torchvision `FrozenBatchNorm2d` after a conv": (_torchvision_frozen, (4, 3, 8, 8), "1"),
    "`nn.GroupNorm(8, C)`": (lambda: _conv(nn.GroupNorm(8, 16)), (4, 3, 8, 8), "1"),
    "timm `GroupNormAct`": (lambda: _conv(GroupNormAct(16, 4)), (4, 3, 8, 8), "1"),
    "timm `LayerNorm2d` (ConvNeXt)": (lambda: _conv(LayerNorm2d(16)), (4, 3, 8, 8), "1"),
    "timm `LayerNormAct2d`": (lambda: _conv(LayerNormAct2d(16)), (4, 3, 8, 8), "1"),
    "channels-last `nn.LayerNorm` (ConvNeXt's NHWC blocks)": (
        ChannelsLastBlock,
        (4, 3, 8, 8),
        "norm",
    ),
    "`nn.InstanceNorm2d`": (
        lambda: _conv(nn.InstanceNorm2d(16, affine=True)),
        (4, 3, 8, 8),
        "1",
    ),
    "no normalization layer at all": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU()),
        (4, 3, 8, 8),
        "",
    ),
}


def documented_table() -> list[tuple[str, str, str]]:
    """(source row, norm column, cell) of the source x target table in docs/normalization.md."""
    lines = DOC.read_text().split("| source layer |", 1)[1].splitlines()
    header = [c.strip(" `") for c in lines[0].split("|")[:-1]]
    cells = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        row = [c.strip() for c in line.split("|")[1:-1]]
        cells += [(row[0], norm, cell) for norm, cell in zip(header, row[1:], strict=True)]
    return cells


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            for key in ("weight", "bias", "running_mean"):
                t = getattr(m, key, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    t.copy_(torch.randn_like(t) * 0.3 + (key == "weight"))
            if getattr(m, "running_var", None) is not None:
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_the_table_covers_every_norm_and_source() -> None:
    cells = documented_table()
    assert {norm for _, norm, _ in cells} == set(CONSTRUCTORS)
    assert {row for row, _, _ in cells} == set(SOURCES)


@pytest.mark.parametrize(("row", "norm", "cell"), documented_table())
def test_each_documented_conversion(row: str, norm: str, cell: str) -> None:
    make, shape, name = SOURCES[row]
    model = randomized(make()).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        before = model(x)
    layer = dict(model.named_modules()).get(name) if name else None
    if cell == "refused":
        with pytest.raises(NormConfigError) as info:
            convert_norm(model, {"name": norm, **CONFIG})
        text = str(info.value)
        assert (type(model).__name__ if not name else f"layer {name}") in text
        return
    model = convert_norm(model, {"name": norm, **CONFIG})
    new = dict(model.named_modules()).get(name) if name else None
    with torch.no_grad():
        after = model(x)
        model.train()(x)  # and it trains
    assert after.shape == before.shape
    if cell == "kept":
        assert new is layer
        if norm != "gn_ws":  # gn_ws keeps a GroupNorm but weight-standardizes the conv feeding it
            assert torch.equal(after, before)
        return
    assert new is not layer
    kept_act = [c for c in ("act", "drop") if hasattr(layer, c) and c in dict(new.named_children())]
    assert kept_act == [c for c in ("act", "drop") if hasattr(layer, c)]  # fused act survives
    if cell == "converted":
        expected = CONSTRUCTORS[norm](16, {**defaults(norm), **FRESH, **CONFIG})
        assert isinstance(new, type(expected))
        assert not any(hasattr(new, k) and getattr(new, k) is None for k in ("weight", "bias"))
    elif cell in ("folded", "dropped"):
        assert not any(k.endswith("running_mean") for k in model.state_dict())
        gap = (after - before).abs().max().item()
        # folded: the eval-mode function is kept; dropped: it is not
        assert gap <= 1e-5 if cell == "folded" else gap > 1e-3
    else:
        pytest.fail(f"unknown cell {cell!r} in docs/normalization.md")


def test_resnet18_without_its_batchnorm_computes_the_same_in_eval_mode(caplog) -> None:
    from tests.test_convert_norm import randomized as randomized_torchvision

    model = randomized_torchvision("resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.INFO, logger="normlab"):
        convert_norm(model, {"name": "none"})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        gap = (model(x) - expected).abs().max().item() / expected.abs().max().item()
    assert gap <= 1e-5
    assert "20 BatchNorm2d -> Identity; 20 of 20 folded" in caplog.text
    assert "100 tensors dropped: bn1.bias, bn1.num_batches_tracked" in caplog.text
    plain = randomized_torchvision("resnet18")
    convert_norm(plain, {"name": "none", "fold": False})  # the old none: the function changes
    with torch.no_grad():
        assert (plain(x) - expected).abs().max().item() / expected.abs().max().item() > 0.1


def test_keep_affine_carries_gamma_beta_where_shapes_fit(caplog) -> None:
    source = randomized(_conv(LayerNorm2d(16)))[1]
    for keep, carried in ((None, False), (True, True), (False, False)):
        model = _conv(LayerNorm2d(16))
        model[1].load_state_dict(source.state_dict())
        cfg = {"name": "groupnorm", "num_groups": 4, "keep_affine": keep}
        with caplog.at_level(logging.INFO, logger="normlab"):
            convert_norm(model, cfg)
        assert torch.equal(model[1].weight, source.weight) == carried
        assert torch.equal(model[1].bias, source.bias) == carried
    assert "1 LayerNorm2d -> GroupNorm (kept: eps, gamma/beta); no tensor dropped" in caplog.text
    # BatchNorm -> frozen carries statistics and so gamma/beta, unless told not to
    model = randomized(_conv(nn.BatchNorm2d(16)))
    gamma = model[1].weight.clone()
    convert_norm(model, {"name": "frozen", "keep_affine": False})
    assert torch.equal(model[1].running_var, model[1].running_var) and not torch.equal(
        model[1].weight, gamma
    )


def test_every_conversion_logs_one_line_per_kind(caplog) -> None:
    model = nn.Sequential(
        _conv(nn.BatchNorm2d(16)), nn.Conv2d(16, 16, 1), _conv(nn.BatchNorm2d(16))
    )
    model.append(nn.Conv2d(16, 8, 1)).append(nn.GroupNorm(2, 8))
    with caplog.at_level(logging.INFO, logger="normlab"):
        convert_norm(model, {"name": "batchnorm"})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "norm=batchnorm: 2 BatchNorm2d kept as they are (already the configured norm)",
        "norm=batchnorm: 1 GroupNorm -> BatchNorm2d (kept: eps); 2 tensors dropped: 4.bias,"
        " 4.weight",
    ]


def test_a_model_without_norm_layers_is_refused_by_name_except_for_none(caplog) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(
        NormConfigError, match=r"norm='frozen' is not valid: Sequential has no normalization"
    ):
        convert_norm(model, {"name": "frozen"})
    with caplog.at_level(logging.INFO, logger="normlab"):
        assert convert_norm(model, {"name": "none"}) is model
    assert "Sequential has no normalization layer; nothing to remove" in caplog.text


def test_convnext_under_none_keeps_no_normalization_layer() -> None:
    from normlab.models import NormLabModule
    from normlab.norm import is_norm_layer

    net = {"_target_": "normlab.models.timm_net"}
    model = NormLabModule(3, 3, {"name": "none"}, net=net, arch="convnext_atto")
    assert not [n for n, m in model.named_modules() if is_norm_layer(m)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_the_conversion_says_what_it_dropped_of_loaded_weights(tmp_path, caplog) -> None:
    import torchvision

    from normlab.models import NormLabModule

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    net = {"_target_": "normlab.models.torchvision_net"}
    with caplog.at_level(logging.INFO, logger="normlab"):
        NormLabModule(3, 3, {"name": "groupnorm", "num_groups": 8}, net=net, arch="resnet18",
                      weights=str(weights))  # fmt: skip
    lines = [r.getMessage() for r in caplog.records]
    loaded = next(i for i, line in enumerate(lines) if "122 of 122 tensors loaded" in line)
    converted = lines[loaded + 1]
    # BatchNorm -> GroupNorm: gamma/beta are not carried by default (the statistics cannot be)
    assert converted.startswith("norm=groupnorm: 20 BatchNorm2d -> GroupNorm (kept: eps)")
    assert "; 100 tensors dropped: bn1.bias, bn1.num_batches_tracked" in converted


def test_a_channels_last_layer_stays_channels_last_when_frozen_or_synced() -> None:
    """ConvNeXt's NHWC blocks: their BatchNorm, frozen later (norm.freeze_at_epoch) or made a
    SyncBatchNorm, still normalizes the channels, the last dimension."""
    from normlab.norm import convert_to_frozen
    from normlab.norm.sync import SyncBatchNormKeepingActivations

    model = timm.create_model("convnext_atto", num_classes=3, conv_mlp=False)
    convert_norm(model, {"name": "batchnorm"})
    x = torch.randn(4, 3, 32, 32)
    model.train()(x)  # statistics that are not zeros/ones
    with torch.no_grad():
        expected = model.eval()(x)
    synced = SyncBatchNormKeepingActivations().apply(model)
    assert type(synced.stages[0].blocks[0].norm).__name__ == "ChannelsLastSyncBatchNorm"
    with torch.no_grad():
        assert torch.allclose(synced(x), expected, atol=1e-6)
    frozen = convert_to_frozen(model)
    assert type(frozen.stages[0].blocks[0].norm).__name__ == "ChannelsLastFrozenBatchNorm2d"
    with torch.no_grad():
        assert torch.allclose(frozen(x), expected, atol=1e-5)
