"""Learning-rate schedules that torch spells in several objects, as one class a config can name."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR


class WarmupCosineLR(SequentialLR):
    """Linear warm-up, then cosine decay: ``LinearLR(start_factor, total_iters=warmup_epochs)``
    followed by ``CosineAnnealingLR(T_max - warmup_epochs, eta_min)`` through ``SequentialLR``,
    stepped once an epoch (Goyal et al. 2017's warm-up for large learning rates; the cosine of
    Loshchilov & Hutter 2017).

    Args:
        optimizer: the optimizer whose learning rate it sets.
        T_max: total epochs, warm-up included; ``NormLabModule`` fills in ``trainer.max_epochs``
            when it is not given, and a resumed run follows the new horizon (``ScheduleHorizon``).
        warmup_epochs: epochs of linear warm-up from ``start_factor * lr`` to ``lr``; 0: none.
        start_factor: the first epoch's fraction of the learning rate.
        eta_min: the learning rate the cosine ends at.

    Raises:
        ValueError: ``warmup_epochs`` negative, or not below ``T_max``.

    Example::

        scheduler = WarmupCosineLR(torch.optim.SGD(params, lr=0.1), T_max=200, warmup_epochs=5)
        # model.scheduler: {_target_: normlab.models.WarmupCosineLR, warmup_epochs: 5}
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_max: int,  # noqa: N803 (torch's name for the horizon, as CosineAnnealingLR's)
        warmup_epochs: int = 5,
        start_factor: float = 0.1,
        eta_min: float = 0.0,
    ) -> None:
        if not 0 <= warmup_epochs < T_max:
            raise ValueError(
                f"warmup_epochs={warmup_epochs} must be >= 0 and below T_max={T_max} (the"
                " epochs of the run): lower model.scheduler.warmup_epochs or train longer"
            )
        self.T_max, self.warmup_epochs = T_max, warmup_epochs
        self.start_factor, self.eta_min = start_factor, eta_min
        cosine = CosineAnnealingLR(optimizer, T_max - warmup_epochs, eta_min)
        if warmup_epochs == 0:
            super().__init__(optimizer, [cosine], milestones=[])
            return
        warmup = LinearLR(optimizer, start_factor, 1.0, total_iters=warmup_epochs)
        super().__init__(optimizer, [warmup, cosine], milestones=[warmup_epochs])
