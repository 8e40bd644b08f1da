"""The training and evaluation recipes, top to bottom: ``train(cfg)`` and ``evaluate(cfg)``.

Both receive a composed, validated Hydra config (see ``configs/``), build data, model, callbacks,
loggers and Trainer from it, run, and write ``results.json`` into the run dir.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins import LayerSync
from omegaconf import DictConfig, OmegaConf

from normlab.config import eval_data_config, trainer_error
from normlab.distributed import check_batchnorm_setup, job_scope, prepare_child_processes
from normlab.errors import ConfigError, NormlabError
from normlab.models.first_batch import check_first_batch, check_num_classes
from normlab.norm.sync import SyncBatchNormKeepingActivations
from normlab.utils.atomic_checkpoint_io import AtomicCheckpointIO
from normlab.utils.checkpoint_fit import check_classes, check_resume_fits
from normlab.utils.checkpoints import load_checkpoint
from normlab.utils.results import final_metrics, log_hparams, write_results
from normlab.utils.targets import check_targets, trusted_targets

log = logging.getLogger("normlab")


def _print_lightning_once() -> None:
    """``import lightning`` gives the ``lightning`` logger a console handler of its own, and its
    messages also reach the root logger's handlers that Hydra set up: every line would be printed
    twice. With root handlers present, Hydra's print each line once and also write the run's log
    file."""
    if logging.getLogger().handlers:
        lightning_log = logging.getLogger("lightning")
        for handler in list(lightning_log.handlers):
            lightning_log.removeHandler(handler)


_print_lightning_once()


def _is_not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")


def _quiet_library_noise() -> None:
    """Drop what a user cannot act on: Lightning's own use of a torch API torch deprecates
    (twice a run), its advertising tips (litlogger, litmodels), and on every resume its note
    that the new run dir does not inherit the old one's top-k checkpoint list (a resume always
    writes a new run dir here, and its log says which checkpoint it continues)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_is_not_a_tip)


_quiet_library_noise()


@contextmanager
def _user_errors() -> Iterator[None]:
    """A component rejecting its config (a callback's argument, a model's arch or norm) is a
    user error: raise the NormlabError itself, not Hydra's wrapper around it."""
    try:
        yield
    except InstantiationException as err:
        if isinstance(err.__cause__, NormlabError):
            raise err.__cause__ from None
        raise


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group of ``_target_`` configs (callbacks, loggers)."""
    if not group:
        return []
    with _user_errors():
        return [instantiate(c, _convert_="all") for c in group.values() if c and "_target_" in c]


def _without_unused_augment(data: Mapping[str, Any], target: Any) -> Mapping[str, Any]:
    """The augment group writes ``data.augment``; a user's DataModule that does not take it gets
    no such argument while augmentation is off, and a refusal naming the fix when it is on."""
    from normlab.models.adapters import takes

    augment = data.get("augment")
    if augment is None or takes(target, "augment"):
        return data
    on = {k: v for k, v in dict(augment).items() if k != "resized_crop_ratio" and v}
    if on:
        raise ConfigError(
            "augment",
            on,
            f"{data['_target_']} takes no augment argument, so normlab cannot augment its batches;"
            " augment inside your DataModule, or use augment=none",
        )
    return {k: v for k, v in data.items() if k != "augment"}


def build_datamodule(
    data: Mapping[str, Any],
    seed: int,
    trusted: Sequence[str] = (),
    checkpoint: str | None = None,
) -> L.LightningDataModule:
    """Instantiate the ``data`` config: normlab's DataModule or a user's LightningDataModule
    (which needs ``num_classes`` and ``num_channels``; it receives ``seed`` if it takes one).
    Its targets pass :func:`normlab.utils.targets.check_targets` first (``trusted``: the user's
    ``trusted_targets``; ``checkpoint``: where the config was read from)."""
    from normlab.models.adapters import takes

    check_targets(data, "data", trusted, checkpoint)
    target = get_object(data["_target_"])
    data = _without_unused_augment(data, target)
    extra = {"seed": seed} if takes(target, "seed") else {}
    with _user_errors():
        datamodule = instantiate(data, **extra, _convert_="all")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # download (data.download=true) before num_classes below reads the data; DDP ranks > 0
        # start later, from trainer.fit, when the files are there
        datamodule.prepare_data()
    for attr in ("num_classes", "num_channels"):
        if not isinstance(getattr(datamodule, attr, None), int):
            raise ConfigError(
                "data._target_",
                data["_target_"],
                f"{type(datamodule).__name__} has no integer attribute {attr!r}, which normlab"
                " builds the model from; give the class num_classes and num_channels (see"
                " docs/custom_models.md, 'Add your own data')",
            )
    return datamodule


def build_model(
    model: Mapping[str, Any],
    norm: Mapping[str, Any],
    datamodule: Any,
    trusted: Sequence[str] = (),
    checkpoint: str | None = None,
) -> L.LightningModule:
    """Instantiate the ``model`` config (any LightningModule ``_target_``; NormLabModule by
    default) with the ``norm`` config and the data's ``num_classes`` / ``num_channels``. Its
    nested configs (net, optimizer, scheduler) arrive as plain dicts, the module's
    hyperparameters, so checkpoints stay plain data. Its targets, nested ones included, pass
    :func:`normlab.utils.targets.check_targets` first, as in :func:`build_datamodule`."""
    model = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else model
    check_targets(model, "model", trusted, checkpoint)
    norm = OmegaConf.to_container(norm, resolve=True) if isinstance(norm, DictConfig) else norm
    with _user_errors():
        return instantiate(
            model,
            norm=norm,
            num_classes=datamodule.num_classes,
            in_channels=datamodule.num_channels,
            _recursive_=False,
            _convert_="all",
        )


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[Any] = ()) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the callbacks of ``cfg.callbacks`` (then
    ``extra_callbacks``; the model adds its own, ``configure_callbacks``), the loggers of
    ``cfg.logger`` and checkpoints written atomically. train.py, eval.py and scripts/bench.py
    build theirs here."""
    callbacks = [*_instantiate_all(cfg.get("callbacks")), *extra_callbacks]
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    try:
        # a user's +trainer.plugins=[...] are kept; checkpoints are written beside their target,
        # atomically (a kill or a full disk keeps the old file), unless a plugin of the user's
        # already does the checkpoint I/O
        plugins = instantiate(trainer.pop("plugins", None) or [], _convert_="all")
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if trainer.get("sync_batchnorm") and not any(isinstance(p, LayerSync) for p in plugins):
            plugins.append(SyncBatchNormKeepingActivations())  # Lightning's drops timm's act
        return instantiate(
            trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
            _convert_="all",
        )  # fmt: skip
    except InstantiationException as err:  # a trainer.* value Lightning rejects: a user error
        raise trainer_error(cfg.trainer, err.__cause__ or err) from None


def describe_model(model: Mapping[str, Any], norm: Mapping[str, Any]) -> str:
    """``normlab.models.NormLabModule(normlab.models.ConvNet) with norm=batchnorm``; the arch of a
    torchvision/timm model too."""
    net = (model.get("net") or {}).get("_target_", "")
    arch = f" {model['arch']}" if model.get("arch") else ""
    return f"{model['_target_']}({net}{arch}) with norm={norm.get('name')}"


def accelerator_name(trainer: L.Trainer) -> str:
    """``cpu``, ``cuda``, ``mps``, ... for the accelerator the Trainer chose."""
    return type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a model on ``cfg.data`` with ``cfg.norm``, test its best checkpoint, write results."""
    with job_scope():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    log.info(
        "data: %s (scaling=%s)", cfg.data.get("name", cfg.data._target_), cfg.data.get("scaling")
    )
    trusted = trusted_targets(cfg.get("trusted_targets"))
    datamodule = build_datamodule(cfg.data, cfg.seed, trusted)
    if hasattr(datamodule, "check_usable"):  # classes, a training step, a test split
        datamodule.check_usable(train=cfg.train, test=cfg.test)
    check_num_classes(datamodule)  # a user's DataModule too

    log.info("model: %s", describe_model(cfg.model, cfg.norm))
    model = build_model(cfg.model, cfg.norm, datamodule, trusted)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = cfg.get("ckpt_path")  # `last` was resolved to a path by normlab.cli
    if ckpt_path:  # before anything is set up: Lightning's own load comes after ~10 s of it
        # the classes too, unless ckpt_strict=false: then other labels are the user's call
        strict = cfg.get("ckpt_strict", True)
        data = (datamodule, _data_source(cfg.data)) if strict else (None, "")
        check_resume_fits(ckpt_path, model, bool(cfg.get("train")), *data)
    check_first_batch(model, datamodule, train=cfg.train)  # the data fits the net, before fit

    trainer = build_trainer(cfg)  # the model brings its own callbacks (configure_callbacks)
    check_batchnorm_setup(model.run_config, accelerator_name(trainer))
    prepare_child_processes()  # DDP ranks > 0 join this run (and only this job of a sweep)

    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.global_step == 0:  # e.g. trainer.limit_train_batches rounding to 0 batches
            raise NormlabError(
                "training took no optimizer step (no training batch ran; see trainer.limit_"
                "train_batches and data.batch_size), so there is no trained model to test or save"
            )
    fit_metrics = final_metrics(trainer)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test"):
        test_ckpt = best or (None if cfg.get("train") else ckpt_path)
        if test_ckpt is None:
            log.warning("no checkpoint was saved: testing the weights at the end of training")
        trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt)
    metrics = {**fit_metrics, **final_metrics(trainer)}
    if cfg.get("test") and cfg.norm.get("adapt") == "test":  # the same model, AdaBN-adapted
        metrics.update(_test_adapted(trainer, model, datamodule))

    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoints = {"best": best or None, "last": str(last) if last.is_file() else None}
    if trainer.is_global_zero:
        log_hparams(trainer, cfg, metrics)
        extra = {
            "task_name": cfg.task_name,
            "tags": list(cfg.get("tags") or []),
            "epochs": trainer.current_epoch,  # completed epochs
            "steps": trainer.global_step,  # optimizer steps (the benchmark compares them)
            "wall_time_s": round(time.perf_counter() - started, 2),  # setup, fit and test
        }
        write_results(run_dir, metrics, checkpoints, extra=extra)
    log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def _data_source(data: Mapping[str, Any]) -> str:
    """Where a data config reads from, as the key a user changes: data.data_dir or data.name."""
    if data.get("data_dir") and data.get("name") not in (None, "digits", "synthetic"):
        return f"data.data_dir={data['data_dir']}"
    return f"data.name={data.get('name', data.get('_target_'))}"


def _test_adapted(trainer: L.Trainer, model: Any, datamodule: Any) -> dict[str, float]:
    """``norm.adapt=test`` in training: test the tested model again after re-estimating its
    running statistics on the test split; its metrics are ``test_adapted/*``."""
    from normlab.norm.adapt import adapt_to_test_data

    adapt_to_test_data(model, datamodule)
    trainer.test(model, datamodule=datamodule)
    tested = final_metrics(trainer)
    return {k.replace("test/", "test_adapted/"): v for k, v in tested.items() if "test/" in k}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint in eval mode with the data config and scaling statistics it was trained
    with; ``cfg.data`` entries that are not null replace the saved ones."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    saved = checkpoint["normlab"]["config"]

    # the saved config is data anyone may have written: only targets normlab builds itself, or
    # that the user names in trusted_targets, are imported and called
    trusted, source = trusted_targets(cfg.get("trusted_targets")), f"ckpt_path={cfg.ckpt_path}"
    data_cfg = eval_data_config(saved["data"], cfg.get("data") or {})
    datamodule = build_datamodule(data_cfg, cfg.seed, trusted, source)
    check_classes(checkpoint, datamodule, source, _data_source(data_cfg))
    state = checkpoint.get(type(datamodule).__qualname__)
    if state:
        datamodule.load_state_dict(state)  # the training split's scaling statistics

    # the model class and net the checkpoint's config names; its weights replace model.weights
    model_cfg = dict(saved["model"])
    if model_cfg.get("weights") is not None:
        model_cfg["weights"] = None
    log.info(
        "testing %s: %s, on %s", cfg.ckpt_path, describe_model(model_cfg, saved["norm"]),
        data_cfg.get("name", data_cfg.get("_target_")),
    )  # fmt: skip
    model = build_model(model_cfg, saved["norm"], datamodule, trusted, source)
    model.on_load_checkpoint(checkpoint)  # the run config, and layers frozen in training
    model.load_state_dict(checkpoint["state_dict"])
    if (cfg.get("norm") or {}).get("adapt") == "test":  # AdaBN: the test data's statistics
        from normlab.norm.adapt import adapt_to_test_data

        adapt_to_test_data(model, datamodule)

    trainer = build_trainer(cfg)
    trainer.test(model, datamodule=datamodule)
    metrics = final_metrics(trainer)
    if trainer.is_global_zero:
        log_hparams(trainer, OmegaConf.create(saved), metrics)
        write_results(
            run_dir,
            metrics,
            {"best": None, "last": None},  # eval.py saves none; "evaluated" names its input
            extra={
                "task_name": cfg.task_name,
                "tags": list(cfg.get("tags") or []),
                "evaluated": str(cfg.ckpt_path),
            },
        )
    log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics
