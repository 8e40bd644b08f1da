"""Any model: the Python API builds what the CLI builds, torchvision/timm nets fit the data,
local pretrained weights feed norm=frozen, and the BatchNorm lifecycle works on a ResNet."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from normlab.config import register_resolvers, validate_train_config
from normlab.errors import ConfigError
from normlab.models import NormLabModule
from normlab.norm import FrozenBatchNorm2d
from tests.conftest import ROOT
from tests.test_norm_training import quiet_trainer, tiny_data

TV = {"_target_": "normlab.models.torchvision_net"}


def compose_train(*overrides: str):
    os.environ.setdefault("NORMLAB_ROOT", str(ROOT))
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=/tmp/unused"])
    return OmegaConf.to_container(cfg, resolve=True)


def optimizer_summary(model: NormLabModule, max_epochs: int) -> list:
    model._trainer = SimpleNamespace(max_epochs=max_epochs)
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = [
        ({k: v for k, v in g.items() if k not in ("params", "initial_lr")}, len(g["params"]))
        for g in opt.param_groups
    ]
    return [type(opt).__name__, groups, type(sched).__name__, sched.T_max]


def test_python_api_builds_the_cli_model_with_the_same_optimizer() -> None:
    from normlab.run import build_model

    cfg = compose_train("trainer.max_epochs=7")
    torch.manual_seed(0)
    cli = build_model(cfg["model"], cfg["norm"], SimpleNamespace(num_classes=10, num_channels=1))
    torch.manual_seed(0)
    api = NormLabModule(num_classes=10, in_channels=1, norm={"name": "batchnorm"})
    assert repr(api.net) == repr(cli.net)
    cli_state = cli.state_dict()
    assert all(torch.equal(v, cli_state[k]) for k, v in api.state_dict().items())
    summary = optimizer_summary(api, 7)
    assert summary == optimizer_summary(cli, 7)
    # the values written once in models/defaults.py, independently restated here
    name, groups, sched, horizon = summary
    assert (name, sched, horizon) == ("AdamW", "CosineAnnealingLR", 7)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g, _ in groups] == [
        ("weights", 0.003, 0.0001),
        ("norm", 0.003, 0.0),
    ]
    assert api.hparams["net"]["widths"] == [32, 64, 128]


def test_config_checks_import_no_torch_for_every_built_in_model() -> None:
    code = f"""
import os, sys
os.environ["NORMLAB_ROOT"] = {str(ROOT)!r}
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from normlab.config import register_resolvers, validate_train_config
register_resolvers()
with initialize_config_dir(config_dir={str(ROOT / "configs")!r}, version_base="1.3"):
    for model in ("cnn", "torchvision", "timm"):
        for norm in ("batchnorm", "frozen", "groupnorm"):
            cfg = compose("train", overrides=[f"model={{model}}", f"norm={{norm}}",
                                              "paths.output_dir=/tmp/unused"])
            validate_train_config(OmegaConf.to_container(cfg, resolve=True))
print("torch imported:", "torch" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "torch imported: False" in out.stdout


def test_each_component_checks_its_own_config() -> None:
    cfg = compose_train()
    cfg["model"]["net"] = {"_target_": "my_project.models.SmallNet", "hidden": 4}
    validate_train_config(cfg)  # a user's net is not checked against the ConvNet's keys
    cfg = compose_train("model=torchvision", "norm=groupnorm", "norm.num_groups=3")
    validate_train_config(cfg)  # channels unknown before the net is built: checked at conversion
    with pytest.raises(ConfigError, match=r"model.net.widths=\[0\]"):
        validate_train_config(compose_train("model.net.widths=[0]"))
    with pytest.raises(ConfigError, match="norm.num_groups=3.*divisors"):
        validate_train_config(compose_train("norm=groupnorm", "norm.num_groups=3"))
    with pytest.raises(ConfigError, match="model.weights=.*no such file"):
        validate_train_config(compose_train("model=timm", "model.weights=/no/such.pth"))


def test_resnet_takes_one_channel_8x8_digits() -> None:
    model = NormLabModule(10, 1, {"name": "batchnorm"}, net=TV, arch="resnet18")
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 10
    # 8x8 -> 1x1 after layer2; adaptive pooling takes it from there
    assert model.train()(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    with pytest.raises(ConfigError, match="model.arch='resnet_nope'.*torchvision"):
        NormLabModule(10, 1, {"name": "batchnorm"}, net=TV, arch="resnet_nope")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_give_frozen_statistics_without_calibration(
    tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18()  # 3 channels, 1000 classes
    with torch.no_grad():
        for m in pretrained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(pretrained.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(pretrained.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger="normlab"):
        model = NormLabModule(10, 1, {"name": "frozen"}, net=TV, arch="resnet18", weights=str(path))
    layer = model.net.layer1[0].bn1
    assert isinstance(layer, FrozenBatchNorm2d)
    assert torch.equal(layer.running_mean, pretrained.layer1[0].bn1.running_mean)
    assert torch.equal(model.net.layer4[1].conv2.weight, pretrained.layer4[1].conv2.weight)
    assert not model.uncalibrated  # the statistics came with the weights
    assert "re-initialised" in caplog.text
    for name in ("conv1.weight", "fc.weight", "fc.bias"):  # other shapes: 1 channel, 10 classes
        assert name in caplog.text.split("re-initialised")[1].split("unused")[0]


def test_frozen_statistics_nobody_set_are_refused_with_the_fix() -> None:
    norm = {"name": "frozen", "calibration_batches": 2}
    model = NormLabModule(4, 1, norm, net={"widths": [4, 8]})
    with pytest.raises(ConfigError, match="nothing has set.*norm.calibration_batches"):
        quiet_trainer().test(model, datamodule=tiny_data())
    # fit calibrates them: the model brings its NormLifecycle, no callback is passed
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=tiny_data())
    assert model.net.features[1].running_var.ne(1).all()  # estimated, not the initial ones
    quiet_trainer().test(model, datamodule=tiny_data())


def test_batchnorm_lifecycle_on_a_torchvision_resnet() -> None:
    """Precise BN, then the freeze at epoch 1, on resnet18, from the norm config alone: every
    BatchNorm ends frozen with the population statistics, gamma/beta learned."""
    data = tiny_data()
    norm = {"name": "batchnorm", "precise_bn_batches": 2, "freeze_at_epoch": 1}
    model = NormLabModule(4, 1, norm, net=TV, arch="resnet18", scheduler=None)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    frozen = {n: m for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert len(frozen) == n_bn == 20 and "net.layer1.0.bn1" in frozen
    assert trainer.callback_metrics["norm/precise_bn_max_shift"] > 0
    assert trainer.callback_metrics["norm/frozen"] == 1
    assert not frozen["net.layer1.0.bn1"].weight.eq(1).all()  # gamma learned


def test_model_activation_is_the_nets_activation() -> None:
    # DESIGN's command-line key: model.activation=sigmoid, whatever model= says
    from normlab.run import build_model

    data = SimpleNamespace(num_classes=10, num_channels=1)
    cfg = compose_train("model.activation=sigmoid", "norm=none")
    validate_train_config(cfg)
    cnn = build_model(cfg["model"], cfg["norm"], data)
    acts = {type(m) for m in cnn.net.modules() if isinstance(m, nn.Sigmoid | nn.ReLU)}
    assert acts == {nn.Sigmoid}
    assert cnn.hparams.net["activation"] == "sigmoid"  # a checkpoint rebuilds the same net

    timm_cfg = compose_train("model=timm", "model.arch=resnet10t", "model.activation=sigmoid")
    resnet = build_model(timm_cfg["model"], timm_cfg["norm"], data)
    names = {type(m).__name__ for m in resnet.net.modules()}  # timm has a Sigmoid class of its own
    assert "Sigmoid" in names and "ReLU" not in names

    tv = compose_train("model=torchvision", "model.activation=sigmoid")
    with pytest.raises(ConfigError, match="model.activation='sigmoid'.*take no activation"):
        build_model(tv["model"], tv["norm"], data)
    with pytest.raises(ConfigError, match="model.activation='swish'.*relu, sigmoid"):
        bad = compose_train("model.activation=swish")
        validate_train_config(bad)


def test_distribute_bn_averages_every_batchnorm_of_a_resnet() -> None:
    """Distributed BN (NormLifecycle(distribute_bn=True)) on resnet18 under a 2-process
    strategy stand-in: every running_mean and running_var of the 20 BatchNorm layers becomes the
    mean over the ranks, here this rank's value and one that is 1.0 larger (so the average is
    this rank's + 0.5, by hand)."""
    from normlab.callbacks import NormLifecycle

    model = NormLabModule(4, 1, {"name": "batchnorm"}, net=TV, arch="resnet18", scheduler=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}

    def reduce(tensor, reduce_op):  # the other rank holds tensor + 1
        assert reduce_op == "mean"
        return (tensor + (tensor + 1)) / 2

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    shift = NormLifecycle(distribute_bn=True)._average(trainer, model)
    after = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert len(before) == 2 * 20 and "net.layer1.0.bn1.running_var" in after
    for key, value in before.items():
        assert torch.allclose(after[key], value + 0.5), key
    assert shift.item() == pytest.approx(0.5)
