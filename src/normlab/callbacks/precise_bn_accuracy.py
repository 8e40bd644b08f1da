"""Validation accuracy with precise population statistics beside the EMA's, every epoch."""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from normlab.callbacks.norm_lifecycle import _TrainingBatches as TrainingBatches
from normlab.norm.stats import apply_population_stats, estimate_population_stats


class PreciseBNAccuracy(Callback):
    """After each validation during ``fit``, scores the validation split once more with a copy
    of the model whose running statistics are the exact population statistics of
    ``num_batches`` training batches (``estimate_population_stats``), and logs it as
    ``val/acc_precise`` next to ``val/acc`` (the EMA statistics training left). The model itself
    is not changed, so training goes on exactly as without this callback (Wu & Johnson 2021,
    "Rethinking 'Batch' in BatchNorm", section 3: the EMA lags the weights early in training and
    at high learning rates; ``experiment=population_stats``).

    Args:
        num_batches: training batches for the population statistics (>= 1).

    Raises:
        ValueError: ``num_batches`` is not an integer >= 1.

    Example::

        trainer = Trainer(max_epochs=5, callbacks=[PreciseBNAccuracy(num_batches=20)])
        trainer.fit(model, datamodule=NormLabDataModule())  # logs val/acc and val/acc_precise
    """

    def __init__(self, num_batches: int = 20) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches={num_batches!r}: must be an integer >= 1")
        self.num_batches = num_batches

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        datamodule = trainer.datamodule
        with torch.inference_mode(False), trainer.precision_plugin.forward_context():
            scored = copy.deepcopy(pl_module.net)
            batches = TrainingBatches(trainer, epoch=trainer.current_epoch)
            stats = estimate_population_stats(scored, batches, self.num_batches)
            apply_population_stats(scored, stats)
            scored.eval()
            correct = total = 0
            with torch.no_grad():
                for batch in datamodule.val_dataloader():
                    images, labels = trainer.strategy.batch_to_device(batch)
                    logits = scored(images.contiguous(memory_format=pl_module.memory_format))
                    correct += int((logits.argmax(1) == labels).sum())
                    total += labels.numel()
        pl_module.log("val/acc_precise", correct / max(total, 1), on_epoch=True, sync_dist=True)
