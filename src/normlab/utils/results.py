"""What a run leaves for people and scripts: results.json and TensorBoard's HPARAMS entry."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# the config keys shown as columns of TensorBoard's HPARAMS table
HPARAM_KEYS = (
    "data.name",
    "data.scaling",
    "data.batch_size",
    "norm.name",
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


def log_hparams(trainer: Any, cfg: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Write one HPARAMS entry per TensorBoard logger: the run's config (``HPARAM_KEYS``) against
    its real final metrics (scalars ``hparams/val_acc``, ``hparams/test_acc``, ... at the last
    step), not Lightning's ``hp_metric=-1`` placeholder.

    Every run declares the same columns (``HPARAM_METRICS``; a metric the run lacks, such as
    val/acc of an eval.py run, stays blank): TensorBoard takes the table's columns from one run's
    declaration, so runs of one log dir line up in one table.
    """
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams

    params = {}
    for key in HPARAM_KEYS:
        value = _select(cfg, key)
        params[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    columns = {"hparams/" + k.replace("/", "_"): k for k in HPARAM_METRICS}
    experiment, start, end = hparams(params, dict.fromkeys(columns, 0.0))
    step = getattr(trainer, "global_step", 0)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.hparams.update(params)  # hparams.yaml; log_hyperparams could add a -1 metric
            logger.save()
            writer = logger.experiment
            for summary in (experiment, start, end):
                writer._get_file_writer().add_summary(summary, step)
            for tag, key in columns.items():
                if key in metrics:
                    writer.add_scalar(tag, float(metrics[key]), step)
            writer.flush()


def write_results(
    run_dir: Path,
    metrics: Mapping[str, float],
    checkpoints: Mapping[str, str | None],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/results.json`` atomically (a reader never sees half a file)."""
    payload = {
        "metrics": dict(metrics),
        "checkpoints": dict(checkpoints),
        "run_dir": str(run_dir),
        **(extra or {}),
    }
    path = Path(run_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
