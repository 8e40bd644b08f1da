"""The eval-mode lesson: validation accuracy with BatchNorm normalizing by batch statistics
(training mode) versus by running statistics (eval mode)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.callbacks._tags import ACC_EVAL_MODE, ACC_TRAIN_MODE, MODE_GAP
from normlab.callbacks._tensorboard import (
    check_count,
    lightning_step,
    log_scalars,
    scalar_loggers,
    to_host,
)

log = logging.getLogger("normlab")


@contextmanager
def batch_statistics(model: nn.Module):
    """Inside this block every ``_BatchNorm`` layer of ``model`` normalizes with the batch's own
    statistics, as in training mode, whatever its mode; running statistics, ``num_batches_tracked``
    and every module's train/eval mode stay untouched (the layer's output is replaced by a hook).
    ``FrozenBatchNorm2d`` layers are left alone: they use running statistics in both modes.
    """

    def hook(m: _BatchNorm, args: tuple[Any, ...], _: Tensor) -> Tensor:
        return F.batch_norm(args[0], None, None, m.weight, m.bias, training=True, eps=m.eps)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


class EvalModeGap(Callback):
    """At validation, logs accuracy on the first ``num_batches`` validation batches with every
    BatchNorm layer in eval mode (running statistics: what ``val/acc`` measures) and as if in
    training mode (each batch's own statistics: the classic bug of forgetting ``model.eval()``).

    Scalars, through every logger at the step of ``val/acc``: ``norm/acc_eval_mode``,
    ``norm/acc_train_mode`` and ``norm/mode_gap`` (train-mode minus eval-mode accuracy). The
    model's running statistics are never touched (see :func:`batch_statistics`). Batches must be
    ``(images, labels)`` and the module's ``forward`` must return logits. The eval-mode logits
    are those of the validation step's own forward, so each measured batch costs one extra
    forward pass. Only global rank 0 measures; models without ``nn.BatchNorm*`` layers log nothing.

    Args:
        num_batches: validation batches measured per validation epoch (>= 1).

    Raises:
        ConfigError: ``num_batches`` is not an integer >= 1.

    Example::

        from normlab.callbacks.eval_mode_gap import EvalModeGap
        trainer = Trainer(callbacks=[EvalModeGap(num_batches=4)])
        trainer.fit(model)  # norm/acc_*_mode, norm/mode_gap in TensorBoard
    """

    def __init__(self, num_batches: int = 1) -> None:
        self.num_batches = check_count("callbacks.eval_mode_gap.num_batches", num_batches)
        self._counts: Tensor | None = None
        self._told = False
        self._active = self._want = False
        self._logits: Tensor | None = None
        self._handle: Any = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counts = None
        self._active = not trainer.sanity_checking and bool(scalar_loggers(trainer))
        if self._active and not any(isinstance(m, _BatchNorm) for m in pl_module.modules()):
            if not self._told:
                log.debug("EvalModeGap: the model has no nn.BatchNorm layers; nothing to log")
                self._told = True
            self._active = False
        if self._active and self._handle is None:
            self._handle = pl_module.register_forward_hook(self._capture)

    def _capture(self, _: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # the validation step's own forward gives the eval-mode logits: one forward saved
        if self._want and self._logits is None and isinstance(output, Tensor):
            self._logits = output.detach()

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._logits = None
        self._want = self._active and dataloader_idx == 0 and batch_idx < self.num_batches

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._want:
            return
        self._want = False
        images, labels = batch[0], batch[1]
        logits = self._logits
        if logits is None or logits.shape[0] != labels.shape[0]:
            logits = pl_module(images)  # validation_step did not call forward on the batch
        self._logits = None
        correct_eval = (logits.argmax(1) == labels).sum()
        with batch_statistics(pl_module):
            correct_train = (pl_module(images).argmax(1) == labels).sum()
        counts = torch.stack([correct_eval, correct_train, correct_eval.new_tensor(labels.numel())])
        self._counts = counts if self._counts is None else self._counts + counts

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hook()
        if self._counts is None:
            return
        (counts,) = to_host([self._counts])
        self._counts = None
        acc_eval, acc_train = counts[0] / counts[2], counts[1] / counts[2]
        metrics = {
            ACC_EVAL_MODE: acc_eval,
            ACC_TRAIN_MODE: acc_train,
            MODE_GAP: acc_train - acc_eval,
        }
        log_scalars(trainer, {k: float(v) for k, v in metrics.items()}, lightning_step(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hook()  # also when validation stopped early

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
