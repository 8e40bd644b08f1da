"""The LightningModule: any net (``model.net``, a ``_target_`` config) whose normalization is the
``norm`` config, trained with cross-entropy, measured with torchmetrics, optimized by
``model.optimizer`` / ``model.scheduler`` (``_target_`` configs with ``_partial_: true``). Its
hyperparameters are these config dicts (plain data), so every checkpoint loads with
``weights_only=True`` and ``eval.py`` rebuilds the model from them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from normlab.errors import ConfigError
from normlab.models.adapters import (
    BUILT,
    build_net,
    classes_of,
    describe_net,
    input_channels_of,
    load_weights,
)
from normlab.models.defaults import MODULE_TARGET, default
from normlab.norm.layers import FrozenBatchNorm2d, param_groups
from normlab.norm.registry import convert_norm
from normlab.utils.checkpoint_fit import data_classes
from normlab.utils.checkpoints import CHECKPOINT_KEY

log = logging.getLogger("normlab")
# hyperparameters that are not model.* keys of a run config (the data's counts, the norm group)
NOT_MODEL_KEYS = ("num_classes", "in_channels", "norm")
DEFAULT = "default"  # scheduler's default: the CLI's (None means a constant learning rate)
REBUILD = (
    "the checkpoint's net was given to NormLabModule as a built nn.Module, which normlab cannot"
    " rebuild; train with net={'_target_': 'your_package.YourNet', **its arguments} (a config"
    " normlab builds, so eval.py and resuming rebuild it), or test in Python with"
    " trainer.test(model, dataloaders=...)"
)


def _plain(value: Any) -> Any:
    """A config as plain data (an OmegaConf node from Hydra becomes dicts and lists)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _with_default(name: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """A mapping with ``_target_`` replaces the default; one without overrides its values."""
    given = dict(_plain(given) or {})
    return given if "_target_" in given else {**default(name), **given}


def _loaded(module: NormLabModule, incompatible_keys: Any) -> None:
    """A loaded state_dict (a checkpoint, init_from) holds the statistics of frozen layers."""
    module.uncalibrated = False


class NormLabModule(L.LightningModule):
    """Image classifier around any net, with its normalization switched by ``norm``.

    The net is built from ``net`` (it receives ``num_classes``, ``in_channels``, ``norm_layer``
    and ``conv_bias`` when its signature names them), ``weights`` are loaded into it, then every
    norm layer is converted to ``norm`` (``normlab.norm.convert_norm``). Defaults are those of
    ``normlab.models.defaults``, the same as the command line's ``model=cnn``.

    Args:
        num_classes: number of classes (from the data); with a built ``net``, None reads it from
            the net's last ``nn.Linear``.
        in_channels: input channels (from the data); with a built ``net``, None reads it from the
            net's first convolution.
        norm: the ``norm`` config group as a dict, e.g. ``{"name": "batchnorm", "momentum": 0.1}``
            (keys left out take ``normlab.norm.spec``'s defaults); None: ``{"name": "batchnorm"}``.
        net: ``{"_target_": "pkg.Class", **kwargs}``; without ``_target_``: overrides of the default
            ConvNet (``{"widths": [8, 16]}``); None: the default ConvNet; or a built ``nn.Module``
            (``torchvision.models.resnet18(num_classes=10)``), whose BatchNorm layers are
            converted in place. The hyperparameters stay plain data: a torchvision net is
            recorded by its architecture name, so checkpoints rebuild it (eval.py, resuming); any
            other built net by its class name only, and eval.py refuses its checkpoints, saying
            to give ``net`` as a ``_target_`` config instead.
        arch: architecture name passed to the net as ``arch`` (``model=torchvision|timm``).
        activation: the net's activation (``relu``, ``sigmoid``, ...), passed to it as
            ``activation``; None keeps the net's own (the ConvNet's ``net["activation"]``).
        weights: a local state_dict file (.pth/.safetensors) loaded before the norm conversion, so
            ``norm=frozen`` keeps its statistics; the classifier head (and the first conv for
            other input channels) are re-initialised when the file's do not fit.
        weights_strict: False loads a file that fits only partly (missing or unused tensors in
            the body), re-initialising the rest; True (default) refuses it, naming the tensors.
        optimizer: ``{"_target_": "torch.optim.SGD", "lr": ..., ...}`` (a partial, given the named
            parameter groups ``"weights"`` and ``"norm"``); ``norm_weight_decay`` is the norm
            group's weight decay. Without ``_target_``: overrides of the default AdamW.
        scheduler: a partial epoch-wise scheduler config; ``T_max`` of ``CosineAnnealingLR``
            defaults to ``trainer.max_epochs``; None: constant learning rate.
        channels_last: keep conv weights and inputs in channels-last (NHWC) memory, the layout
            GPU tensor cores prefer; the results are the same.
        compile: run the net through ``torch.compile``; parameters and checkpoint keys stay those
            of the eager module.

    Raises:
        ConfigError: a bad net, arch or weights file; NormConfigError: a norm that does not fit.
        ConfigError at validation/test time: ``norm=frozen`` statistics that nothing set (the
            model was never fit, no weights, no loaded checkpoint).

    Example::

        net = torchvision.models.resnet18(num_classes=10)
        model = NormLabModule(net=net, norm={"name": "frozen"})  # recorded as arch resnet18
        model = NormLabModule(num_classes=10, in_channels=1, norm={"name": "batchnorm"})
        resnet = NormLabModule(10, 1, {"name": "frozen"}, net={"_target_":
            "normlab.models.torchvision_net"}, arch="resnet18", weights="resnet18.pth")
    """

    def __init__(
        self,
        num_classes: int | None = None,
        in_channels: int | None = None,
        norm: Mapping[str, Any] | None = None,
        net: Mapping[str, Any] | torch.nn.Module | None = None,
        arch: str | None = None,
        activation: str | None = None,
        weights: str | None = None,
        weights_strict: bool = True,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None | str = DEFAULT,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        built = net if isinstance(net, torch.nn.Module) else None
        if built is not None:  # hyperparameters stay plain data: what rebuilds it, or its class
            num_classes = num_classes or classes_of(built)
            in_channels = in_channels or input_channels_of(built)
            net = describe_net(built, num_classes, in_channels)
            for key, given in (("arch", arch), ("activation", activation)):
                if given is not None:
                    raise ConfigError(key, given, "the net is built already; leave it None")
        else:
            net = _with_default("net", net)
            if BUILT in net:
                raise ConfigError("model.net", net[BUILT], REBUILD)
            for key, given in (("num_classes", num_classes), ("in_channels", in_channels)):
                if given is None:
                    raise ConfigError(key, None, "give the data's count (an integer)")
        if arch is not None:
            if net.get("arch", arch) != arch:
                raise ConfigError("model.arch", arch, f"model.net.arch is {net['arch']!r} already")
            net["arch"] = arch
        if activation is not None:  # model.activation: the command line's key for it
            net["activation"] = activation
        optimizer = _with_default("optimizer", optimizer)
        scheduler = default("scheduler") if scheduler == DEFAULT else scheduler
        scheduler = dict(_plain(scheduler)) if scheduler else None
        norm = dict(_plain(norm) or {"name": "batchnorm"})
        # after the normalization above: the hyperparameters are the complete plain-data configs
        self.save_hyperparameters()
        if built is None:
            built = build_net(net, num_classes, in_channels, norm)
        if weights:
            frozen = norm.get("name") == "frozen"
            load_weights(built, weights, strict=weights_strict, statistics_needed=frozen)
        self.net = convert_norm(built, norm)
        # frozen statistics nobody has set yet: NormLifecycle (at fit start), weights or a loaded
        # state_dict set them before the model is trained or evaluated
        self.uncalibrated = not weights and any(
            isinstance(m, FrozenBatchNorm2d) for m in self.net.modules()
        )
        self.register_load_state_dict_post_hook(_loaded)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.accuracy = torch.nn.ModuleDict(
            {
                # micro: the fraction of correct predictions (torchmetrics defaults to macro)
                stage: MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train_", "val_", "test_")
            }
        )
        self.mean_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val_", "test_")})
        # the composed run config, stored in checkpoints so eval.py can rebuild data and model
        self.run_config: dict[str, Any] | None = None

    def _refuse_uncalibrated(self) -> None:
        if self.uncalibrated:
            raise ConfigError(
                "norm.name",
                "frozen",
                "the FrozenBatchNorm2d layers hold statistics nothing has set (zeros and ones):"
                " train the model first (trainer.fit estimates them over norm.calibration_batches"
                " training batches, or copies them from norm.init_from), pass weights=<a"
                " state_dict file with BatchNorm statistics>, or load a checkpoint",
            )

    def configure_callbacks(self) -> list[Any]:
        """The callbacks that are part of this model's semantics, which Lightning adds to every
        ``trainer.fit`` / ``test`` of it (replacing a Trainer's callback of the same type):
        ``NormLifecycle`` (the ``norm`` config's calibration, init_from, precise BN, distributed
        BN and freeze schedule), ``ScheduleHorizon`` (a resumed run follows the current
        ``trainer.max_epochs``, which ``T_max`` defaults to) and ``DivergenceGuard`` (a NaN loss
        stops training before it reaches the weights). Outside train.py (no run config: plain
        Python) also ``BatchNormStats`` with its defaults, unless the Trainer has one: the
        ``norm/`` TensorBoard tags; train.py's ``callbacks`` config decides that itself.
        Imported here, not at module level: the model does not depend on the callbacks."""
        from normlab.callbacks.batch_norm_stats import BatchNormStats
        from normlab.callbacks.divergence_guard import DivergenceGuard
        from normlab.callbacks.norm_lifecycle import NormLifecycle
        from normlab.callbacks.schedule_horizon import ScheduleHorizon

        own = [NormLifecycle.from_config(self.hparams.norm), ScheduleHorizon(), DivergenceGuard()]
        present = self._trainer.callbacks if self._trainer is not None else []
        if self.run_config is None and not any(isinstance(c, BatchNormStats) for c in present):
            own.append(BatchNormStats())
        return own

    def on_fit_start(self) -> None:
        # NormLifecycle (configure_callbacks; callbacks' on_fit_start runs first) sets them
        self._refuse_uncalibrated()

    def on_validation_start(self) -> None:
        self._refuse_uncalibrated()

    def on_test_start(self) -> None:
        self._refuse_uncalibrated()

    def forward(self, x: Tensor) -> Tensor:
        return self._backbone()(x.contiguous(memory_format=self.memory_format))

    def _backbone(self) -> torch.nn.Module:
        """``self.net``, or its compiled wrapper. The wrapper lives outside ``_modules`` (so
        ``named_modules()`` and state_dict keys stay those of ``self.net``) and is rebuilt when
        ``self.net`` is replaced (e.g. by a copy of this module)."""
        if not self.hparams.get("compile") or self._has_hooks():
            return self.net  # compiled code would skip hooks added after compilation
        compiled = self.__dict__.get("_compiled_net")
        if compiled is None or compiled._orig_mod is not self.net:
            compiled = torch.compile(self.net)
            self.__dict__["_compiled_net"] = compiled
        return compiled

    def _has_hooks(self) -> bool:
        """Whether a callback (e.g. the saturation monitor) has hooked a layer of the backbone."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.net.modules())

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled_net", None)  # compiled code is not copied or pickled: rebuilt lazily
        return state

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        # labels are class indices, or soft targets (B, classes) from MixUp/CutMix/label smoothing
        loss = F.cross_entropy(logits, labels)
        # update(), not forward(): forward would also compute the batch's accuracy every step
        self.accuracy["train_"].update(logits, labels if labels.ndim == 1 else labels.argmax(1))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # logged once an epoch: each self.log of a Metric object moves it to the device (~1 ms)
        self.log("train/acc", self.accuracy["train_"])

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.accuracy[f"{stage}_"].update(logits, labels)
        self.mean_loss[f"{stage}_"].update(F.cross_entropy(logits, labels), weight=labels.numel())
        # metric objects: Lightning computes them once per epoch, reduced over all processes
        self.log(f"{stage}/acc", self.accuracy[f"{stage}_"], prog_bar=True)
        self.log(f"{stage}/loss", self.mean_loss[f"{stage}_"])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        opt = dict(self.hparams.optimizer)
        norm_weight_decay = opt.pop("norm_weight_decay", None) or 0.0
        groups = param_groups(self, opt.get("weight_decay") or 0.0, norm_weight_decay)
        optimizer = instantiate({**opt, "_partial_": True}, _convert_="all")(groups)
        if not self.hparams.scheduler:
            return optimizer
        sched = {k: v for k, v in self.hparams.scheduler.items() if v is not None}
        if (
            sched["_target_"].endswith(("CosineAnnealingLR", "WarmupCosineLR"))
            and "T_max" not in sched
        ):
            sched["T_max"] = max(1, self.trainer.max_epochs)  # the horizon is the run's length
        scheduler = instantiate({**sched, "_partial_": True}, _convert_="all")(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from normlab.resume import save_frozen_layers

        entry = {
            "format": 1,
            "config": self.run_config or self._python_run_config(),
            # the labels the outputs mean: eval.py refuses data with other classes
            "num_classes": self.hparams.num_classes,
            "classes": data_classes(getattr(self._trainer, "datamodule", None)),
        }
        save_frozen_layers(self, entry)
        checkpoint[CHECKPOINT_KEY] = entry

    def _python_run_config(self) -> dict[str, Any]:
        """The run config of a model trained from Python (train.py sets ``run_config``): model
        and norm from the hyperparameters, the data when it is normlab's DataModule (else None:
        eval.py then asks for ``+data=<name>``). eval.py rebuilds the model from it."""
        model = {k: v for k, v in self.hparams.items() if k not in NOT_MODEL_KEYS}
        kind = type(self)
        model["_target_"] = (
            MODULE_TARGET if kind is NormLabModule else f"{kind.__module__}.{kind.__qualname__}"
        )
        dm = self._trainer.datamodule if self._trainer is not None else None
        data = None
        if type(dm).__module__.startswith("normlab.data"):  # its hparams rebuild it
            data = {k: v for k, v in dm.hparams.items() if k != "seed"}
            data["_target_"] = f"normlab.data.{type(dm).__qualname__}"
        return {"model": model, "norm": dict(self.hparams.norm), "data": data}

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, *args: Any, trusted_targets: Sequence[str] = (), **kwargs: Any
    ) -> NormLabModule:
        """Lightning's ``load_from_checkpoint``, after the checkpoint's saved ``net``,
        ``optimizer`` and ``scheduler`` targets pass normlab's gate: a checkpoint is a file anyone
        can write, so only normlab's builders, torch optimizers/schedulers and what
        ``trusted_targets`` names (your package, e.g. ``["my_project"]``) are built from it."""
        from normlab.utils.targets import check_saved_hyperparameters

        check_saved_hyperparameters(checkpoint_path, kwargs, trusted_targets)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from normlab.resume import restore_frozen_layers

        entry = checkpoint.get(CHECKPOINT_KEY) or {}
        # a resumed run keeps its own config (its checkpoints describe the run that wrote them)
        self.run_config = self.run_config or entry.get("config")
        restore_frozen_layers(self, entry)  # before the weights load
