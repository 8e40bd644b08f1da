"""Models: the LightningModule that wraps any net, the small ConvNet, and adapters that build
torchvision and timm classifiers for the data's classes and channels.

Names are loaded on first use, so ``normlab.models.defaults`` is read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "NormLabModule": "module",
    "ConvNet": "backbone",
    "torchvision_net": "adapters",
    "timm_net": "adapters",
    "build_net": "adapters",
    "load_weights": "adapters",
    "WarmupCosineLR": "schedules",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'normlab.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"normlab.models.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
