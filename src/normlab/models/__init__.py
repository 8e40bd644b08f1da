"""Models: the norm-agnostic ConvNet backbone and the LightningModule."""

from normlab.models.module import NormLabModule

__all__ = ["NormLabModule"]
