"""End to end through train.py / eval.py: a torchvision ResNet, a timm model and a user's own
model and data (a config dir outside configs/, via hydra.searchpath) under every relevant norm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, run_script

SMALL = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "callbacks.rich_progress_bar=null",
    "data=synthetic",
    "data.synthetic.shape=[3,16,16]",
    "data.synthetic.num_samples=128",
    "data.synthetic.num_test=64",
    "data.batch_size=32",
]


def last_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"]


def scalar_tags(run_dir: Path) -> set[str]:
    tags: set[str] = set()
    for events in (run_dir / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def train_and_eval(tmp_path: Path, *overrides: str, env: dict | None = None) -> tuple:
    train = run_script("train.py", *SMALL, *overrides, run_dir=tmp_path / "train", env=env)
    assert train.returncode == 0, train.output[-3000:]
    ckpt = train.results["checkpoints"]["last"]
    evaluated = run_script(
        "eval.py", "trainer=cpu", f"ckpt_path={ckpt}", run_dir=tmp_path / "eval", env=env
    )
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    return train, evaluated


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [["model=torchvision", "model.arch=resnet18", 20], ["model=timm", "model.arch=resnet10t", 14]],
    ids=["torchvision_resnet18", "timm_resnet10t"],
)
def test_frozen_resnet_trains_evaluates_and_shows_its_statistics(
    tmp_path: Path, model: list
) -> None:
    *model, num_bn = model  # BatchNorm2d layers of the architecture
    train, evaluated = train_and_eval(tmp_path, *model, "norm=frozen")
    assert evaluated.results["metrics"]["test/acc"] == pytest.approx(
        train.results["metrics"]["test/acc"], abs=1e-6
    )
    state = last_state(train.run_dir)
    bn = sorted(k.removesuffix(".running_var") for k in state if k.endswith(".running_var"))
    assert len(bn) == num_bn and "net.layer1.0.bn1" in bn
    for layer in bn:  # fixed statistics estimated from data, not the initial zeros/ones
        assert not torch.equal(
            state[f"{layer}.running_var"], torch.ones_like(state[f"{layer}.running_var"])
        )
    assert not torch.equal(state["net.layer1.0.bn1.weight"], torch.ones(64))  # gamma learned
    assert f"frozen BatchNorm: statistics of {num_bn} layers estimated" in train.output
    assert any("net.layer1.0.bn1/running_mean" in tag for tag in scalar_tags(train.run_dir))


@pytest.mark.slow
def test_groupnorm_resnet_has_no_running_statistics(tmp_path: Path) -> None:
    train = run_script(
        "train.py",
        *SMALL,
        "model=torchvision",
        "model.arch=resnet18",
        "norm=groupnorm",
        "test=false",
        run_dir=tmp_path / "gn",
    )
    assert train.returncode == 0, train.output[-3000:]
    state = last_state(train.run_dir)
    assert not [k for k in state if "running_" in k or "num_batches_tracked" in k]
    assert state["net.layer1.0.bn1.weight"].shape == (64,)  # GroupNorm under the same name


@pytest.mark.slow
def test_a_users_model_and_data_from_their_own_config_dir(tmp_path: Path) -> None:
    """examples/: a user's nn.Module and LightningDataModule, configs outside configs/."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT / "src")])}
    overrides = [
        f"hydra.searchpath=[file://{ROOT / 'examples' / 'configs'}]",
        "model=small_net",
        "data=blobs",
        "norm=frozen",
    ]
    train = run_script(
        "train.py",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "callbacks.rich_progress_bar=null",
        *overrides,
        run_dir=tmp_path / "train",
        env=env,
    )
    assert train.returncode == 0, train.output[-3000:]
    ckpt = train.results["checkpoints"]["last"]
    # a checkpoint names my_project's classes: eval.py builds them once the user names them
    evaluated = run_script(
        "eval.py",
        "trainer=cpu",
        f"ckpt_path={ckpt}",
        "trusted_targets=[my_project]",
        run_dir=tmp_path / "eval",
        env=env,
    )
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    test_acc = train.results["metrics"]["test/acc"]
    assert evaluated.results["metrics"]["test/acc"] == pytest.approx(test_acc, abs=1e-6)
    assert test_acc > 0.5  # 4 classes: chance is 0.25
    state = last_state(train.run_dir)
    assert {"net.block1.bn.running_mean", "net.block2.bn.running_mean"} <= set(state)
    assert any("net.block2.bn/running_var" in tag for tag in scalar_tags(train.run_dir))
    # without examples/ on the path: the package to put there, not an import traceback
    unfound = run_script(
        "eval.py",
        "trainer=cpu",
        f"ckpt_path={ckpt}",
        "trusted_targets=[my_project]",
        run_dir=tmp_path / "eval_no_path",
        env={"PYTHONPATH": str(ROOT / "src")},
    )
    assert unfound.returncode == 2 and "Traceback" not in unfound.output
    assert (
        "normlab: error: data._target_='my_project.data.BlobsDataModule' is not valid: Python"
        " cannot import its package 'my_project': put the directory that holds my_project/ on"
        " PYTHONPATH"
    ) in unfound.stderr
