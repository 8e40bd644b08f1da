"""The norm's lifecycle around training, in one callback: where frozen statistics come from
(calibration or ``norm.init_from``, with conv biases folded), precise BN, distributed BN and the
freeze schedule. ``NormLabModule.configure_callbacks()`` returns it, so every ``trainer.fit`` of
a NormLabModule gets it, from train.py or plain Python alike."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import CheckpointError, NormlabError
from normlab.norm import FrozenBatchNorm2d, convert_to_frozen
from normlab.norm.schema import validate_norm_config
from normlab.norm.spec import value
from normlab.norm.stats import update_population_stats

log = logging.getLogger("normlab")


class NormLifecycle(Callback):
    """Everything the ``norm`` config asks of a run beyond its layers, at Lightning's hooks:

    - ``on_fit_start``, models with ``FrozenBatchNorm2d`` layers (``norm=frozen``): their running
      statistics are copied from ``init_from`` (weights too; conv biases the model lacks are
      folded into ``running_mean``, exactly), or else estimated over the first
      ``calibration_batches`` training batches (precise BN, ``normlab.norm.stats``). Nothing
      happens when resuming, or when the statistics came with the model's weights or a loaded
      state_dict (a NormLabModule says so with ``uncalibrated=False``).
    - ``on_train_epoch_start``, from epoch ``freeze_at_epoch`` on: every live BatchNorm becomes a
      bit-exact ``FrozenBatchNorm2d``; gamma/beta keep training (the optimizer keeps its
      parameters). Logs ``norm/frozen`` (0 before, 1 from then on) once an epoch.
    - ``on_validation_start`` during fit: with ``distribute_bn`` under DDP, the running
      statistics are averaged over the processes (timm's ``distribute_bn``; logs
      ``norm/distribute_bn_shift``, also done at every epoch end so checkpoints hold the
      average); then with ``precise_bn_batches`` > 0 they are recomputed as the population
      statistics of that many batches of the current epoch's order (Wu & Johnson 2021; logs
      ``norm/precise_bn_max_shift``).

    The training batches come from the datamodule's ``train_dataloader()`` or from the loader
    given to ``trainer.fit(model, train_dataloaders=...)``, on every process alike (same batches,
    same statistics, no communication), through the model's ``on_after_batch_transfer``. Which
    layers are frozen is the model's state: ``NormLabModule`` stores it in each checkpoint and
    freezes them again before a resumed run's weights load (``normlab.resume``).

    Args: the ``norm.*`` keys of the same names (``normlab.norm.spec``); checked as the config is.

    Raises:
        NormConfigError: a bad argument, naming its ``norm.*`` key.
        CheckpointError: ``init_from`` is not a normlab checkpoint with running statistics of
            every frozen layer (raised at fit start).

    Example::

        model = NormLabModule(num_classes=10, in_channels=1, norm={"name": "frozen"})
        L.Trainer(max_epochs=1).fit(model, train_dataloaders=train, val_dataloaders=val)
        # the model brought its NormLifecycle: statistics estimated from 20 batches
    """

    def __init__(
        self,
        calibration_batches: int = value({}, "calibration_batches"),
        init_from: str | os.PathLike | None = None,
        precise_bn_batches: int = value({}, "precise_bn_batches"),
        distribute_bn: bool = value({}, "distribute_bn"),
        freeze_at_epoch: int | None = None,
    ) -> None:
        settings = dict(
            calibration_batches=calibration_batches,
            init_from=init_from,
            precise_bn_batches=precise_bn_batches,
            distribute_bn=distribute_bn,
            freeze_at_epoch=freeze_at_epoch,
        )
        validate_norm_config({"name": "frozen", **settings}, check_files=False)
        self.calibration_batches, self.init_from = calibration_batches, init_from
        self.precise_bn_batches, self.distribute_bn = precise_bn_batches, distribute_bn
        self.freeze_at_epoch = freeze_at_epoch

    @classmethod
    def from_config(cls, norm: Mapping[str, Any]) -> NormLifecycle:
        """The lifecycle the ``norm`` config asks for (absent keys: the spec's defaults)."""
        keys = ("calibration_batches", "init_from", "precise_bn_batches", "distribute_bn")
        return cls(**{k: value(norm, k) for k in (*keys, "freeze_at_epoch")})

    # --- frozen statistics: calibration or init_from ---------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = [n for n, m in pl_module.named_modules() if isinstance(m, FrozenBatchNorm2d)]
        if not frozen:
            return
        if trainer.ckpt_path:
            message = f"frozen BatchNorm: resuming, statistics come from {trainer.ckpt_path}"
        elif self.init_from is None and getattr(pl_module, "uncalibrated", True) is False:
            # NormLabModule(weights=...) or a loaded state_dict: pretrained statistics, kept
            message = "frozen BatchNorm: statistics from the model's weights (not re-estimated)"
        elif self.init_from is not None:
            message = self._load(pl_module, frozen)
        else:
            message = self._estimate(trainer, pl_module, frozen)
        pl_module.uncalibrated = False
        if trainer.is_global_zero:
            log.info(message)

    def _load(self, pl_module: L.LightningModule, frozen: list[str]) -> str:
        own = pl_module.state_dict()
        source = init_from_state_dict(self.init_from)
        source, folded = fold_dropped_biases(source, pl_module, self.init_from)
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
        batches = _TrainingBatches(trainer, epoch=0)
        with trainer.precision_plugin.forward_context():
            moved = update_population_stats(pl_module, batches, self.calibration_batches, frozen)
        return (
            f"frozen BatchNorm: statistics of {len(moved)} layers estimated from {batches.count}"
            f" training batches (precise BN, norm.calibration_batches={self.calibration_batches});"
            f" largest change from the initial zeros/ones: {max(moved.values(), default=0):.4f}"
        )

    # --- the freeze schedule ----------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.freeze_at_epoch is None:
            return
        frozen_now = trainer.current_epoch >= self.freeze_at_epoch
        live = [n for n, m in pl_module.named_modules() if isinstance(m, _BatchNorm)]
        if frozen_now and live:
            convert_to_frozen(pl_module)
            if trainer.world_size > 1:  # ranks agree on the statistics they freeze
                with torch.no_grad():
                    for m in pl_module.modules():
                        if isinstance(m, FrozenBatchNorm2d):
                            for buf in (m.running_mean, m.running_var):
                                buf.copy_(trainer.strategy.broadcast(buf, src=0))
            if trainer.is_global_zero:
                log.info(
                    "epoch %d: BatchNorm statistics frozen (norm.freeze_at_epoch=%d): %d layers"
                    " converted to FrozenBatchNorm2d %s; gamma/beta keep training",
                    trainer.current_epoch,
                    self.freeze_at_epoch,
                    len(live),
                    live,
                )
        pl_module.log("norm/frozen", float(frozen_now), on_step=False, on_epoch=True)

    # --- distributed and precise BN, before each validation ---------------------------------

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.distribute_bn:
            # measured before precise BN, which would leave the ranks nothing to disagree on
            shift = self._average(trainer, pl_module)
            if shift is not None:
                pl_module.log("norm/distribute_bn_shift", shift, reduce_fx="max", sync_dist=True)
        if self.precise_bn_batches:
            self._precise_bn(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.distribute_bn:  # for epochs without validation: checkpoints hold the average
            self._average(trainer, pl_module)

    def _average(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor | None:
        """Average the running statistics of live BatchNorm over the processes; the largest
        change (None in a single process)."""
        if trainer.world_size < 2:
            return None
        shift = torch.zeros((), device=pl_module.device)
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm) and module.track_running_stats:
                for buffer in (module.running_mean, module.running_var):
                    before = buffer.clone()
                    averaged = trainer.strategy.reduce(buffer.clone(), reduce_op="mean")
                    buffer.copy_(averaged)
                    shift = torch.maximum(shift, (averaged - before).abs().max())
        return shift

    def _precise_bn(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        live = [
            n
            for n, m in pl_module.named_modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None
        ]
        if not live:
            return
        batches = _TrainingBatches(trainer, epoch=trainer.current_epoch)
        # validation runs under inference mode; the estimate's forward pass needs none of it
        with torch.inference_mode(False), trainer.precision_plugin.forward_context():
            shifts = update_population_stats(pl_module, batches, self.precise_bn_batches, live)
        moved = max(shifts.values(), default=0.0)
        pl_module.log("norm/precise_bn_max_shift", moved, on_step=False, on_epoch=True)
        if trainer.is_global_zero:
            log.info(
                "precise BN (epoch %d, step %d): running statistics of %d layers recomputed from"
                " %d training batches; largest change %.4g (in %s)",
                trainer.current_epoch,
                trainer.global_step,
                len(shifts),
                batches.count,
                moved,
                max(shifts, key=lambda n: shifts[n]) if shifts else None,
            )


class _TrainingBatches:
    """The scaled input images of the training split, on the model's device, in the order of
    training epoch ``epoch``; ``count`` says how many were taken. The loader is the datamodule's
    own ``train_dataloader()`` or the one given to ``fit`` (not Lightning's distributed copy), so
    every process sees the same batches."""

    def __init__(self, trainer: L.Trainer, epoch: int = 0) -> None:
        self.trainer, self.epoch, self.count = trainer, epoch, 0

    def _loader(self) -> Any:
        if self.trainer.datamodule is not None:
            return self.trainer.datamodule.train_dataloader()
        # trainer.fit(model, train_dataloaders=...): Lightning keeps the loader as the fit
        # loop's data source (it sets up trainer.train_dataloader only after on_fit_start)
        source = getattr(self.trainer.fit_loop, "_data_source", None)
        loader = source.dataloader() if source is not None and source.is_defined() else None
        if loader is None or isinstance(loader, Mapping | list | tuple):
            raise NormlabError(
                "norm statistics passes (norm.calibration_batches, norm.precise_bn_batches) need"
                f" one training DataLoader, got {type(loader).__name__}: pass"
                " trainer.fit(model, train_dataloaders=<a DataLoader>) or a LightningDataModule"
            )
        return loader

    def __iter__(self) -> Iterator[Tensor]:
        loader = self._loader()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        for batch in loader:
            batch = self.trainer.strategy.batch_to_device(batch)
            self.count += 1
            yield batch[0] if isinstance(batch, tuple | list) else batch


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


def init_from_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state_dict`` of the normlab checkpoint ``norm.init_from`` names, checked to hold
    BatchNorm running statistics (it was trained with ``norm=batchnorm`` or ``norm=frozen``).

    The config check and the fit start both ask; the file is read once while it is unchanged
    (same size and modification time).

    Raises:
        CheckpointError: the file is not a normlab checkpoint, or has no running statistics.
    """
    from normlab.utils.checkpoints import CHECKPOINT_KEY, load_checkpoint

    file = Path(path).expanduser()
    stat = file.stat() if file.is_file() else None
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size) if stat else None
    if key is not None and key == _LAST_INIT_FROM[0]:
        return _LAST_INIT_FROM[1]
    checkpoint = load_checkpoint(file, key="norm.init_from")
    state = checkpoint.get("state_dict") or {}
    if not any(k.endswith(".running_mean") for k in state):
        trained = ((checkpoint[CHECKPOINT_KEY].get("config") or {}).get("norm") or {}).get("name")
        raise CheckpointError(
            f"norm.init_from={path} holds no BatchNorm running statistics (its run used"
            f" norm={trained}); give a checkpoint of a norm=batchnorm or norm=frozen run"
            " with the same model, or leave norm.init_from=null to estimate them."
        )
    _LAST_INIT_FROM[:] = [key, state]
    return state


_LAST_INIT_FROM: list[Any] = [None, None]  # (path, mtime, size) and the state it held
