"""The plain-Python example of docs/python_api.md, run as written: a built torchvision ResNet,
norm=frozen, one epoch with L.Trainer(...).fit(model, train_dataloaders=..., val_dataloaders=...)
and no normlab callback; calibrated statistics, norm/ TensorBoard tags, a checkpoint eval.py
rebuilds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from normlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python_api.md"


def documented_script() -> str:
    (script,) = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)[:1]
    return script


def documented_eval_command() -> list[str]:
    (command,) = re.findall(r"^python eval\.py (.*)$", PAGE.read_text(), re.M)
    return command.split()


@pytest.fixture(scope="module")
def python_run(tmp_path_factory) -> tuple[dict, Path]:
    import os

    folder = tmp_path_factory.mktemp("python_api")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        namespace: dict = {}
        exec(compile(documented_script(), str(PAGE), "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace, folder


def test_the_documented_script_is_short_and_passes_no_callback() -> None:
    script = documented_script()
    assert len(script.strip().splitlines()) <= 20
    assert "callbacks" not in script and "normlab.callbacks" not in script
    assert "train_dataloaders=" in script and "val_dataloaders=" in script


def test_frozen_statistics_are_the_training_sets_population_statistics(python_run) -> None:
    """calibration_batches=6 covers the 192 training images (6 batches of 32) whatever their
    order, so bn1's statistics are the mean and unbiased variance of conv1's output over all of
    them, computed here from the definition with the ResNet the script's seed builds."""
    import torchvision

    from normlab.norm import FrozenBatchNorm2d

    namespace, _ = python_run
    model = namespace["model"]
    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(layers) == 20 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in layers)
    torch.manual_seed(0)
    images, _ = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    fresh = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        y = fresh.conv1(images[:192]).double()
    mean = y.mean((0, 2, 3))
    var = y.transpose(0, 1).reshape(64, -1).var(1, unbiased=True)
    bn1 = model.net.bn1
    assert torch.allclose(bn1.running_mean.double(), mean, atol=1e-5)
    assert torch.allclose(bn1.running_var.double(), var, rtol=1e-4)


def test_norm_tags_reach_tensorboard(python_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    namespace, folder = python_run
    (logdir,) = {p.parent for p in (folder / "python_run").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "norm/net.bn1/running_mean/mean" in tags and "norm/net.fc.bias" not in tags
    logged = events.Scalars("norm/net.bn1/running_mean/mean")[-1].value
    frozen_mean = namespace["model"].net.bn1.running_mean.mean().item()
    assert logged == pytest.approx(frozen_mean, abs=1e-6)  # frozen: the calibrated values


def test_the_checkpoint_records_a_config_eval_rebuilds(python_run) -> None:
    from normlab.config import eval_data_config
    from normlab.models import NormLabModule

    _, folder = python_run
    checkpoint = torch.load(
        folder / "python_run" / "resnet18_frozen.ckpt", map_location="cpu", weights_only=True
    )
    saved = checkpoint["normlab"]["config"]
    assert saved["model"]["net"] == {
        "_target_": "normlab.models.torchvision_net",
        "arch": "resnet18",
    }
    assert saved["model"]["_target_"] == "normlab.models.NormLabModule"
    assert saved["norm"] == {"name": "frozen", "calibration_batches": 6}
    assert saved["data"] is None  # plain DataLoaders: eval.py must be told the data
    with pytest.raises(ConfigError, match=r"data=None.*\+data=digits"):
        eval_data_config(saved["data"], {"data_dir": None, "batch_size": None})
    # the saved model config rebuilds the same tensors
    model_cfg = {k: v for k, v in saved["model"].items() if k != "_target_"}
    rebuilt = NormLabModule(10, 3, saved["norm"], **model_cfg)
    rebuilt.load_state_dict(checkpoint["state_dict"])
    assert not rebuilt.uncalibrated


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)


def test_a_built_net_normlab_cannot_rebuild_is_refused_by_name() -> None:
    from normlab.models import NormLabModule

    model = NormLabModule(net=Tiny())
    assert (model.hparams.num_classes, model.hparams.in_channels) == (3, 1)
    recorded = dict(model.hparams.net)
    assert recorded == {"_built_": f"{__name__}.Tiny"}
    with pytest.raises(ConfigError, match=r"model.net=.*Tiny.*net=\{'_target_'"):
        NormLabModule(3, 1, {"name": "batchnorm"}, net=recorded)


def test_eval_tests_the_python_checkpoint(python_run, tmp_path: Path) -> None:
    from tests.conftest import run_script

    _, folder = python_run
    args = [a.replace("python_run/", f"{folder}/python_run/") for a in documented_eval_command()]
    run = run_script("eval.py", *args, run_dir=tmp_path / "eval")
    assert run.returncode == 0, run.output[-3000:]
    assert 0 <= run.results["metrics"]["test/acc"] <= 1
    refused = run_script("eval.py", args[0], "trainer=cpu", run_dir=tmp_path / "refused")
    assert refused.returncode == 2
    assert "normlab: error: data=None is not valid" in refused.stderr
    assert "+data=digits" in refused.stderr
    assert not (tmp_path / "refused").exists()  # nothing half-written
