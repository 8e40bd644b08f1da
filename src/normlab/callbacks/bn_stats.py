"""BatchNorm's running statistics and affine parameters in TensorBoard, layer by layer."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from normlab.callbacks._tensorboard import check_count, tensorboard_writers, to_host
from normlab.norm import batchnorm_layers

log = logging.getLogger("normlab")

# PyTorch's names: gamma is `weight`, beta is `bias`
STATS = ("running_mean", "running_var", "weight", "bias")


class BatchNormStats(Callback):
    """Logs every BatchNorm layer's ``running_mean``, ``running_var``, ``weight`` (gamma),
    ``bias`` (beta) and ``num_batches_tracked`` to TensorBoard.

    Layers are all ``nn.BatchNorm*``, ``SyncBatchNorm`` and ``FrozenBatchNorm2d`` modules, named
    as in the LightningModule's ``named_modules()`` (e.g. ``net.features.1``). At optimizer step
    ``s`` (``trainer.global_step``) it writes:

    - histograms ``bn/<layer>/<stat>`` when ``s % histograms_every_n_steps == 0``;
    - scalars ``bn_stats/<layer>/<stat>/mean`` and ``.../std`` (mean and population std over
      the channels) and ``bn_stats/<layer>/num_batches_tracked`` when
      ``s % scalars_every_n_steps == 0``;
    - with ``per_channel``, scalars ``bn_channels/<layer>/<stat>/<c>`` for each channel ``c``
      (zero-padded) of layers with at most ``max_channels`` channels, at the scalar cadence.

    Both kinds are also written when training starts (the initial values) and at the end of every
    training epoch (the values that epoch's checkpoint saves), once per step. Each logging step
    costs one device-to-host copy of all statistics, no ``.item()`` per tensor. Only global rank 0
    writes; without BatchNorm layers (``norm=none``) it logs one info line and nothing else;
    without a TensorBoard logger (or under ``fast_dev_run``) it does nothing.

    Args:
        histograms_every_n_steps: histogram cadence in optimizer steps (>= 1).
        scalars_every_n_steps: summary-scalar cadence in optimizer steps (>= 1).
        per_channel: also log one scalar per channel (small layers only).
        max_channels: per-channel scalars only for layers with at most this many channels.

    Raises:
        ConfigError: a cadence or ``max_channels`` that is not an integer >= 1.

    Example::

        from normlab.callbacks.bn_stats import BatchNormStats
        trainer = Trainer(callbacks=[BatchNormStats(histograms_every_n_steps=50)])
        trainer.fit(model)  # then: tensorboard --logdir logs
    """

    def __init__(
        self,
        histograms_every_n_steps: int = 100,
        scalars_every_n_steps: int = 20,
        per_channel: bool = False,
        max_channels: int = 64,
    ) -> None:
        key = "callbacks.bn_stats."
        self.histograms_every_n_steps = check_count(
            key + "histograms_every_n_steps", histograms_every_n_steps
        )
        self.scalars_every_n_steps = check_count(
            key + "scalars_every_n_steps", scalars_every_n_steps
        )
        self.per_channel = bool(per_channel)
        self.max_channels = check_count(key + "max_channels", max_channels)
        self._writers: list[Any] = []
        self._last = {"histograms": -1, "scalars": -1}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._writers = tensorboard_writers(trainer)
        self._last = {"histograms": -1, "scalars": -1}
        if not self._writers:
            return
        if not batchnorm_layers(pl_module):
            log.info("BatchNormStats: the model has no BatchNorm layers; nothing to log")
            self._writers = []
            return
        self._log(pl_module, trainer.global_step, histograms=True, scalars=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        step = trainer.global_step
        self._log(
            pl_module,
            step,
            histograms=step % self.histograms_every_n_steps == 0,
            scalars=step % self.scalars_every_n_steps == 0,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module, trainer.global_step, histograms=True, scalars=True)

    def _log(
        self, pl_module: L.LightningModule, step: int, histograms: bool, scalars: bool
    ) -> None:
        # global_step stands still under gradient accumulation: log each step once
        histograms = histograms and self._last["histograms"] != step
        scalars = scalars and self._last["scalars"] != step
        if not self._writers or not (histograms or scalars):
            return
        keys: list[tuple[str, str]] = []
        tensors: list[Tensor] = []
        for name, layer in batchnorm_layers(pl_module):  # re-read: layers can be converted
            for stat in (*STATS, "num_batches_tracked"):
                value = getattr(layer, stat, None)
                if isinstance(value, Tensor):
                    keys.append((name, stat))
                    tensors.append(value)
        values = dict(zip(keys, to_host(tensors), strict=True))
        for writer in self._writers:
            for (name, stat), v in values.items():
                if stat == "num_batches_tracked":
                    if scalars:
                        writer.add_scalar(f"bn_stats/{name}/{stat}", float(v), step)
                    continue
                if histograms:
                    writer.add_histogram(f"bn/{name}/{stat}", v, step)
                if scalars:
                    self._write_scalars(writer, f"{name}/{stat}", v, step)
        if histograms:
            self._last["histograms"] = step
        if scalars:
            self._last["scalars"] = step

    def _write_scalars(self, writer: Any, name: str, v: np.ndarray, step: int) -> None:
        writer.add_scalar(f"bn_stats/{name}/mean", float(v.mean()), step)
        writer.add_scalar(f"bn_stats/{name}/std", float(v.std()), step)
        if self.per_channel and v.size <= self.max_channels:
            width = len(str(v.size - 1))  # zero-padded, so tags sort by channel
            for c, x in enumerate(v.tolist()):
                writer.add_scalar(f"bn_channels/{name}/{c:0{width}d}", x, step)
