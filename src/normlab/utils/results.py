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
# the metric columns of the HPARAMS table, logged as hparams/<name with _ for />; TensorBoard
# shows the first five without ticking anything
HPARAM_METRICS = ("val/acc", "test/acc", "val/loss", "test/loss", "train/acc", "train/loss")
# the columns TensorBoard shows without ticking anything, besides the keys a sweep varies
HPARAM_SHOWN = ("norm.name", "model.arch")
# TensorBoard's HPARAMS tab shows this many hparam columns at first (the ones flagged `differs`
# first, then by name); the others wait in its left pane
SHOWN_COLUMNS = 5


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


def hparams_row(
    cfg: Mapping[str, Any], swept: Sequence[str] = ()
) -> dict[str, bool | int | float | str]:
    """The run's HPARAMS columns: ``HPARAM_KEYS``, ``norm.<HPARAM_NORM_KEYS>``, every other key
    of the run's ``norm`` config and the ``swept`` keys of its sweep that are config values."""
    norm = cfg.get("norm") or {}
    keys = [*HPARAM_KEYS, *(f"norm.{k}" for k in HPARAM_NORM_KEYS)]
    keys += [f"norm.{k}" for k in norm if f"norm.{k}" not in keys]
    values = {k: _select(cfg, k) for k in swept if k not in keys}
    keys += [k for k, v in values.items() if v is not None and not isinstance(v, Mapping)]
    return {key: _cell(_select(cfg, key)) for key in keys}


def shown_columns(row: Mapping[str, Any], swept: Sequence[str] = ()) -> list[str]:
    """The hparam columns TensorBoard shows without ticking anything: the keys the sweep varies
    (a swept group such as ``norm`` by its ``norm.name``), then those of ``HPARAM_SHOWN`` that
    the run has (``model.arch`` is blank for the ConvNet), at most ``SHOWN_COLUMNS``."""
    shown: list[str] = []
    wanted = [*swept, *(k for k in HPARAM_SHOWN if row.get(k) != "")]
    for key in wanted:
        column = key if key in row else f"{key}.name" if f"{key}.name" in row else None
        if column and column not in shown:
            shown.append(column)
    return shown[:SHOWN_COLUMNS]


def _tensorboard_hparams(
    params: Mapping[str, Any], metrics: Mapping[str, float], shown: Sequence[str]
) -> list[Any]:
    """The HPARAMS summaries (experiment, session start, session end) as Lightning writes them,
    with the ``shown`` columns flagged ``differs``: TensorBoard's HPARAMS tab puts those first
    and ticks the first ``SHOWN_COLUMNS`` (every run of a sweep flags the same ones, and the tab
    takes its columns from one run's experiment)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams

    experiment, start, end = hparams(dict(params), dict(metrics))
    plugin_data = experiment.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in shown
    plugin_data.content = data.SerializeToString()
    return [experiment, start, end]


def log_hparams(trainer: Any, cfg: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Give every logger the run's config (:func:`hparams_row`) and its real final metrics
    (``hparams/val_acc``, ``hparams/test_acc``, ...) through Lightning's public
    ``logger.log_hyperparams``, at the step of the last metrics (not Lightning's ``hp_metric=-1``
    placeholder).

    TensorBoard receives both in one row of its HPARAMS table, whose first columns are the keys
    the run's sweep varies, ``norm.name`` and ``model.arch`` (:func:`shown_columns`); every run
    declares the same metric columns (``HPARAM_METRICS``; one the run lacks, such as val/acc of
    an eval.py run, is NaN) because TensorBoard takes the table's columns from one run's
    declaration. Other loggers (CSV, ...) get the config as hyperparameters and the metrics the
    run has.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from normlab.callbacks._tensorboard import lightning_step
    from normlab.job_names import current_swept_keys

    swept = current_swept_keys()
    params = hparams_row(cfg, swept)
    present = {
        "hparams/" + k.replace("/", "_"): float(metrics[k]) for k in HPARAM_METRICS if k in metrics
    }
    declared = {"hparams/" + k.replace("/", "_"): math.nan for k in HPARAM_METRICS}
    step = lightning_step(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics={})  # hparams.yaml; the summaries below
            table_metrics = {**declared, **present}
            logger.log_metrics(table_metrics, step=step)
            writer = logger.experiment._get_file_writer()  # as Lightning writes its hparams
            shown = shown_columns(params, swept)
            for summary in _tensorboard_hparams(params, table_metrics, shown):
                writer.add_summary(summary, step)
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
