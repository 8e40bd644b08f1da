"""The LightningModule: a ConvNet whose normalization comes from ``norm.py``, trained with
cross-entropy, measured with torchmetrics, optimized as ``model.optimizer`` / ``model.scheduler``
say. Its hyperparameters are plain data, so every checkpoint loads with ``weights_only=True``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from normlab.models.backbone import ConvNet
from normlab.norm import make_norm_factory, norm_has_bias, param_groups

CHECKPOINT_KEY = "normlab"  # marks a normlab checkpoint and carries the run's composed config


class NormLabModule(L.LightningModule):
    """Image classifier with configurable normalization.

    Args:
        num_classes: number of classes (from the data).
        in_channels: input channels (from the data).
        norm: the ``norm`` config group as a dict, e.g. ``{"name": "batchnorm", "momentum": 0.1}``.
        widths, blocks_per_stage, activation, dropout: the backbone (see ``ConvNet``).
        optimizer: ``{"name": "adamw"|"adam"|"sgd", "lr", "weight_decay", "norm_weight_decay",
            "momentum"}``; norm parameters (gamma/beta) get ``norm_weight_decay``.
        scheduler: ``{"name": "none"|"cosine"|"step", "step_size", "gamma"}``, stepped per epoch.

    Example::

        model = NormLabModule(num_classes=10, in_channels=1, norm={"name": "batchnorm"})
        logits = model(torch.randn(8, 1, 8, 8))
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        norm: Mapping[str, Any],
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ConvNet(
            in_channels,
            num_classes,
            norm_layer=make_norm_factory(norm),
            conv_bias=not norm_has_bias(norm),
            widths=widths,
            blocks_per_stage=blocks_per_stage,
            activation=activation,
            dropout=dropout,
        )
        self.accuracy = torch.nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes) for stage in ("train_", "val_", "test_")}
        )
        self.mean_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val_", "test_")})
        # the composed run config, stored in checkpoints so eval.py can rebuild data and model
        self.run_config: dict[str, Any] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.accuracy["train_"](logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.accuracy["train_"], on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.accuracy[f"{stage}_"](logits, labels)
        self.mean_loss[f"{stage}_"](F.cross_entropy(logits, labels), weight=labels.numel())
        # metric objects: Lightning computes them once per epoch, reduced over all processes
        self.log(f"{stage}/acc", self.accuracy[f"{stage}_"], prog_bar=True)
        self.log(f"{stage}/loss", self.mean_loss[f"{stage}_"])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        opt = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "norm_weight_decay": 0.0}
        opt.update(self.hparams.optimizer or {})
        groups = param_groups(self, opt["weight_decay"], opt["norm_weight_decay"])
        if opt["name"] == "sgd":
            optimizer = torch.optim.SGD(groups, lr=opt["lr"], momentum=opt.get("momentum", 0.9))
        elif opt["name"] == "adam":
            optimizer = torch.optim.Adam(groups, lr=opt["lr"])
        else:
            optimizer = torch.optim.AdamW(groups, lr=opt["lr"])
        sched = dict(self.hparams.scheduler or {"name": "none"})
        if sched["name"] == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, self.trainer.max_epochs)
            )
        elif sched["name"] == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=sched.get("step_size", 10), gamma=sched.get("gamma", 0.1)
            )
        else:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"format": 1, "config": self.run_config}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = (checkpoint.get(CHECKPOINT_KEY) or {}).get("config", self.run_config)
