"""Stop training at the first NaN or infinite loss, before it reaches the weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from normlab.errors import DivergenceError


class DivergenceGuard(Callback):
    """Raises :class:`~normlab.errors.DivergenceError` when the training loss is NaN or infinite.

    The check runs in ``on_before_backward``: the bad step is never applied to the weights, and no
    checkpoint is written after it, so ``checkpoints/last.ckpt`` (if an epoch finished) still holds
    the last good weights. The message names the global step, epoch and batch, the loss value, the
    likely causes (learning rate, missing normalization, unscaled inputs) and that checkpoint.
    Under DDP the ranks agree on the decision (one collective per step), so none is left waiting.

    Logs nothing. Args:
        check_every_n_steps: check every n-th training step (>= 1; 1 = every step).

    Raises:
        ValueError: ``check_every_n_steps`` is not a positive integer.
        DivergenceError: during training, at the first non-finite loss.

    Example::

        trainer = Trainer(callbacks=[DivergenceGuard()])
        trainer.fit(model)  # model.optimizer.lr=10 norm=none -> "training diverged at step ..."
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int):
            raise ValueError(f"check_every_n_steps={check_every_n_steps!r}: expected an integer")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps}: must be at least 1")
        self.check_every_n_steps = check_every_n_steps
        self._batch_idx = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if trainer.global_step % self.check_every_n_steps:
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise DivergenceError(self.message(trainer, pl_module, loss))

    def message(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> str:
        """The one-paragraph explanation raised with the error."""
        value = float(loss.detach().float().mean()) if loss.numel() else math.nan
        hp: dict[str, Any] = dict(getattr(pl_module, "hparams", {}) or {})
        lr = (hp.get("optimizer") or {}).get("lr")
        norm = (hp.get("norm") or {}).get("name")
        data = (getattr(pl_module, "run_config", None) or {}).get("data") or {}
        causes = [
            f"a learning rate too high for this model (model.optimizer.lr={lr}: try 10x smaller,"
            " or trainer.gradient_clip_val=1.0)"
        ]
        if norm == "none":
            causes.append(
                "no normalization (norm=none): without BatchNorm nothing keeps activations and"
                " gradients in range, so try norm=batchnorm or a smaller learning rate"
            )
        else:
            causes.append(
                f"missing normalization (this run has norm={norm}, so rather suspect NaN or inf"
                " in the input data)"
            )
        if data.get("scaling") in ("none", "custom"):
            causes.append(f"badly scaled inputs (data.scaling={data.get('scaling')})")
        saved = [
            Path(p)
            for cb in trainer.checkpoint_callbacks
            for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""))
            if p and Path(p).is_file()
        ]
        good = max(saved, key=lambda p: p.stat().st_mtime) if saved else None
        kept = (
            f"The last good checkpoint, {good}, is unchanged: evaluate it with"
            f" `python eval.py ckpt_path={good}`."
            if good
            else "No checkpoint had been saved yet (the first epoch did not finish)."
        )
        return (
            f"training diverged: the training loss is {value} at global step {trainer.global_step}"
            f" (epoch {trainer.current_epoch}, batch {self._batch_idx}); training stopped before"
            f" this step changed the weights. Likely causes: {'; '.join(causes)}. {kept}"
        )
