"""Where frozen BatchNorm statistics come from, before the first training step."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from normlab.callbacks._batches import TrainingBatches
from normlab.callbacks.norm_lifecycle import init_from_state_dict
from normlab.errors import CheckpointError
from normlab.norm import FrozenBatchNorm2d
from normlab.norm.stats import apply_population_stats, estimate_population_stats

log = logging.getLogger("normlab")


class FrozenBNCalibration(Callback):
    """Sets the running statistics of every ``FrozenBatchNorm2d`` once, in ``on_fit_start``:
    after the model is on its device, before the first training step.

    - ``init_from`` given: weights and statistics are copied from that checkpoint (fine-tuning a
      BatchNorm-trained model with frozen statistics). Tensors whose shapes differ (e.g. a
      classifier for another number of classes) keep their initial values; every frozen layer must
      find its statistics in the checkpoint.
    - otherwise: the precise-BN population estimate (``normlab.norm.stats``) over the first
      ``num_batches`` training batches, on every process alike (same batches, same result).
    - resuming (``trainer.fit(ckpt_path=...)``), or a model whose statistics came with its
      weights (``NormLabModule(weights=...)``, ``model.weights``: the detection-backbone recipe):
      nothing; those statistics are never re-estimated.

    Logs one info line saying where the statistics came from (and how far they moved).

    Args:
        num_batches: training batches to estimate the statistics from (>= 1).
        init_from: path of a normlab checkpoint holding BatchNorm statistics, or None.

    Raises:
        ValueError: ``num_batches`` < 1 and no ``init_from``.
        CheckpointError: ``init_from`` is not a normlab checkpoint with running statistics
            (checked here, before training), or lacks statistics of a layer of the model.

    Example::

        model = NormLabModule(num_classes=10, in_channels=1, norm={"name": "frozen"})
        trainer = Trainer(callbacks=[FrozenBNCalibration(num_batches=20)])
        trainer.fit(model, datamodule=NormLabDataModule())
    """

    def __init__(self, num_batches: int = 20, init_from: str | None = None) -> None:
        if init_from is None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
        ):
            raise ValueError(f"norm.calibration_batches={num_batches!r}: must be an integer >= 1")
        self.num_batches, self.init_from = num_batches, init_from
        self._source = init_from_state_dict(init_from) if init_from else None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = [n for n, m in pl_module.named_modules() if isinstance(m, FrozenBatchNorm2d)]
        if not frozen:
            return
        if trainer.ckpt_path:
            message = f"frozen BatchNorm: resuming, statistics come from {trainer.ckpt_path}"
        elif self._source is None and getattr(pl_module, "uncalibrated", True) is False:
            # NormLabModule(weights=...) or a loaded state_dict: pretrained statistics, kept
            message = "frozen BatchNorm: statistics from the model's weights (not re-estimated)"
        elif self._source is not None:
            message = self._load(pl_module, frozen)
        else:
            message = self._estimate(trainer, pl_module, frozen)
        if trainer.is_global_zero:
            log.info(message)

    def _load(self, pl_module: L.LightningModule, frozen: list[str]) -> str:
        own = pl_module.state_dict()
        source, folded = fold_dropped_biases(self._source, pl_module, self.init_from)
        matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        missing = [
            n for n in frozen if not {f"{n}.running_mean", f"{n}.running_var"} <= set(matching)
        ]
        if missing:
            raise CheckpointError(
                f"norm.init_from={self.init_from} has no running statistics of the same shape for"
                f" layer(s) {missing}: it was trained with another architecture; give a checkpoint"
                " of the same model (model.net), or norm.init_from=null."
            )
        pl_module.load_state_dict(matching, strict=False)  # copies in place: optimizer unaffected
        skipped = sorted(set(own) - set(matching))
        return (
            f"frozen BatchNorm: statistics and weights ({len(matching)} tensors) from"
            f" norm.init_from={self.init_from}"
            + (f"; conv biases folded into running_mean: {folded}" if folded else "")
            + (f"; kept initial values of {skipped}" if skipped else "")
        )

    def _estimate(self, trainer: L.Trainer, pl_module: L.LightningModule, frozen: list[str]) -> str:
        batches = TrainingBatches(trainer, epoch=0)
        with trainer.precision_plugin.forward_context():
            stats = estimate_population_stats(pl_module, batches, self.num_batches)
        moved = apply_population_stats(pl_module, {n: stats[n] for n in frozen if n in stats})
        return (
            f"frozen BatchNorm: statistics of {len(stats)} layers estimated from {batches.count}"
            f" training batches (precise BN, norm.calibration_batches={self.num_batches});"
            f" largest change from the initial zeros/ones: {moved:.4f}"
        )


def fold_dropped_biases(
    source: dict[str, Tensor], model: nn.Module, init_from: str | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """Fold the biases of ``source``'s convolutions into the running statistics of the frozen
    layers they feed, where ``model``'s convolution has no bias (a run with ``norm.affine=false``
    keeps conv biases; a ``norm=frozen`` model has none, since its beta takes their place).

    Exact: a frozen layer computes ``(y - running_mean) * scale + shift`` on ``y = conv(x) + b``,
    the same as on ``conv(x)`` with ``running_mean - b``. The layer fed is the next
    ``FrozenBatchNorm2d`` after the convolution in ``named_modules()`` order with as many
    channels. Returns the new state dict (``source`` is not changed) and the folded keys.

    Raises:
        CheckpointError: a dropped bias feeds no frozen layer it could be folded into.
    """
    modules = list(model.named_modules())
    by_name = dict(modules)
    index = {name: i for i, (name, _) in enumerate(modules)}
    out, folded = dict(source), []
    for key, bias in source.items():
        conv_name = key.removesuffix(".bias")
        conv = by_name.get(conv_name) if key.endswith(".bias") else None
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.bias is not None:
            continue
        consumer = next(
            (
                name
                for name, m in modules[index[conv_name] + 1 :]
                if isinstance(m, FrozenBatchNorm2d) and m.num_features == bias.numel()
            ),
            None,
        )
        if consumer is None or f"{consumer}.running_mean" not in source:
            raise CheckpointError(
                f"norm.init_from={init_from} has a bias for {conv_name}, which this model's"
                " convolution lacks, and no frozen layer after it to fold the bias into; give a"
                " checkpoint of a run with norm.affine=true, or norm.init_from=null."
            )
        out[f"{consumer}.running_mean"] = out[f"{consumer}.running_mean"] - bias.to(
            out[f"{consumer}.running_mean"]
        )
        folded.append(key)
    return out, folded
