"""Loading checkpoints safely (``weights_only=True``); what a resumed run may change is
``normlab.resume``."""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError

CHECKPOINT_KEY = "normlab"  # marks a normlab checkpoint; holds the run config (NormLabModule)


# torch.load's own advice around a weights_only refusal: how to load the file with
# weights_only=False, which normlab never does
_TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation")


def _reason(err: Exception) -> str:
    """The useful part of a torch.load error, on one line and without terminal escapes; for a
    weights_only refusal, the global it refused (torch names it on a line of its own)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Weights only load failed" in text or "WeightsUnpickler error" in text:
        detail = next((ln for ln in lines if not ln.startswith(_TORCH_ADVICE)), "")
        detail = re.split(r"\.? Please", detail.removeprefix("WeightsUnpickler error: "))[0]
        return (
            f"{type(err).__name__}: {detail.rstrip('.')[:200] or 'a pickled Python object'}; the"
            " file holds pickled Python objects, and building them could run code from it"
        )
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def check_archive(path: Path, key: str) -> None:
    """Refuse a torch.save archive whose members do not match their CRC-32 checksums: torch.load
    does not check them, so a flipped bit in a tensor would load as a wrong number. Reads the
    file once (about 1 s per GB from the page cache).

    Raises:
        CheckpointError: naming the file and the damaged member.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the first member whose CRC-32 differs, or None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        damaged = f"? ({type(err).__name__}: {str(err)[:200]})"
    if damaged is not None:
        raise CheckpointError(
            f"{key}={path} is damaged: its member {damaged} does not match the CRC-32 checksum"
            " torch.save wrote for it (a bit flipped on disk or in a copy), and loading it would"
            " give wrong numbers without an error; copy the file again from its source, or use"
            " another checkpoint of the run (checkpoints/last.ckpt or the best one)."
        )


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load a normlab checkpoint with ``torch.load(weights_only=True)``: no code in it runs; its
    zip members' checksums are checked first (:func:`check_archive`).

    Raises:
        CheckpointError: the file is missing, damaged, unreadable, or not written by normlab's
            train.py.
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
    check_archive(path, key)
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
