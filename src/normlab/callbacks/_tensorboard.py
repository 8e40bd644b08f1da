"""What the inspection callbacks share: Lightning's logging step, the loggers that receive their
scalars, the TensorBoard writers that receive histograms/images/layouts, batched host copies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab.errors import ConfigError

# histogram buckets over the values' own [min, max]: TensorBoard draws at most about 30
HISTOGRAM_BINS = 30


def lightning_step(trainer: Any, epoch_end: bool = False) -> int:
    """The step at which Lightning logs its own metrics at this moment, so normlab's points share
    the x axis with ``train/loss``, ``val/acc`` and the learning rate.

    That is the number of optimizer steps taken before the current batch (``train/loss`` of the
    first batch is at 0; validation after the 20th batch logs at 19), and at the end of a training
    epoch one less than the steps taken (Lightning's epoch-end metrics and ``val/acc`` share it).
    Lightning keeps the count in ``fit_loop.epoch_loop._batches_that_stepped``, which its own
    ``LearningRateMonitor`` and ``DeviceStatsMonitor`` read in the same way.
    """
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    return max(step - 1, 0) if epoch_end else step


def scalar_loggers(trainer: Any) -> list[Any]:
    """Every logger of ``trainer`` (TensorBoard, CSV, ...) on global rank 0; empty on other ranks,
    without loggers and under ``fast_dev_run`` (Lightning's ``DummyLogger``), so callers can skip
    the measuring when nobody would receive it."""
    from lightning.pytorch.loggers.logger import DummyLogger

    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send ``{tag: value}`` to every logger at ``step`` through Lightning's logger interface
    (``logger.log_metrics``, as ``LearningRateMonitor`` does): ``logger=csv`` gets them too,
    except the dashboard's helper series (``zz_bands/...``), which only TensorBoard draws."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from normlab.callbacks._tags import BAND_PREFIX

    if not metrics:
        return
    own = {k: v for k, v in metrics.items() if not k.startswith(BAND_PREFIX + "/")}
    for logger in scalar_loggers(trainer):
        logger.log_metrics(
            dict(metrics if isinstance(logger, TensorBoardLogger) else own), step=step
        )


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer``, on global rank 0 only:
    for what only TensorBoard shows (histograms, images, the dashboard layout).

    Empty under ``fast_dev_run`` (Lightning swaps loggers for a ``DummyLogger``), without a
    TensorBoard logger, and on every other rank, so callers can simply loop over the result.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg.experiment for lg in scalar_loggers(trainer) if isinstance(lg, TensorBoardLogger)]


def add_histogram(writer: Any, tag: str, values: np.ndarray, step: int) -> None:
    """``writer.add_histogram`` with up to ``HISTOGRAM_BINS`` equal buckets spanning the values'
    own range: the default (exponential buckets 10% apart) puts gamma values 1.03..1.08 into
    one bucket."""
    bins = max(1, min(HISTOGRAM_BINS, values.size))
    writer.add_histogram(tag, values, step, bins=bins)


def to_host(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    """Copy many small tensors to the host with one transfer (one sync, not one per tensor).

    Values are returned as float64 numpy arrays with the tensors' shapes; integer tensors such
    as ``num_batches_tracked`` are exact below 2**24 (they travel as float32).
    """
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).cpu().double().numpy()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def check_count(key: str, value: Any, *, allow_zero: bool = False) -> int:
    """Validate a cadence or count argument: an int >= 1 (or >= 0 when 0 means off).

    Raises:
        ConfigError: naming ``key`` (the config key, e.g. ``callbacks.bn_stats.every_n_steps``).
    """
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        more = " (0 turns it off)" if allow_zero else ""
        raise ConfigError(key, value, f"expected an integer >= {low}{more}")
    return value
