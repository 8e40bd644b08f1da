"""Loading checkpoints safely (``weights_only=True``); what a resumed run may change is
``normlab.resume``."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError

CHECKPOINT_KEY = "normlab"  # marks a normlab checkpoint; holds the run config (NormLabModule)


def _reason(err: Exception) -> str:
    """The useful part of a torch.load error, on one line and without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    unsafe = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please| Please|$)", text, re.M)
    if unsafe:
        return (
            f"{type(err).__name__}: {unsafe.group(1).strip()}; the file holds pickled Python"
            " objects, and building them could run code from it"
        )
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load a normlab checkpoint with ``torch.load(weights_only=True)``: no code in it runs.

    Raises:
        CheckpointError: the file is missing, unreadable, or not written by normlab's train.py.
    """
    import torch

    path = Path(path)
    hint = "give a .ckpt written by train.py, e.g. logs/train/runs/<run>/checkpoints/last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"{key}={path}: no such file; {hint}.")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives (since torch 1.6)
        raise CheckpointError(
            f"{key}={path} is not a normlab checkpoint: it is not a complete file written by"
            f" torch.save ({path.stat().st_size} bytes, not a zip archive); {hint}."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickler errors alike
        raise CheckpointError(
            f"{key}={path} is not a normlab checkpoint: torch.load(weights_only=True) refuses"
            f" it ({_reason(err)}); {hint}."
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CheckpointError(
            f"{key}={path} is not a normlab checkpoint: it loads, but has no '{CHECKPOINT_KEY}'"
            f" entry with the run's config (was it written by another program?); {hint}."
        )
    return checkpoint
