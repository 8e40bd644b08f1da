"""The callbacks every training run gets, whatever ``callbacks=`` says: they keep a run's
checkpoints exact (random state), safe (divergence) and resumable (preemption)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

from normlab.callbacks.divergence import DivergenceGuard
from normlab.callbacks.preemption import PreemptionCheckpoint
from normlab.callbacks.rng_state import RNGStateCheckpoint


def reliability_callbacks(checkpoint_dir: str | Path) -> list[Callback]:
    """``[RNGStateCheckpoint, DivergenceGuard, PreemptionCheckpoint(checkpoint_dir)]``."""
    return [RNGStateCheckpoint(), DivergenceGuard(), PreemptionCheckpoint(checkpoint_dir)]
