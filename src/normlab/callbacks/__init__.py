"""Callbacks, one concern a file, each named after its class: the norm's lifecycle
(``NormLifecycle``, which ``NormLabModule.configure_callbacks()`` brings), inspection (statistics,
heatmap, gaps, saturation) and the run's safety (random state, divergence, preemption, schedule
horizon)."""

from __future__ import annotations

from typing import Any

__all__ = ["NormLifecycle"]


def __getattr__(name: str) -> Any:
    if name == "NormLifecycle":  # loaded on first use: importing the package imports no Lightning
        from normlab.callbacks.norm_lifecycle import NormLifecycle

        return NormLifecycle
    raise AttributeError(f"module 'normlab.callbacks' has no attribute {name!r}")
