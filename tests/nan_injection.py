"""A test-only callback that makes the training loss NaN at a chosen step, to exercise
``DivergenceGuard`` end to end: ``+callbacks.nan._target_=tests.nan_injection.InjectNaN``."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class InjectNaN(Callback):
    """Fills the (scaled) input images of the training batch at global step ``at_step`` with NaN.

    Args:
        at_step: the global step whose batch is poisoned (>= 0).

    Raises:
        ValueError: ``at_step`` is negative.

    Example::

        trainer = Trainer(callbacks=[InjectNaN(at_step=7), DivergenceGuard()])
    """

    def __init__(self, at_step: int) -> None:
        if at_step < 0:
            raise ValueError(f"at_step={at_step}: must be >= 0")
        self.at_step = at_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at_step:
            batch[0].fill_(float("nan"))
