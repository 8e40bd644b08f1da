"""The LightningModule: a ConvNet whose normalization comes from ``norm.py``, trained with
cross-entropy, measured with torchmetrics, optimized as ``model.optimizer`` / ``model.scheduler``
say. Its hyperparameters are plain data, so every checkpoint loads with ``weights_only=True``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from normlab.models.backbone import ConvNet
from normlab.norm import (
    freeze_named_layers,
    frozen_layer_names,
    make_norm_factory,
    norm_has_bias,
    param_groups,
)

log = logging.getLogger("normlab")
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
        channels_last: keep conv weights and inputs in channels-last (NHWC) memory, the layout
            GPU tensor cores prefer (``model.channels_last``); the results are the same.
        compile: run the backbone through ``torch.compile`` (``model.compile``); parameters and
            checkpoint keys stay those of the eager module.

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
        channels_last: bool = False,
        compile: bool = False,
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
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.accuracy = torch.nn.ModuleDict(
            {
                # micro: the fraction of correct predictions (torchmetrics defaults to macro)
                stage: MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train_", "val_", "test_")
            }
        )
        self.mean_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val_", "test_")})
        # the composed run config, stored in checkpoints so eval.py can rebuild data and model
        self.run_config: dict[str, Any] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self._backbone()(x.contiguous(memory_format=self.memory_format))

    def _backbone(self) -> torch.nn.Module:
        """``self.net``, or its compiled wrapper. The wrapper lives outside ``_modules`` (so
        ``named_modules()`` and state_dict keys stay those of ``self.net``) and is rebuilt when
        ``self.net`` is replaced (e.g. by a copy of this module)."""
        if not self.hparams.get("compile") or self._has_hooks():
            return self.net  # compiled code would skip hooks added after compilation
        compiled = self.__dict__.get("_compiled_net")
        if compiled is None or compiled._orig_mod is not self.net:
            compiled = torch.compile(self.net)
            self.__dict__["_compiled_net"] = compiled
        return compiled

    def _has_hooks(self) -> bool:
        """Whether a callback (e.g. the saturation monitor) has hooked a layer of the backbone."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.net.modules())

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled_net", None)  # compiled code is not copied or pickled: rebuilt lazily
        return state

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        # update(), not forward(): forward would also compute the batch's accuracy every step
        self.accuracy["train_"].update(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # logged once an epoch: each self.log of a Metric object moves it to the device (~1 ms)
        self.log("train/acc", self.accuracy["train_"])

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.accuracy[f"{stage}_"].update(logits, labels)
        self.mean_loss[f"{stage}_"].update(F.cross_entropy(logits, labels), weight=labels.numel())
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
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "config": self.run_config,
            # which layers are frozen is part of the model's state (norm.freeze_at_epoch)
            "frozen_layers": frozen_layer_names(self),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get(CHECKPOINT_KEY) or {}
        self.run_config = entry.get("config", self.run_config)
        # before the weights load: a layer frozen in the checkpoint stays frozen, whatever the
        # command line says (a run resumed past norm.freeze_at_epoch without repeating it)
        frozen = freeze_named_layers(self, entry.get("frozen_layers", []))
        if frozen:
            log.info("checkpoint: %d BatchNorm layers frozen as in the checkpoint", len(frozen))
