"""Where frozen BatchNorm statistics come from, before the first training step."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import Callback

from normlab.norm import apply_population_stats, batchnorm_layers, estimate_population_stats

log = logging.getLogger("normlab")


class FrozenBNCalibration(Callback):
    """Sets the running statistics of every ``FrozenBatchNorm2d`` once, before training starts.

    - ``init_from`` given: weights and statistics are copied from that checkpoint (fine-tuning a
      BatchNorm-trained model with frozen statistics; layers whose shapes differ are skipped).
    - otherwise: the precise-BN population estimate over ``num_batches`` training batches.
    - resuming (``trainer.fit(ckpt_path=...)``): nothing; the checkpoint holds the statistics.

    Every process sees the same (unsharded, seeded) batches, so DDP ranks agree exactly.

    Args:
        num_batches: training batches to estimate the statistics from (>= 1).
        init_from: path of a normlab checkpoint, or None.

    Raises:
        ValueError: ``num_batches`` < 1 and no ``init_from``.

    Example::

        trainer = Trainer(callbacks=[FrozenBNCalibration(num_batches=20)])
    """

    def __init__(self, num_batches: int = 20, init_from: str | None = None) -> None:
        if init_from is None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"norm.calibration_batches={num_batches!r}: must be an integer >= 1")
        self.num_batches, self.init_from = num_batches, init_from

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            log.info("frozen BatchNorm: resuming, statistics come from %s", trainer.ckpt_path)
            return
        if not batchnorm_layers(pl_module):
            return
        if self.init_from:
            self._load(pl_module)
        else:
            self._estimate(trainer, pl_module)

    def _load(self, pl_module: L.LightningModule) -> None:
        from normlab.utils.checkpoints import load_checkpoint

        source = load_checkpoint(self.init_from, key="norm.init_from")["state_dict"]
        own = pl_module.state_dict()
        matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        pl_module.load_state_dict(matching, strict=False)
        skipped = sorted(set(own) - set(matching))
        log.info(
            "frozen BatchNorm: %d tensors from %s%s",
            len(matching),
            self.init_from,
            f" (kept initial values of {skipped})" if skipped else "",
        )

    def _estimate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        datamodule.setup("fit")

        def batches():
            for batch in datamodule.train_dataloader():
                images, labels = datamodule.on_after_batch_transfer(
                    (batch[0].to(pl_module.device), batch[1]), 0
                )
                yield images

        stats = estimate_population_stats(pl_module, batches(), self.num_batches)
        moved = apply_population_stats(pl_module, stats)
        log.info(
            "frozen BatchNorm: statistics of %d layers estimated from %d training batches"
            " (max change %.4f)",
            len(stats),
            self.num_batches,
            moved,
        )
