"""Data: in-memory sources, feature scaling and the LightningDataModule."""

from normlab.data.datamodule import NormLabDataModule

__all__ = ["NormLabDataModule"]
