"""The norm's lifecycle around training: where frozen statistics come from (``norm.init_from``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError


def init_from_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state_dict`` of the normlab checkpoint ``norm.init_from`` names, checked to hold
    BatchNorm running statistics (it was trained with ``norm=batchnorm`` or ``norm=frozen``).

    Raises:
        CheckpointError: the file is not a normlab checkpoint, or has no running statistics.
    """
    from normlab.utils.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(Path(path).expanduser(), key="norm.init_from")
    state = checkpoint.get("state_dict") or {}
    if not any(k.endswith(".running_mean") for k in state):
        trained = ((checkpoint["normlab"].get("config") or {}).get("norm") or {}).get("name")
        raise CheckpointError(
            f"norm.init_from={path} holds no BatchNorm running statistics (its run used"
            f" norm={trained}); give a checkpoint of a norm=batchnorm or norm=frozen run"
            " with the same model, or leave norm.init_from=null to estimate them."
        )
    return state
