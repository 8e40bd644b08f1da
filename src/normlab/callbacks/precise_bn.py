"""Precise BN for live BatchNorm: population statistics instead of the EMA, before validation."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.callbacks._batches import TrainingBatches
from normlab.norm.stats import apply_population_stats, estimate_population_stats

log = logging.getLogger("normlab")


class PreciseBN(Callback):
    """Before each validation during ``fit``, recomputes the ``running_mean`` / ``running_var`` of
    every live BatchNorm layer as the exact population statistics of ``num_batches`` training
    batches (fvcore's ``update_bn_stats``, Wu & Johnson 2021: the EMA left by training lags the
    weights and is noisy). Validation, the checkpoints saved after it and the following training
    use the recomputed statistics. ``FrozenBatchNorm2d`` layers are left alone; the sanity check
    and ``trainer.validate`` are skipped.

    The batches are the first ``num_batches`` of the current epoch's order, the same on every
    process, so DDP ranks end with identical statistics without communication (the shift is
    measured against each process's own EMA; rank 0 logs it).

    Logs ``norm/precise_bn_max_shift``: the largest absolute change of any running_mean or
    running_var entry (how far the EMA was from the population statistics), once per validation,
    and an info line naming the layer that moved most.

    Args:
        num_batches: training batches per recomputation (>= 1).

    Raises:
        ValueError: ``num_batches`` is not an integer >= 1.

    Example::

        model = NormLabModule(num_classes=10, in_channels=1, norm={"name": "batchnorm"})
        trainer = Trainer(max_epochs=10, callbacks=[PreciseBN(num_batches=20)])
        trainer.fit(model, datamodule=NormLabDataModule())
    """

    def __init__(self, num_batches: int = 20) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"norm.precise_bn_batches={num_batches!r}: must be an integer >= 1")
        self.num_batches = num_batches

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        live = {n: m for n, m in pl_module.named_modules() if isinstance(m, _BatchNorm)}
        live = {n: m for n, m in live.items() if m.running_mean is not None}
        if not live:
            return
        batches = TrainingBatches(trainer, epoch=trainer.current_epoch)
        # validation runs under inference mode; the estimate's forward pass needs none of it
        with torch.inference_mode(False), trainer.precision_plugin.forward_context():
            stats = estimate_population_stats(pl_module, batches, self.num_batches)
        stats = {n: s for n, s in stats.items() if n in live}
        shifts = {
            n: max(
                (mean - live[n].running_mean).abs().max(), (var - live[n].running_var).abs().max()
            )
            for n, (mean, var) in stats.items()
        }
        moved = apply_population_stats(pl_module, stats)
        pl_module.log("norm/precise_bn_max_shift", moved, on_step=False, on_epoch=True)
        if not trainer.is_global_zero:
            return
        worst = max(shifts, key=lambda n: shifts[n]) if shifts else None
        log.info(
            "precise BN (epoch %d, step %d): running statistics of %d layers recomputed from %d"
            " training batches; largest change %.4g (in %s)",
            trainer.current_epoch,
            trainer.global_step,
            len(stats),
            batches.count,
            moved,
            worst,
        )
