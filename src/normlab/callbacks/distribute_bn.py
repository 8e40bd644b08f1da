"""Average BatchNorm running statistics over DDP processes (timm's ``distribute_bn``)."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger("normlab")


class DistributeBN(Callback):
    """Makes every process hold the same BatchNorm running statistics before validation and
    before checkpoints are written, by averaging ``running_mean`` / ``running_var`` over ranks.

    Without it, under unsynced DDP each process's running statistics follow its own shard of
    the data, and validation, test and checkpoints use rank 0's. Averaging is what timm's
    ``distribute_bn(reduce=True)`` does; it is a no-op in a single process and for frozen
    statistics (which never differ between ranks).

    Logs: the largest absolute change of a running statistic at each validation, as
    ``norm/distribute_bn_shift`` (how far the processes' statistics had drifted apart). It is
    measured in ``on_validation_start``, before ``PreciseBN`` (listed after it by
    ``norm_callbacks``) recomputes the statistics from the same batches on every rank, which
    would leave nothing to measure.

    Example::

        trainer = Trainer(strategy="ddp", devices=2, callbacks=[DistributeBN()])
    """

    def _average(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor | None:
        if trainer.world_size < 2:
            return None
        shift = torch.zeros((), device=pl_module.device)
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm) and module.track_running_stats:
                for buffer in (module.running_mean, module.running_var):
                    before = buffer.clone()
                    averaged = trainer.strategy.reduce(buffer.clone(), reduce_op="mean")
                    buffer.copy_(averaged)
                    shift = torch.maximum(shift, (averaged - before).abs().max())
        return shift

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        shift = self._average(trainer, pl_module)
        if shift is not None:  # how far the ranks had drifted apart during the epoch
            pl_module.log("norm/distribute_bn_shift", shift, reduce_fx="max", sync_dist=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # for epochs without validation; ModelCheckpoint runs after the other callbacks, so
        # checkpoints hold the average either way
        self._average(trainer, pl_module)
