"""A resumed run follows the learning-rate schedule of the command that resumed it."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.optim.lr_scheduler import ReduceLROnPlateau

log = logging.getLogger("normlab")


def _differences(restored: dict[str, Any], fresh: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The scheduler settings that differ (``T_max``, ``total_iters``, ...), ignoring the
    bookkeeping that stepping produces."""
    skip = {"_last_lr", "_step_count", "_get_lr_called_within_step", "last_epoch"}
    return {
        k: (restored.get(k), v)
        for k, v in fresh.items()
        if k not in skip and not callable(v) and restored.get(k) != v
    }


class ScheduleHorizon(Callback):
    """On resume, rebuilds each learning-rate scheduler as the *current* command configures it
    and moves it to the checkpoint's position, so the schedule's horizon is the current
    ``trainer.max_epochs`` (or step budget), not the one of the run that wrote the checkpoint.

    Without it, Lightning restores the scheduler's whole state: a cosine schedule of a finished
    1-epoch run (``T_max=1``) resumed with ``trainer.max_epochs=2`` stays at its end, and the
    second epoch trains with a learning rate of 0. With it, a 1-epoch run extended to 2 epochs
    equals an uninterrupted 2-epoch run. Schedulers whose settings did not change are left as
    restored; ``ReduceLROnPlateau`` (no horizon, a history of metrics) is never touched.

    Logs one info line per scheduler whose settings changed, naming them (``T_max: 1 -> 2``).

    Example::

        trainer = Trainer(max_epochs=2, callbacks=[ScheduleHorizon()])
        trainer.fit(model, datamodule=dm, ckpt_path="last.ckpt")  # a 1-epoch run's checkpoint
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path or not trainer.lr_scheduler_configs:
            return
        from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

        _, fresh_configs = _init_optimizers_and_lr_schedulers(pl_module)
        for restored, fresh in zip(trainer.lr_scheduler_configs, fresh_configs, strict=False):
            self._realign(trainer, restored.scheduler, fresh.scheduler, restored.interval)

    @staticmethod
    def _realign(trainer: L.Trainer, restored: Any, fresh: Any, interval: str) -> None:
        if isinstance(restored, ReduceLROnPlateau) or type(restored) is not type(fresh):
            return
        position = restored.last_epoch
        with warnings.catch_warnings():  # stepping a scheduler whose optimizer never stepped
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(position - fresh.last_epoch):
                fresh.step()
        changed = _differences(restored.state_dict(), fresh.state_dict())
        if not changed:
            return
        restored.load_state_dict(fresh.state_dict())
        for group, fresh_group in zip(
            restored.optimizer.param_groups, fresh.optimizer.param_groups, strict=True
        ):
            group["lr"] = fresh_group["lr"]
        if trainer.is_global_zero:
            settings = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))
            log.info(
                "resume: the learning-rate schedule %s follows this command (%s); after %d %s(s)"
                " the learning rate is %s",
                type(restored).__name__,
                settings,
                position,
                interval,
                [round(g["lr"], 8) for g in restored.optimizer.param_groups],
            )
