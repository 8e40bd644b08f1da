"""Data: in-memory sources, feature scaling and the LightningDataModule.

``NormLabDataModule`` is imported on first use, so that ``normlab.data.sources`` (what the
hand-written baselines of ``scripts/bench.py --process`` load their data with) does not pay
Lightning's import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normlab.data.datamodule import NormLabDataModule

__all__ = ["NormLabDataModule"]


def __getattr__(name: str) -> Any:
    if name == "NormLabDataModule":
        from normlab.data.datamodule import NormLabDataModule

        return NormLabDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
