"""Training batches for statistics passes outside the training loop (calibration, precise BN)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
from torch import Tensor


class TrainingBatches:
    """Iterates the scaled input images of the training split, on the model's device, in the
    order of training epoch ``epoch``; ``count`` says how many batches were taken.

    The loader is the datamodule's own ``train_dataloader()`` (not Lightning's distributed copy),
    so every process sees the same batches and DDP ranks compute identical statistics. Batches go
    through ``strategy.batch_to_device``, i.e. the same ``on_after_batch_transfer`` scaling as in
    training.
    """

    def __init__(self, trainer: L.Trainer, epoch: int = 0) -> None:
        if trainer.datamodule is None:
            raise RuntimeError("statistics passes need a LightningDataModule passed to fit()")
        self.trainer, self.epoch, self.count = trainer, epoch, 0

    def __iter__(self) -> Iterator[Tensor]:
        loader = self.trainer.datamodule.train_dataloader()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        for batch in loader:
            images, _ = self.trainer.strategy.batch_to_device(batch)
            self.count += 1
            yield images
