"""What train.py and eval.py share: validate first, then import the heavy recipe, and turn user
errors into one paragraph on stderr with exit status 2."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.config import validate_ckpt_path, validate_train_config
from normlab.errors import ConfigError, NormlabError


def _discard_empty_run_dir(cfg: DictConfig) -> None:
    """A run that never started leaves nothing behind: remove its dir if it holds only the
    composed config and the log Hydra created."""
    try:
        run_dir = Path(cfg.paths.output_dir)
    except Exception:
        return
    if run_dir.is_dir() and all(
        p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()
    ):
        shutil.rmtree(run_dir, ignore_errors=True)


def run_task(task: str, cfg: DictConfig) -> Any:
    """Run ``train`` or ``evaluate`` on a composed config."""
    started = False
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(missing[0], "???", "this key is required; set it on the command line")
        container = OmegaConf.to_container(cfg, resolve=True)
        if task == "train":
            validate_train_config(container)
        else:
            validate_ckpt_path(container.get("ckpt_path"))
        from normlab import run

        started = True
        return run.train(cfg) if task == "train" else run.evaluate(cfg)
    except NormlabError as err:
        if not started or not (Path(cfg.paths.output_dir) / "checkpoints").exists():
            _discard_empty_run_dir(cfg)
        print(f"normlab: error: {err}", file=sys.stderr)
        sys.exit(2)
