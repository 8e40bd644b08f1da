"""Conversions end to end through train.py: a ConvNeXt trained with BatchNorm in place of its
LayerNorms (statistics in TensorBoard), and a net without norm layers refused under frozen."""

from __future__ import annotations

import pytest
import torch

from tests.test_diagnostics import read_events

pytest.importorskip("timm")
SMALL = ["trainer=cpu", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null"]
SMALL += ["data=synthetic", "data.batch_size=16", "trainer.limit_train_batches=2"]
SMALL += ["trainer.limit_val_batches=1"]


def test_convnext_trains_with_batchnorm_in_place_of_every_layernorm(train_run) -> None:
    run = train_run(*SMALL, "model=timm", "model.arch=convnext_atto", "norm=batchnorm", fast=False)
    assert run.returncode == 0, run.output[-3000:]
    log = (run.run_dir / "train.log").read_text()
    assert "norm=batchnorm: 17 LayerNorm2d -> BatchNorm2d (kept: eps); 34 tensors dropped" in log
    tags = read_events(run.run_dir / "tensorboard").Tags()["scalars"]
    layers = {t.split("/")[1] for t in tags if t.endswith("/running_mean/mean")}
    assert len(layers) == 17 and "net.stem.1" in layers and "net.head.norm" in layers
    state = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert sum(k.endswith(".running_var") for k in state) == 17


def test_a_net_without_norm_layers_is_refused_under_frozen(train_run) -> None:
    run = train_run(*SMALL, "model=torchvision", "model.arch=squeezenet1_0", "norm=frozen",
                    fast=False)  # fmt: skip
    assert run.returncode == 2
    assert "normlab: error: norm='frozen' is not valid: SqueezeNet has no normalization" in (
        run.stderr
    )
    assert "Traceback" not in run.output and not run.run_dir.exists()
