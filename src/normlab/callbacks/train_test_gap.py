"""BatchNorm's train/test inconsistency: validation batch statistics versus running statistics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from normlab.callbacks._tags import GAP_MEAN_SHIFT, GAP_VAR_RATIO, layer_tag
from normlab.callbacks._tensorboard import (
    check_count,
    lightning_step,
    log_scalars,
    scalar_loggers,
    to_host,
)
from normlab.norm import batchnorm_layers

log = logging.getLogger("normlab")


def batch_stat_gap(
    x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """How far one batch's per-channel statistics are from the running statistics.

    ``x`` is a BatchNorm input ``(N, C, *)``. Returns two 0-d tensors (no host sync):

    - ``mean_shift``: mean over channels of ``|batch_mean - running_mean| / sqrt(running_var +
      eps)``, the shift in units of the running standard deviation (0: no gap);
    - ``var_ratio``: mean over channels of ``(batch_var + eps) / (running_var + eps)`` with the
      unbiased batch variance, as ``running_var`` tracks it (1: no gap).
    """
    x = x.detach().float()
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=True) if x.numel() > x.shape[1] else torch.zeros_like(mean)
    rm, rv = running_mean.float(), running_var.float()
    shift = ((mean - rm).abs() / (rv + eps).sqrt()).mean()
    ratio = ((var + eps) / (rv + eps)).mean()
    return shift, ratio


class TrainTestGap(Callback):
    """At validation, logs per BatchNorm layer how far the validation batches' statistics are
    from the running statistics the layer normalizes with in eval mode: the train/test
    inconsistency of BatchNorm (large values: eval mode sees inputs unlike those it learned on).

    Scalars, through every logger at the step of ``val/acc``, averaged over the first
    ``num_batches`` validation batches (see :func:`batch_stat_gap`):
    ``norm/<layer>/gap_mean_shift`` (0 is no gap) and ``norm/<layer>/gap_var_ratio`` (1 is no
    gap). Layers without running statistics are skipped. Forward pre-hooks read each layer's
    input; nothing in the model changes. Only global rank 0 measures; the sanity check,
    ``fast_dev_run`` and runs without loggers log nothing.

    Args:
        num_batches: validation batches measured per validation epoch (>= 1).

    Raises:
        ConfigError: ``num_batches`` is not an integer >= 1.

    Example::

        from normlab.callbacks.train_test_gap import TrainTestGap
        trainer = Trainer(callbacks=[TrainTestGap(num_batches=4)])
        trainer.fit(model)  # norm/<layer>/gap_* in TensorBoard
    """

    def __init__(self, num_batches: int = 4) -> None:
        self.num_batches = check_count("callbacks.train_test_gap.num_batches", num_batches)
        self._handles: list[Any] = []
        self._sums: dict[str, list[Tensor]] = {}
        self._batches = 0
        self._measuring = False
        self._seen: set[str] = set()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        self._sums, self._batches, self._measuring = {}, 0, False
        if trainer.sanity_checking or not scalar_loggers(trainer):
            return
        for name, layer in batchnorm_layers(pl_module):
            if getattr(layer, "running_mean", None) is not None:
                self._handles.append(layer.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            # only the validation step's own forward: other callbacks may run more forwards
            if not self._measuring or name in self._seen:
                return
            self._seen.add(name)
            shift, ratio = batch_stat_gap(args[0], layer.running_mean, layer.running_var, layer.eps)
            if name in self._sums:
                self._sums[name][0] += shift
                self._sums[name][1] += ratio
            else:
                self._sums[name] = [shift, ratio]

        return hook

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._seen = set()
        self._measuring = (
            bool(self._handles) and dataloader_idx == 0 and batch_idx < self.num_batches
        )

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._batches += self._measuring
        self._measuring = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        if not self._sums or not self._batches:
            return
        names = list(self._sums)
        values = to_host([torch.stack(self._sums[n]) for n in names])
        metrics = {}
        for name, (shift, ratio) in zip(names, values, strict=True):
            metrics[layer_tag(name, GAP_MEAN_SHIFT)] = float(shift) / self._batches
            metrics[layer_tag(name, GAP_VAR_RATIO)] = float(ratio) / self._batches
        log_scalars(trainer, metrics, lightning_step(trainer))
        self._sums = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()  # also when validation stopped early

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
