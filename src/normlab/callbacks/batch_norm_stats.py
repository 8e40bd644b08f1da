"""Every normalization layer's running statistics and gamma/beta, layer by layer, in one place."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from normlab.callbacks._tags import STATS, dashboard_layout, layer_tag, summary_scalars
from normlab.callbacks._tensorboard import (
    add_histogram,
    check_count,
    lightning_step,
    log_scalars,
    scalar_loggers,
    tensorboard_writers,
    to_host,
)
from normlab.norm import is_norm_layer

log = logging.getLogger("normlab")


def norm_tensors(model: nn.Module) -> list[tuple[str, str, Tensor]]:
    """``(layer, stat, tensor)`` for every normalization layer of ``model`` (BatchNorm, frozen,
    GroupNorm, LayerNorm, ...; named as in ``named_modules()``) and each of its ``STATS`` and
    ``num_batches_tracked`` that it holds (GroupNorm: weight and bias; affine=False: none)."""
    found = []
    for name, layer in model.named_modules():
        if is_norm_layer(layer):
            for stat in (*STATS, "num_batches_tracked"):
                value = getattr(layer, stat, None)
                if isinstance(value, Tensor):
                    found.append((name, stat, value))
    return found


class BatchNormStats(Callback):
    """Logs every normalization layer's ``running_mean``, ``running_var``, ``weight`` (gamma),
    ``bias`` (beta) and ``num_batches_tracked``, whichever it has: BatchNorm (also frozen and
    synced) all five, GroupNorm/LayerNorm gamma and beta. Writes the TensorBoard dashboard layout.

    Layers are named as in the LightningModule's ``named_modules()`` (e.g. ``net.features.1``).
    Points sit at Lightning's own step (see :func:`lightning_step`), ``s``; it writes

    - scalars ``norm/<layer>/<stat>/mean``, ``.../std`` (population std over the channels),
      ``.../mean_minus_std``, ``.../mean_plus_std`` and ``norm/<layer>/num_batches_tracked``,
      through every logger (TensorBoard, CSV, ...), when ``s % scalars_every_n_steps == 0``;
    - with ``per_channel``, scalars ``norm/<layer>/<stat>/channel_<c>`` (zero-padded) for layers
      with at most ``max_channels`` channels, at the scalar cadence;
    - TensorBoard histograms ``norm/<layer>/<stat>`` (buckets spanning the values' own range)
      when ``s % histograms_every_n_steps == 0``;
    - at the start, TensorBoard's custom-scalars layout (the "Custom Scalars" dashboard: per
      layer, each statistic's mean +- std and the train/test gap).

    Both kinds are also written when training starts (the initial values, step 0) and at the end
    of every training epoch, after validation: the values that epoch's checkpoint saves, also
    after precise BN / distribute BN rewrote them. Each logging step costs one device-to-host
    copy of all statistics. Only global rank 0 writes; without normalization layers (``norm=none``)
    it logs one info line and writes only the layout; without loggers it does nothing.

    Args:
        histograms_every_n_steps: histogram cadence in optimizer steps (>= 1).
        scalars_every_n_steps: summary-scalar cadence in optimizer steps (>= 1).
        per_channel: also log one scalar per channel (small layers only).
        max_channels: per-channel scalars only for layers with at most this many channels.

    Raises:
        ConfigError: a cadence or ``max_channels`` that is not an integer >= 1.

    Example::

        from normlab.callbacks.batch_norm_stats import BatchNormStats
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
        self._active = False
        self._last = {"histograms": -1, "scalars": -1}
        self._optimizer_steps = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = {"histograms": -1, "scalars": -1}
        self._optimizer_steps = trainer.global_step
        self._active = bool(scalar_loggers(trainer))
        if not self._active:
            return
        layers: dict[str, list[str]] = {}
        for name, stat, _ in norm_tensors(pl_module):
            if stat != "num_batches_tracked":
                layers.setdefault(name, []).append(stat)
        for writer in tensorboard_writers(trainer):
            writer.add_custom_scalars(dashboard_layout(layers))
        if not layers:
            log.info("BatchNormStats: the model has no normalization layers; nothing to log")
            self._active = False
        elif trainer.global_step == 0:  # a resumed run logged these values before it stopped
            self._log(trainer, pl_module, lightning_step(trainer), True, True)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # log once per optimizer step (not per accumulated micro-batch), and leave the epoch's
        # last step to on_train_epoch_end: validation may still rewrite the statistics
        stepped = trainer.global_step != self._optimizer_steps
        self._optimizer_steps = trainer.global_step
        if not stepped or batch_idx + 1 >= trainer.num_training_batches:
            return
        step = lightning_step(trainer)
        hist = step % self.histograms_every_n_steps == 0
        self._log(trainer, pl_module, step, hist, step % self.scalars_every_n_steps == 0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, lightning_step(trainer, epoch_end=True), True, True)

    def _log(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        step: int,
        histograms: bool,
        scalars: bool,
    ) -> None:
        histograms = histograms and self._last["histograms"] != step
        scalars = scalars and self._last["scalars"] != step
        if not self._active or not (histograms or scalars):
            return
        found = norm_tensors(pl_module)  # re-read: layers can be converted during training
        values = to_host([t for _, _, t in found])
        metrics: dict[str, float] = {}
        writers = tensorboard_writers(trainer) if histograms else []
        for (name, stat, _), v in zip(found, values, strict=True):
            if stat == "num_batches_tracked":
                if scalars:
                    metrics[layer_tag(name, stat)] = float(v)
                continue
            for writer in writers:
                add_histogram(writer, layer_tag(name, stat), v, step)
            if scalars:
                metrics.update(summary_scalars(name, stat, float(v.mean()), float(v.std())))
                metrics.update(self._channels(name, stat, v))
        if scalars:
            log_scalars(trainer, metrics, step)
            self._last["scalars"] = step
        if histograms:
            self._last["histograms"] = step

    def _channels(self, name: str, stat: str, v: np.ndarray) -> dict[str, float]:
        if not self.per_channel or v.size > self.max_channels:
            return {}
        width = len(str(v.size - 1))  # zero-padded, so tags sort by channel
        return {
            layer_tag(name, stat, f"channel_{c:0{width}d}"): x
            for c, x in enumerate(v.reshape(-1).tolist())
        }
