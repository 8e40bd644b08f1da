"""Train with live BatchNorm, then freeze its statistics from a given epoch on."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.norm import FrozenBatchNorm2d, convert_to_frozen

log = logging.getLogger("normlab")


class FreezeBatchNorm(Callback):
    """At the start of epoch ``at_epoch`` every ``nn.BatchNorm2d`` / ``SyncBatchNorm`` of the model
    becomes a bit-exact ``FrozenBatchNorm2d`` (``norm.freeze_at_epoch``): the running statistics
    stop moving, later epochs train and validate with them (Wu & Johnson 2021, against
    train/test inconsistency). gamma/beta keep training: the frozen layers hold the very
    ``Parameter`` objects the optimizer was built with, so its state carries on.

    A resumed run stays frozen: the checkpoint lists its frozen layers, and the LightningModule
    freezes them again before the weights load (also when the resuming command does not repeat
    ``norm.freeze_at_epoch``).

    Logs: an info line at the conversion, and ``norm/frozen`` (0 before, 1 from ``at_epoch`` on)
    once per epoch. Under DDP the frozen statistics are broadcast from rank 0, so ranks agree.

    Args:
        at_epoch: the first epoch (0-based) trained with frozen statistics (>= 1: epoch 0 would
            freeze the initial zeros/ones; use ``norm=frozen`` for frozen statistics throughout).

    Raises:
        ValueError: ``at_epoch`` is not an integer >= 1.

    Example::

        model = NormLabModule(num_classes=10, in_channels=1, norm={"name": "batchnorm"})
        trainer = Trainer(max_epochs=10, callbacks=[FreezeBatchNorm(at_epoch=8)])
        trainer.fit(model, datamodule=NormLabDataModule())
    """

    def __init__(self, at_epoch: int) -> None:
        if isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 1:
            raise ValueError(f"norm.freeze_at_epoch={at_epoch!r}: must be an integer >= 1")
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen_now = trainer.current_epoch >= self.at_epoch
        if frozen_now and any(isinstance(m, _BatchNorm) for m in pl_module.modules()):
            self._freeze(trainer, pl_module)
        pl_module.log("norm/frozen", float(frozen_now), on_step=False, on_epoch=True)

    def _freeze(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        live = [n for n, m in pl_module.named_modules() if isinstance(m, _BatchNorm)]
        convert_to_frozen(pl_module)
        if trainer.world_size > 1:
            with torch.no_grad():
                for m in pl_module.modules():
                    if isinstance(m, FrozenBatchNorm2d):
                        for buf in (m.running_mean, m.running_var):
                            buf.copy_(trainer.strategy.broadcast(buf, src=0))
        if not trainer.is_global_zero:
            return
        log.info(
            "epoch %d: BatchNorm statistics frozen (norm.freeze_at_epoch=%d): %d layers converted"
            " to FrozenBatchNorm2d %s; gamma/beta keep training",
            trainer.current_epoch,
            self.at_epoch,
            len(live),
            live,
        )
