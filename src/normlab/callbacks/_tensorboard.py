"""What the inspection callbacks share: finding TensorBoard writers and batched host copies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab.errors import ConfigError


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer``, on global rank 0 only.

    Empty under ``fast_dev_run`` (Lightning swaps loggers for a ``DummyLogger``), without a
    TensorBoard logger, and on every other rank, so callers can simply loop over the result.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


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
