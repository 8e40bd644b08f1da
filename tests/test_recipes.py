"""Recipes: ``experiment=cifar10_resnet`` composes to the standard recipe and trains on tiny
CIFAR-10 files (in-process); its warm-up + cosine schedule and the linear lr scaling rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.test_configs import compose_train
from tests.test_sources import _trust_these_files, _write_cifar

RECIPE = ["data=cifar10", "model=torchvision", "model.arch=resnet18", "experiment=cifar10_resnet"]


def test_cifar10_resnet_composes_to_the_standard_recipe(tmp_path: Path) -> None:
    container, _ = compose_train([*RECIPE, "data.batch_size=64"], tmp_path)
    opt, sched = container["model"]["optimizer"], container["model"]["scheduler"]
    assert opt["_target_"] == "torch.optim.SGD"
    assert (opt["momentum"], opt["nesterov"]) == (0.9, True)
    assert opt["lr"] == pytest.approx(0.1 * 64 / 256)  # scaled with the batch size
    assert (opt["weight_decay"], opt["norm_weight_decay"]) == (5e-4, 0.0)
    assert sched["_target_"] == "normlab.models.WarmupCosineLR" and sched["warmup_epochs"] == 5
    augment = container["data"]["augment"]
    assert (augment["crop_padding"], augment["flip"], augment["label_smoothing"]) == (4, 0.5, 0.1)
    assert container["data"]["name"] == "cifar10" and container["model"]["arch"] == "resnet18"


def test_warmup_cosine_rises_linearly_then_follows_the_cosine() -> None:
    from normlab.models import WarmupCosineLR

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = WarmupCosineLR(opt, T_max=10, warmup_epochs=3, start_factor=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.01, 0.04, 0.07, 0.1])
    assert lrs[3:] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 7)) for t in range(7)])
    with pytest.raises(ValueError, match="warmup_epochs=10 must be >= 0 and below T_max=10"):
        WarmupCosineLR(opt, T_max=10, warmup_epochs=10)


def test_cifar10_resnet_trains_on_tiny_cifar_files(tmp_path: Path, monkeypatch) -> None:
    from normlab.cli import run_task

    data_dir = tmp_path / "data"
    _write_cifar(data_dir, n_train=12, n_test=8)
    _trust_these_files(monkeypatch, data_dir)
    short = [
        "trainer=cpu", "trainer.max_epochs=3", "model.scheduler.warmup_epochs=1",
        "data.batch_size=16", "callbacks=none", "logger=csv", f"data.data_dir={data_dir}",
    ]  # fmt: skip
    _, cfg = compose_train([*RECIPE, *short], tmp_path / "run")
    seen = {}

    import normlab.run as run

    build_trainer = run.build_trainer

    def recording(cfg, *args):  # the optimizer the run trained with, after fit
        trainer = build_trainer(cfg, *args)
        seen["trainer"] = trainer
        return trainer

    monkeypatch.setattr(run, "build_trainer", recording)
    metrics = run_task("train", cfg)
    assert 0 <= metrics["test/acc"] <= 1 and math.isfinite(metrics["val/loss"])
    trainer = seen["trainer"]
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * 4  # 54 images, batches of 16
    (optimizer,) = trainer.optimizers
    groups = {g["weight_decay"]: g for g in optimizer.param_groups}
    assert set(groups) == {5e-4, 0.0}  # none on gamma/beta
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    # epoch 0 warm-up at 0.1 x, then a cosine from 0.1 * 16 / 256 over the 2 epochs left
    base = 0.1 * 16 / 256
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    assert base == pytest.approx(optimizer.param_groups[0]["initial_lr"])


def test_a_resumed_warmup_cosine_follows_the_new_horizon() -> None:
    # ScheduleHorizon rebuilds the schedule of a run extended from 3 to 6 epochs: the rest of it
    # is the 6-epoch schedule's, as for a plain CosineAnnealingLR
    from types import SimpleNamespace

    from normlab.callbacks.schedule_horizon import ScheduleHorizon
    from normlab.models import WarmupCosineLR

    def schedule(t_max: int) -> tuple[torch.optim.Optimizer, WarmupCosineLR]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        return opt, WarmupCosineLR(opt, T_max=t_max, warmup_epochs=2)

    def run(opt, sched, epochs: int) -> list[float]:
        lrs = []
        for _ in range(epochs):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    whole_opt, whole = schedule(6)
    whole_lrs = run(whole_opt, whole, 6)
    opt, restored = schedule(3)
    run(opt, restored, 3)
    ScheduleHorizon._realign(
        SimpleNamespace(is_global_zero=True), restored, schedule(6)[1], "epoch"
    )
    assert restored.T_max == 6
    assert run(opt, restored, 3) == pytest.approx(whole_lrs[3:])
