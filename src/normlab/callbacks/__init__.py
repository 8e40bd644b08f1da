"""Callbacks, one concern a file; ``norm_callbacks`` adds those a norm config needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from normlab.callbacks.distribute_bn import DistributeBN
from normlab.callbacks.freeze_schedule import FreezeBatchNorm
from normlab.callbacks.frozen_calibration import FrozenBNCalibration
from normlab.callbacks.precise_bn import PreciseBN
from normlab.callbacks.precise_bn_accuracy import PreciseBNAccuracy
from normlab.norm.spec import value

__all__ = [
    "DistributeBN",
    "FreezeBatchNorm",
    "FrozenBNCalibration",
    "PreciseBN",
    "PreciseBNAccuracy",
    "norm_callbacks",
]


def norm_callbacks(
    norm: Mapping[str, Any], trainer: Mapping[str, Any] | None = None
) -> list[Callback]:
    """The callbacks that ``norm`` implies (they are part of the norm's semantics, not optional):
    ``norm=frozen`` -> FrozenBNCalibration; ``norm=batchnorm`` with ``precise_bn_batches`` > 0 ->
    PreciseBN, with ``freeze_at_epoch`` set -> FreezeBatchNorm, with ``distribute_bn`` ->
    DistributeBN (before PreciseBN, whose population statistics then win)."""
    if norm.get("name") == "frozen":
        return [FrozenBNCalibration(value(norm, "calibration_batches"), norm.get("init_from"))]
    callbacks: list[Callback] = []
    if norm.get("name") == "batchnorm":
        if norm.get("distribute_bn"):
            callbacks.append(DistributeBN())
        if norm.get("precise_bn_batches"):
            callbacks.append(PreciseBN(norm["precise_bn_batches"]))
        if norm.get("freeze_at_epoch") is not None:
            callbacks.append(FreezeBatchNorm(norm["freeze_at_epoch"]))
    return callbacks
