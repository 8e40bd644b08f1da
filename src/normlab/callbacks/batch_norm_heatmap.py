"""A per-epoch picture of BatchNorm's running statistics: a row per layer, a cell per channel."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from normlab.callbacks._tags import HEATMAP
from normlab.callbacks._tensorboard import check_count, lightning_step, tensorboard_writers, to_host
from normlab.norm import batchnorm_layers

log = logging.getLogger("normlab")

TAG = HEATMAP


def render_heatmap(stats: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> np.ndarray:
    """Draw ``{layer: (running_mean, running_var)}`` as two heatmaps (layers x channels; cells
    past a layer's channel count are blank) and return the picture as an HWC uint8 RGB array.

    running_mean uses a diverging scale centred on 0; running_var is shown as log10.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(stats)
    width = max(len(m) for m, _ in stats.values())
    grids = [np.full((len(names), width), np.nan) for _ in range(2)]
    for row, (mean, var) in enumerate(stats.values()):
        grids[0][row, : len(mean)] = mean
        grids[1][row, : len(var)] = var
    height = 1.3 + 0.5 * len(names)
    fig = Figure(figsize=(9, height), dpi=80)  # a fixed layout: constrained doubles the cost
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.15, right=0.92, bottom=0.5 / height, top=1 - 0.6 / height)
    axes = fig.subplots(1, 2, squeeze=False, gridspec_kw={"wspace": 0.3})[0]
    bound = max(float(np.nanmax(np.abs(grids[0]))), 1e-8)
    with np.errstate(divide="ignore", invalid="ignore"):
        grids[1] = np.log10(grids[1])  # variances span decades; a log colour bar is 3x slower
    panels = [
        ("running_mean", {"cmap": "coolwarm", "vmin": -bound, "vmax": bound}),
        ("log10(running_var)", {"cmap": "viridis"}),
    ]
    for ax, grid, (label, kw) in zip(axes, grids, panels, strict=True):
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", **kw)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("channel", fontsize=9)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=8)
        fig.colorbar(image, ax=ax, pad=0.02)
    fig.suptitle(title)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class BatchNormHeatmap(Callback):
    """Logs an image ``norm/running_stats_heatmap`` at the end of every ``every_n_epochs``-th
    training epoch: ``running_mean`` and ``running_var`` of every channel (columns) of every
    BatchNorm layer (rows, named as in ``named_modules()``).

    The image's step is that of Lightning's epoch-end metrics (see :func:`lightning_step`). Only
    global rank 0 draws; without BatchNorm layers (``norm=none``) or without a TensorBoard logger
    it does nothing. Drawing uses matplotlib's Agg canvas (no display needed) and costs a
    fraction of a second per image.

    Args:
        every_n_epochs: draw every this many epochs (>= 1); the last epoch is always drawn.

    Raises:
        ConfigError: ``every_n_epochs`` is not an integer >= 1.

    Example::

        from normlab.callbacks.batch_norm_heatmap import BatchNormHeatmap
        trainer = Trainer(callbacks=[BatchNormHeatmap(every_n_epochs=1)])
        trainer.fit(model)  # TensorBoard's Images tab
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = check_count("callbacks.bn_heatmap.every_n_epochs", every_n_epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        writers = tensorboard_writers(trainer)
        layers = [(n, m) for n, m in batchnorm_layers(pl_module) if m.running_mean is not None]
        if not writers or not layers:
            return
        values = to_host([t for _, m in layers for t in (m.running_mean, m.running_var)])
        stats = {n: (values[2 * i], values[2 * i + 1]) for i, (n, _) in enumerate(layers)}
        step = lightning_step(trainer, epoch_end=True)
        image = render_heatmap(stats, f"epoch {epoch}, step {step}")
        for writer in writers:
            writer.add_image(TAG, image, step, dataformats="HWC")
