"""Callbacks, one concern a file; ``norm_callbacks`` adds those a norm config needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from normlab.callbacks.frozen_calibration import FrozenBNCalibration

__all__ = ["FrozenBNCalibration", "norm_callbacks"]


def norm_callbacks(
    norm: Mapping[str, Any], trainer: Mapping[str, Any] | None = None
) -> list[Callback]:
    """The callbacks that ``norm`` implies (they are part of the norm's semantics, not optional)."""
    if norm.get("name") == "frozen":
        return [FrozenBNCalibration(norm.get("calibration_batches", 20), norm.get("init_from"))]
    return []
