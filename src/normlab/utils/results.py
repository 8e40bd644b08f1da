"""What a run leaves for people and scripts: results.json and TensorBoard's HPARAMS entry."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.norm.spec import HPARAM_KEYS as NORM_HPARAM_KEYS
from normlab.utils.atomic_file import atomic_write

# the config keys shown as columns of TensorBoard's HPARAMS table (blank where a run lacks one)
HPARAM_KEYS = (
    "task_name",
    "tags",
    "data.name",
    "data.scaling",
    "data.batch_size",
    "model._target_",
    "model.net._target_",
    "model.arch",
    "model.net.activation",
    "model.net.widths",
    "model.net.blocks_per_stage",
    "model.optimizer._target_",
    "model.optimizer.lr",
    "model.optimizer.weight_decay",
    "trainer.max_epochs",
    "seed",
)
# norm keys every run declares (TensorBoard takes the table's columns from one run's declaration,
# so a sweep over norms lines up): those of normlab.norm.spec marked hparam; a run's other norm.*
# keys are added to its own row
HPARAM_NORM_KEYS = NORM_HPARAM_KEYS
# the metric columns of the HPARAMS table, logged as hparams/<name with _ for />
HPARAM_METRICS = ("val/acc", "test/acc", "val/loss", "test/loss", "train/acc", "train/loss")


def final_metrics(trainer: Any) -> dict[str, float]:
    """The trainer's last logged epoch metrics as plain floats."""
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if getattr(v, "numel", lambda: 1)() == 1
    }


def _select(cfg: Mapping[str, Any], dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _cell(value: Any) -> bool | int | float | str:
    """A table cell: numbers and booleans as they are, lists joined, absent keys blank."""
    if value is None:
        return ""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Sequence):
        return ", ".join(map(str, value))
    return str(value)


def hparams_row(cfg: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The run's HPARAMS columns: ``HPARAM_KEYS``, ``norm.<HPARAM_NORM_KEYS>`` and every other
    key of the run's ``norm`` config."""
    norm = cfg.get("norm") or {}
    keys = [*HPARAM_KEYS, *(f"norm.{k}" for k in HPARAM_NORM_KEYS)]
    keys += [f"norm.{k}" for k in norm if f"norm.{k}" not in keys]
    return {key: _cell(_select(cfg, key)) for key in keys}


def log_hparams(trainer: Any, cfg: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Give every logger the run's config (:func:`hparams_row`) and its real final metrics
    (``hparams/val_acc``, ``hparams/test_acc``, ...) through Lightning's public
    ``logger.log_hyperparams``, at the step of the last metrics (not Lightning's ``hp_metric=-1``
    placeholder).

    TensorBoard receives both in one call, which makes its HPARAMS row; every run declares the
    same metric columns (``HPARAM_METRICS``; one the run lacks, such as val/acc of an eval.py run,
    is NaN) because TensorBoard takes the table's columns from one run's declaration. Other
    loggers (CSV, ...) get the config as hyperparameters and the metrics the run has.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from normlab.callbacks._tensorboard import lightning_step

    params = hparams_row(cfg)
    present = {
        "hparams/" + k.replace("/", "_"): float(metrics[k]) for k in HPARAM_METRICS if k in metrics
    }
    declared = {"hparams/" + k.replace("/", "_"): math.nan for k in HPARAM_METRICS}
    step = lightning_step(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics={**declared, **present}, step=step)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(present, step=step)
        logger.save()


def write_results(
    run_dir: Path,
    metrics: Mapping[str, float],
    checkpoints: Mapping[str, str | None],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/results.json`` atomically: beside it, fsynced, renamed into place, so a
    reader, a kill or a full disk never leaves half a file (see ``atomic_file``)."""
    payload = {
        "metrics": dict(metrics),
        "checkpoints": dict(checkpoints),
        "run_dir": str(run_dir),
        **(extra or {}),
    }
    text = json.dumps(payload, indent=2) + "\n"
    return atomic_write(Path(run_dir) / "results.json", lambda f: f.write(text.encode()), "results")
