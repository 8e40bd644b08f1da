"""Save a resumable checkpoint when a job is preempted (SIGTERM) or interrupted (Ctrl-C)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("normlab")


class PreemptionCheckpoint(Callback):
    """Writes ``<dirpath>/last.ckpt`` when training is stopped by SIGTERM or Ctrl-C (SIGINT).

    Lightning's signal connector turns SIGTERM into a ``SIGTERMException`` raised at the next batch
    boundary, and Ctrl-C into a graceful shutdown; both call ``on_exception`` first. Unlike
    Lightning's ``OnExceptionCheckpoint`` this saves only for those two interruptions during
    ``fit`` (a crash or a diverged loss must not overwrite the last good checkpoint) and keeps the
    file, named ``last.ckpt`` so that ``ckpt_path=last`` resumes it; and it is not one, because
    with an ``OnExceptionCheckpoint`` present Lightning turns ``fit(ckpt_path=None)`` into
    ``"last"``, silently resuming whatever a reused run dir holds. It then prints on stderr how to
    resume.

    Args:
        dirpath: the checkpoint directory of the run (``<run dir>/checkpoints``).
        filename: file name without ``.ckpt`` (default ``last``).

    Raises:
        ValueError: ``filename`` is empty.

    Example::

        trainer = Trainer(callbacks=[PreemptionCheckpoint("logs/train/runs/x/checkpoints")])
        trainer.fit(model)  # kill -TERM <pid> -> checkpoints/last.ckpt, exit status 143
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        if not filename:
            raise ValueError("PreemptionCheckpoint(filename=''): give a file name, e.g. 'last'")
        self.ckpt_path = str(Path(dirpath) / f"{filename}.ckpt")
        self.saved: str | None = None

    def on_exception(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        exception = args[1] if len(args) > 1 else kwargs.get("exception")
        if isinstance(exception, SIGTERMException):
            what = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            what = "Ctrl-C (SIGINT)"
        else:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # full state: resumable
        self.saved = self.ckpt_path
        command = ["python", Path(sys.argv[0]).name]
        command += [shlex.quote(a) for a in sys.argv[1:] if not a.startswith("ckpt_path=")]
        self._report(
            f"normlab: interrupted by {what} at epoch {trainer.current_epoch}, global step"
            f" {trainer.global_step}; saved a resumable checkpoint to {self.ckpt_path}. Resume"
            " with:"
            f" {' '.join(command)} ckpt_path={self.ckpt_path}"
            " (or ckpt_path=last: the newest last.ckpt of this task_name)"
        )

    @rank_zero_only
    def _report(self, message: str) -> None:
        log.warning(message)
        print(message, file=sys.stderr, flush=True)
