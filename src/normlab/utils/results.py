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
    "model.activation",
    "model.widths",
    "model.optimizer.name",
    "model.optimizer.lr",
    "model.optimizer.weight_decay",
    "trainer.max_epochs",
    "seed",
)


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
    """Write one HPARAMS entry per TensorBoard logger: the run's config against its real final
    metrics (``hparams/val_acc``, ``hparams/test_acc``, ...), not Lightning's -1 placeholder."""
    from lightning.pytorch.loggers import TensorBoardLogger

    params = {}
    for key in HPARAM_KEYS:
        value = _select(cfg, key)
        params[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    hp_metrics = {"hparams/" + k.replace("/", "_"): v for k, v in metrics.items()}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=hp_metrics)
            logger.save()


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
