"""The callbacks every training run gets, whatever ``callbacks=`` says: they keep a run's
checkpoints exact (random state), safe (divergence) and resumable (preemption), and a resumed run
on the schedule of the command that resumed it."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

from normlab.callbacks.divergence import DivergenceGuard
from normlab.callbacks.preemption import PreemptionCheckpoint
from normlab.callbacks.rng_state import RNGStateCheckpoint
from normlab.callbacks.schedule_horizon import ScheduleHorizon


def reliability_callbacks(checkpoint_dir: str | Path) -> list[Callback]:
    """``[RNGStateCheckpoint, DivergenceGuard, PreemptionCheckpoint(checkpoint_dir),
    ScheduleHorizon]``."""
    return [
        RNGStateCheckpoint(),
        DivergenceGuard(),
        PreemptionCheckpoint(checkpoint_dir),
        ScheduleHorizon(),
    ]
