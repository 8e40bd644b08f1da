"""``model.weights`` that fit only partly. A resnet34 file became a "pretrained resnet18" (96
tensors unused), a torchvision file loaded 55 of 86 tensors of timm's resnet10t, and under
``norm=frozen`` a layer whose running_var the file lacked stayed at 1.0 for the whole run; only
an INFO line said so, exit 0. Now such a file is refused naming the tensors, the classifier head
(and a first conv for other input channels) may start fresh with the log saying so, and
``model.weights_strict=false`` loads what fits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision

from normlab.config import validate_model
from normlab.errors import ConfigError
from normlab.models import NormLabModule
from normlab.models.defaults import ModelConfig

TV = {"_target_": "normlab.models.torchvision_net"}
TIMM = {"_target_": "normlab.models.timm_net"}


def _saved(tmp_path: Path, arch: str, drop: tuple[str, ...] = ()) -> Path:
    torch.manual_seed(0)
    state = torchvision.models.get_model(arch).state_dict()  # 3 channels, 1000 classes
    for key in drop:
        del state[key]
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    return path


def test_a_resnet34_file_is_refused_for_a_resnet18(tmp_path: Path) -> None:
    path = _saved(tmp_path, "resnet34")
    with pytest.raises(ConfigError) as info:
        NormLabModule(10, 3, {"name": "batchnorm"}, net=TV, arch="resnet18", weights=str(path))
    msg = str(info.value)
    assert f"model.weights='{path}'" in msg and "holds 96 tensor(s): layer1.2.bn1.bias" in msg
    assert "and 91 more that the model does not use" in msg
    assert "model.weights_strict=false" in msg


def test_a_torchvision_file_is_refused_for_timm_resnet10t(tmp_path: Path) -> None:
    path = _saved(tmp_path, "resnet18")
    with pytest.raises(ConfigError) as info:
        NormLabModule(10, 3, {"name": "batchnorm"}, net=TIMM, arch="resnet10t", weights=str(path))
    msg = str(info.value)
    assert "the model's 26 tensor(s): conv1.0.weight" in msg and "are missing from it" in msg
    assert "holds 64 tensor(s): conv1.weight" in msg


def test_weights_strict_false_loads_what_fits_and_names_the_rest(tmp_path: Path, caplog) -> None:
    path = _saved(tmp_path, "resnet34")
    with caplog.at_level(logging.INFO, logger="normlab"):
        model = NormLabModule(10, 3, {"name": "batchnorm"}, net=TV, arch="resnet18",
                              weights=str(path), weights_strict=False)  # fmt: skip
    source = torch.load(path, weights_only=True)
    assert torch.equal(model.net.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])
    line = next(r for r in caplog.records if "model.weights=" in r.getMessage())
    assert line.levelno == logging.WARNING
    text = line.getMessage()
    assert "120 of 122 tensors loaded; re-initialised: fc.bias, fc.weight" in text
    assert "unused from the file (model.weights_strict=false): 96 tensor(s)" in text


def test_the_head_and_first_conv_may_start_fresh_and_the_log_says_so(tmp_path, caplog) -> None:
    path = _saved(tmp_path, "resnet18")
    with caplog.at_level(logging.INFO, logger="normlab"):
        NormLabModule(10, 1, {"name": "frozen"}, net=TV, arch="resnet18", weights=str(path))
    assert (
        "re-initialised: conv1.weight, fc.bias, fc.weight (the classifier head / first conv do"
        " not fit this data)" in caplog.text
    )


@pytest.mark.parametrize("strict", [True, False])
def test_a_frozen_layer_without_statistics_in_the_file_is_refused(tmp_path, strict) -> None:
    path = _saved(tmp_path, "resnet18", drop=("layer1.0.bn1.running_var",))
    with pytest.raises(ConfigError, match=r"1 tensor\(s\): layer1.0.bn1.running_var"):
        NormLabModule(10, 3, {"name": "frozen"}, net=TV, arch="resnet18", weights=str(path),
                      weights_strict=strict)  # fmt: skip
    # with norm=batchnorm the statistics are estimated while training: strict=false loads it
    model = NormLabModule(10, 3, {"name": "batchnorm"}, net=TV, arch="resnet18",
                          weights=str(path), weights_strict=False)  # fmt: skip
    assert model.net.layer1[0].bn1.running_var.eq(1).all()  # fresh, and updated by training


def test_weights_strict_is_a_model_key_checked_as_a_bool() -> None:
    from dataclasses import asdict

    model = asdict(ModelConfig())
    assert model["weights_strict"] is True
    with pytest.raises(ConfigError, match="model.weights_strict='yes'"):
        validate_model({**model, "net": None, "weights_strict": "yes"})
